"""Seconds from handing a step's samples to the streaming grader until ``wait`` returns, step after step.

What one AGAPO step pays for grading once its rollout is in (``grading/tail_s``): a batch of math
samples (``verifier_throughput.math_samples``, half right) is submitted to ``StreamingGrader`` and waited
on, ``--rounds`` times back to back with the same grading actors (the first round, which starts them,
is reported apart). Arms:

* ``unique``: ``--samples`` distinct samples, as before duplicate grading existed.
* ``repeated``: every sample twice (a group whose responses agree), keyed by content, so the grader
  grades each once (``StreamingGrader.submit(content=...)``). Needs a tree with that argument.

    python benchmarks/grading_latency.py --out benchmarks/results/grading_latency.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json
from verifier_throughput import math_samples


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, object]:
    from kexaone_align.verifiers import TaskRouter

    from kexaone_align.runtime.grading import StreamingGrader

    samples = math_samples(args.samples, seed=0)
    keys = list(range(len(samples)))
    content = None
    if arm == "repeated":
        samples, keys = samples + samples, list(range(2 * len(samples)))
        content = [k % args.samples for k in keys]
    grader = StreamingGrader(
        TaskRouter({"math": "math"}), num_workers=args.workers, chunk_size=args.chunk_size, timeout_s="auto"
    )
    seconds, rewards = [], []
    try:
        for _ in range(args.rounds + 1):
            started = time.perf_counter()
            if content is None:
                grader.submit(keys, samples)
            else:
                grader.submit(keys, samples, content=content)
            got, _ = grader.wait()
            seconds.append(time.perf_counter() - started)
            rewards = [got[k] for k in keys]
    finally:
        grader.close()
    return {
        "samples_submitted": len(samples),
        "first_round_s": seconds[0],
        "rounds_s": seconds[1:],
        "median_s": median(seconds[1:]),
        "reward_sum": sum(rewards),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="distinct samples per round")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after the first")
    ap.add_argument("--workers", type=int, default=4, help="grading actors (grading.num_workers)")
    ap.add_argument("--chunk-size", type=int, default=8, help="samples per task (grading.chunk_size)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--arms", default="unique,repeated", help="comma-separated: unique, repeated")
    ap.add_argument("--out", default="benchmarks/results/grading_latency.json")
    args = ap.parse_args()
    import ray

    info = machine_info()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        results = {arm: run_arm(arm, args) for arm in args.arms.split(",") if arm}
    finally:
        ray.shutdown()
    for arm, r in results.items():
        print(f"{arm:>9}: median {r['median_s']:.3f} s per round of {r['samples_submitted']} samples")
    payload = {"benchmark": "grading_latency", "command": command_line(), "machine": info,
               "settings": vars(args), "results": results}  # fmt: skip
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
