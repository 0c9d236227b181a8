"""hf rollout tokens/s with the CPU decode path (grouped-query SDPA, nucleus from the top tokens) against
the path before it (transformers' ``sdpa``, which copies K/V heads under a mask, and a stable sort of the
whole vocabulary every decode step for top-p).

The batch is one AGAPO step of ``recipes/tiny/agapo.yaml`` (see ``rollout_backends.py``). Use an SFT
export as ``--checkpoint``: a trained policy's nucleus is a few tokens, which is what the top-token probe
is for (a fresh tiny model's next-token distribution is nearly flat, so the probe falls back to the sort
and only the attention change shows). ``fast`` is ``HFRolloutBackend(path)`` as the stage builds it;
``before`` wraps a second copy of the model that keeps plain ``sdpa``, with the probe switched off
(``NUCLEUS_PROBE`` set to the vocabulary size). Both run in this process, interleaved (order alternates
per round, a fresh seed per round, both on the same seed within a round) after one warm-up call each,
with ``--threads`` torch threads (1: what a rollout actor gets under Ray). The two must sample the same
tokens with the same log-probs in every round, or the script fails.

    python benchmarks/rollout_decode_paths.py --checkpoint <sft run_dir>/export --repeats 7 \\
        --out benchmarks/results/rollout_decode_paths.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json
from rollout_backends import QUICK_BATCH_OVERRIDES, batch_settings, tiny_agapo_batch

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("fast", "before")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(ROOT / "recipes/tiny/agapo.yaml"))
    parser.add_argument("--checkpoint", default=None, help="SFT export (default: the recipe's tiny model)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/kexaone-bench-decode-paths")
    parser.add_argument("--quick", action="store_true", help="2 prompts x 4 samples x 12 tokens, 1 round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")

    import torch
    from transformers import AutoModelForCausalLM

    from kexaone_align.algorithms import logprobs
    from kexaone_align.runtime.rollout.hf import HFRolloutBackend

    torch.set_num_threads(args.threads)
    overrides = QUICK_BATCH_OVERRIDES if args.quick else []
    repeats = 1 if args.quick else args.repeats
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    path, requests, sampling, recipe = tiny_agapo_batch(
        Path(args.recipe), ckpt, Path(args.workdir), overrides
    )
    batch = recipe.rollout.batch_size
    fast = HFRolloutBackend(path, dtype="float32", max_batch_size=batch)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    before = HFRolloutBackend.from_model(plain, max_batch_size=batch)
    backends = {"fast": fast, "before": before}
    probe = logprobs.NUCLEUS_PROBE

    def generate(name: str, seeded: Any) -> list[Any]:
        logprobs.NUCLEUS_PROBE = probe if name == "fast" else int(plain.config.vocab_size)
        try:
            return backends[name].generate(requests, seeded)
        finally:
            logprobs.NUCLEUS_PROBE = probe

    for name in PATHS:  # warm-up (allocator, first-call overheads)
        generate(name, dataclasses.replace(sampling, seed=sampling.seed + 10_000))
    rounds = []
    for r in range(repeats):
        seeded = dataclasses.replace(sampling, seed=sampling.seed + r)
        row, samples_of = {}, {}
        for name in PATHS if r % 2 == 0 else PATHS[::-1]:
            t0 = time.perf_counter()
            samples = generate(name, seeded)
            seconds = time.perf_counter() - t0
            tokens = sum(len(s.token_ids) for s in samples)
            samples_of[name] = [(s.token_ids, s.logprobs) for s in samples]
            row[name] = {
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
            }
        if samples_of["fast"] != samples_of["before"]:
            sys.exit(
                f"rollout_decode_paths: the two paths sampled different tokens or log-probs in round {r}"
            )
        row["fast_over_before"] = round(row["fast"]["tokens_per_s"] / row["before"]["tokens_per_s"], 3)
        rounds.append(row)
        print(f"round {r}: fast {row['fast']['tokens_per_s']} tok/s, before {row['before']['tokens_per_s']} "
              f"tok/s ({row['fast_over_before']}x)", flush=True)  # fmt: skip
    rates = {n: median([x[n]["tokens_per_s"] for x in rounds]) for n in PATHS}
    result = {
        "benchmark": "rollout_decode_paths",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            **batch_settings(args.recipe, path, requests, sampling),
            "max_batch_size": batch,
            "torch_threads": args.threads,
            "nucleus_probe": probe,
            "attention": {n: backends[n].model.config._attn_implementation for n in PATHS},
            "order": "interleaved, alternating per round; warm-up call per path; identical samples checked",
        },
        "rounds": rounds,
        "median_tokens_per_s": rates,
        "fast_over_before": {
            "ratio_of_medians": round(rates["fast"] / rates["before"], 3),
            "median_paired_ratio": median([x["fast_over_before"] for x in rounds]),
        },
    }
    print(f"median tokens/s: {rates}; fast/before {result['fast_over_before']}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
