"""Learner tokens/s on an RL batch with long-tailed response lengths: packed+balanced vs padded+contiguous.

One AGAPO batch as ``stages.rl.training_batch`` builds it (prompt + response rows, right-padded, rollout
log-probs, one advantage per row), with response lengths drawn from a lognormal (median ``--median``,
``--sigma``) and cut at ``--max-new`` (the truncated tail a real batch has). The rows are split over
``--ranks`` data-parallel ranks as ``LearnerGroup`` splits them, contiguously (today's default before
this change) or token-balanced, and each rank's shard goes through ``Learner.train_step`` with padded
or packed micro-batches of ``--micro-batch-tokens``.

The ranks run one after another on one in-process learner (DeepSpeed ZeRO-2, world size 1), each timed
alone, and a step takes as long as its slowest rank (data-parallel ranks wait for each other at the
gradient all-reduce). Tokens/s = real (non-padding) tokens of the whole batch / that step time. All
four arms run in the same process, interleaved in a rotating order, after one untimed warm-up each;
medians over ``--repeats``.

    python benchmarks/rl_packing.py --out benchmarks/results/rl_packing.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import command_line, machine_info, median, write_json

from kexaone_align.algorithms.objectives import agapo_objective
from kexaone_align.runtime.batching import select_rows, trim_columns
from kexaone_align.runtime.packed_micro import shard_rows_keeping_prefixes
from kexaone_align.runtime.rollout.base import RolloutSample
from kexaone_align.stages import rl

ARMS = {  # name -> (sequence_packing, balance_ranks, share_prefixes)
    "padded_contiguous": (False, False, False),
    "padded_balanced": (False, True, False),
    "packed_contiguous": (True, False, False),
    "packed_balanced": (True, True, False),
    "packed_balanced_shared": (True, True, True),  # each rank computes a prompt once for its responses
}


def response_lengths(n: int, median_len: float, sigma: float, max_new: int, seed: int) -> list[int]:
    """Lognormal response lengths (at least 1 token), truncated at ``max_new`` as a sampler would."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(n, generator=g) * sigma + math.log(median_len))
    return [int(x) for x in draws.clamp(1, max_new).round().tolist()]


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    """P prompts x G responses, as the AGAPO stage hands them to the learners."""
    g = torch.Generator().manual_seed(args.seed)
    n = args.prompts * args.group
    lengths = response_lengths(n, args.median, args.sigma, args.max_new, args.seed)
    samples, prompt = [], []
    for i, length in enumerate(lengths):
        if i % args.group == 0:
            n_prompt = int(torch.randint(args.prompt_min, args.prompt_max + 1, (1,), generator=g))
            prompt = torch.randint(5, vocab, (n_prompt,), generator=g).tolist()
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        logps = (-torch.rand(length, generator=g) * 4).tolist()
        reason = "length" if length >= args.max_new else "stop"
        samples.append(RolloutSample(f"r{i // args.group}", i % args.group, prompt, ids, logps, reason, 0))
    advantages = torch.randn(n, generator=g).tolist()
    return rl.training_batch(samples, advantages, pad_token_id=0)


def run_arm(
    learner, batch, loss_fn, ranks: int, packing: bool, balance: bool, share: bool
) -> dict[str, float]:
    """One training step of the whole batch over ``ranks`` shards; the step time is the slowest rank's."""
    learner.config.sequence_packing = packing
    learner.config.share_prefixes = share
    plan = shard_rows_keeping_prefixes(
        batch, ranks, balance=balance, share_prefixes=share, budget=learner.config.micro_batch_tokens,
        cost_width=learner.attention_cost_width,
    )  # fmt: skip
    times, computed, real = [], 0.0, 0.0
    for rows in plan:
        shard = trim_columns(select_rows(batch, rows))
        m = learner.train_step(shard, loss_fn)
        times.append(m["step_time_s"])
        computed += m["computed_tokens"]
        real += m["learner_tokens"]
    step = max(times)
    return {
        "step_time_s": step,
        "tokens_per_s": real / step,
        "rank_times_s": times,
        "real_tokens": real,
        "computed_tokens": computed,
        "rank_real_tokens": [float(batch["attention_mask"][r].sum()) for r in plan],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--median", type=float, default=96.0, help="median response length (tokens)")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of response lengths")
    parser.add_argument("--max-new", type=int, default=1024, help="responses are cut here (truncated)")
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks the batch is split over")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray learner actor gets 1)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/rl_packing.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()

    import functools

    from kexaone_align.models import build_tiny_checkpoint
    from kexaone_align.runtime.learner import Learner, LearnerConfig

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_checkpoint(Path(tmp) / "policy", seed=args.seed)
        learner = Learner(
            path,
            LearnerConfig(
                zero_stage=2, lr=1e-6, micro_batch_tokens=args.micro_batch_tokens,
                loss_aggregation="sequences", seed=args.seed,
            ),
        )  # fmt: skip
        learner.setup()
        vocab = int(learner.policy.config.vocab_size)
        batch = make_batch(args, vocab)
        loss_fn = functools.partial(agapo_objective, is_cap=2.0)
        runs: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
        for arm in arms:  # warm-up, untimed
            run_arm(learner, batch, loss_fn, args.ranks, *ARMS[arm])
        for r in range(args.repeats):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            for arm in order:
                runs[arm].append(run_arm(learner, batch, loss_fn, args.ranks, *ARMS[arm]))
                print(f"repeat {r} {arm}: {runs[arm][-1]['tokens_per_s']:.0f} tok/s", flush=True)
    lengths = batch["attention_mask"].sum(dim=1)
    response = batch["loss_mask"].sum(dim=1).float()
    summary = {}
    for arm, results in runs.items():
        summary[arm] = {
            "median_tokens_per_s": median([x["tokens_per_s"] for x in results]),
            "median_step_time_s": median([x["step_time_s"] for x in results]),
            "computed_tokens": results[0]["computed_tokens"],
            "padding_frac": 1 - results[0]["real_tokens"] / results[0]["computed_tokens"],
            "rank_real_tokens": results[0]["rank_real_tokens"],
        }
    ratios = {}
    base = "padded_contiguous"
    if base in runs:
        for arm in arms:
            if arm != base:
                paired = [
                    x["tokens_per_s"] / b["tokens_per_s"] for x, b in zip(runs[arm], runs[base], strict=True)
                ]
                ratios[f"{arm}/{base}"] = {
                    "ratio_of_medians": summary[arm]["median_tokens_per_s"]
                    / summary[base]["median_tokens_per_s"],
                    "median_paired_ratio": median(paired),
                    "paired_ratios": paired,
                }
    payload = {
        "benchmark": "rl_packing",
        "command": command_line(),
        "machine": info,
        "loadavg_at_end": list(os.getloadavg()),
        "settings": vars(args),
        "batch": {
            "rows": int(lengths.numel()),
            "real_tokens": int(lengths.sum()),
            "padded_tokens": int(batch["input_ids"].numel()),
            "response_length_median": float(response.median()),
            "response_length_mean": float(response.mean()),
            "response_length_max": float(response.max()),
            "truncated": int((response >= args.max_new).sum()),
        },
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    for arm, s in summary.items():
        print(f"{arm:>18}: {s['median_tokens_per_s']:.0f} tok/s, padding {s['padding_frac']:.0%}")
    for name, r in ratios.items():
        print(f"{name}: {r['ratio_of_medians']:.2f}x (median paired {r['median_paired_ratio']:.2f}x)")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
