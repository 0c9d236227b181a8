"""Math and code verifications per second through ``score_batch`` at 1, 2 and 4 workers.

A fixed, seeded sample set: math answers (correct and wrong, plain numbers, fractions and LaTeX in
``\\boxed{}``) and code answers (stdin/stdout programs and call-based ``fn_name`` functions, passing
and failing). Each (task, workers) point is scored ``--repeats`` times and the median rate is
reported. The sandbox's fixed cost per run is measured separately with an empty program, since every
stdin/stdout test pays it once.

    python benchmarks/verifier_throughput.py --out benchmarks/results/verifier_throughput.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json
from kexaone_align.verifiers import Sample, get_verifier, score_batch


def math_samples(n: int, seed: int) -> list[Sample]:
    """Half correct, half wrong; integers, fractions and LaTeX expressions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if kind == 0:
            gold, right, wrong = str(a + b), str(a + b), str(a + b + 1)
        elif kind == 1:
            gold, right = f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{a}}}{{{b}}}"
            wrong = f"\\frac{{{b}}}{{{a + b}}}"
        elif kind == 2:
            gold, right, wrong = f"{a}\\sqrt{{{b}}}", f"{a}\\sqrt{{{b}}}", f"{a + 1}\\sqrt{{{b}}}"
        else:
            gold, right, wrong = f"x^2 + {a}x", f"{a}x + x^2", f"x^2 - {a}x"
        answer = right if rng.random() < 0.5 else wrong
        response = f"<think>Let me compute step {i}.</think>\nSo the answer is $\\boxed{{{answer}}}$."
        out.append(Sample(prompt=f"q{i}", response=response, reference=gold, task="math"))
    return out


_STDIO_OK = "```python\nimport sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\n```"
_STDIO_BAD = "```python\nimport sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(max(nums))\n```"
_CALL_OK = "```python\ndef solve(xs, k):\n    return sorted(xs)[:k]\n```"
_CALL_BAD = "```python\ndef solve(xs, k):\n    return xs[:k]\n```"


def code_samples(n: int, seed: int) -> list[Sample]:
    """Alternating stdin/stdout (2 tests each) and call-based (3 tests each) samples, ~half failing."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good = rng.random() < 0.5
        if i % 2 == 0:
            tests = []
            for _ in range(2):
                nums = [rng.randint(0, 50) for _ in range(5)]
                tests.append({"input": " ".join(map(str, nums)) + "\n", "output": f"{sum(nums)}\n"})
            ref = {"tests": tests}
            response = _STDIO_OK if good else _STDIO_BAD
        else:
            tests = []
            for _ in range(3):
                xs = [rng.randint(0, 100) for _ in range(6)]
                tests.append({"args": [xs, 3], "expected": sorted(xs)[:3]})
            ref = {"fn_name": "solve", "tests": tests}
            response = _CALL_OK if good else _CALL_BAD
        out.append(Sample(prompt=f"c{i}", response=response, reference=ref, task="code"))
    return out


def sandbox_empty_run_cost(repeats: int) -> dict:
    """Seconds for one sandboxed run of an empty program (the floor every stdin/stdout test pays)."""
    from kexaone_align.verifiers.code.sandbox import detect_isolation_mode, run_sandboxed

    run_sandboxed("")  # warm-up (isolation-mode probe)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        res = run_sandboxed("")
        times.append(time.perf_counter() - start)
        if not res.ok:
            raise RuntimeError(f"empty sandbox run failed: {res}")
    start = time.perf_counter()
    import subprocess

    for _ in range(repeats):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = (time.perf_counter() - start) / repeats
    return {
        "isolation_mode": detect_isolation_mode(),
        "seconds_median": median(times),
        "seconds_runs": times,
        "bare_python_startup_seconds_mean": bare,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/verifier_throughput.json")
    ap.add_argument("--math-n", type=int, default=64)
    ap.add_argument("--code-n", type=int, default=16)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = machine_info()
    workers = [int(w) for w in args.workers.split(",")]
    sets = {"math": math_samples(args.math_n, args.seed), "code": code_samples(args.code_n, args.seed)}
    verifiers = {"math": get_verifier("math"), "code": get_verifier("code")}
    sandbox = sandbox_empty_run_cost(max(5, args.repeats * 3))
    print(
        f"sandbox empty run ({sandbox['isolation_mode']}): {sandbox['seconds_median'] * 1e3:.0f} ms "
        f"(bare python startup {sandbox['bare_python_startup_seconds_mean'] * 1e3:.0f} ms)",
        flush=True,
    )
    for task in sets:  # warm-up: imports, and start every math-verify pool process before timing
        score_batch(sets[task][: 2 * max(workers)], verifiers[task], max_workers=max(workers), timeout_s=60)
    rows = []
    for task, samples in sets.items():
        for w in workers:
            rates, rewards, fails = [], [], []
            for _ in range(args.repeats):
                res = score_batch(samples, verifiers[task], max_workers=w, timeout_s=60)
                rates.append(len(samples) / res.elapsed_s)
                rewards.append(sum(res.rewards) / len(samples))
                fails.append(res.errors + res.timeouts)
            row = {
                "task": task,
                "workers": w,
                "samples": len(samples),
                "per_s_median": median(rates),
                "per_s_runs": rates,
                "mean_reward": rewards[0],
                "errors_or_timeouts": max(fails),
            }
            rows.append(row)
            print(
                f"{task} workers={w}: {row['per_s_median']:.1f}/s (mean reward {row['mean_reward']:.2f}, "
                f"errors+timeouts {row['errors_or_timeouts']})",
                flush=True,
            )
    write_json(
        args.out,
        {
            "benchmark": "verifier_throughput",
            "command": command_line(),
            "machine": info,
            "settings": vars(args),
            "sandbox_empty_run": sandbox,
            "throughput": rows,
            "total_seconds": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
