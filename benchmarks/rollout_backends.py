"""Rollout tokens/s of the ``hf`` backend against ``vllm`` (vLLM's CPU build here) on the tiny AGAPO batch.

The batch is one step of ``recipes/tiny/agapo.yaml``: ``prompts_per_step`` training prompts x
``group_size`` samples, ``max_new_tokens`` and the recipe's sampling (T 1.0, top-p 0.95), rendered with
the chat template exactly as the stage renders them. Both backends serve the same checkpoint
(``--checkpoint``: an SFT export gives realistic response lengths; default: the tiny model built from
the recipe's architecture) in this process, one after the other, interleaved over ``--repeats`` rounds
with a fresh seed per round; the engines are started once (start-up is reported, not timed in the
rate). Reported: generated tokens / generate seconds per round, medians, and the vllm/hf ratio.

    python benchmarks/rollout_backends.py --out benchmarks/results/rollout_backends.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json

ROOT = Path(__file__).resolve().parents[1]


def tiny_agapo_batch(recipe_path: Path, checkpoint: Path | None, workdir: Path, overrides: list[str]):
    """(checkpoint, requests, sampling) of one AGAPO step of the recipe."""
    from kexaone_align.config import load_recipe
    from kexaone_align.models import load_tokenizer
    from kexaone_align.runtime.rollout.base import SamplingConfig
    from kexaone_align.stages import rl
    from kexaone_align.stages.common import prepare_policy

    recipe = load_recipe(recipe_path, [f"run_dir={workdir}", *overrides])
    path = checkpoint or prepare_policy(recipe)
    tokenizer = load_tokenizer(path)
    train, _, _ = rl.prompt_sets(recipe, tokenizer)
    rows = train[: recipe.agapo.prompts_per_step]
    requests = rl.build_requests(tokenizer, rows, recipe.agapo.group_size, "bench")
    sampling = SamplingConfig.from_recipe(recipe.rollout, stop_token_ids=(), seed=recipe.seed)
    return path, requests, sampling, recipe


# A few rows and tokens: the ``--quick`` batch of the rollout scripts that time one AGAPO step.
QUICK_BATCH_OVERRIDES = ["agapo.prompts_per_step=2", "agapo.group_size=4", "rollout.max_new_tokens=12"]


def batch_settings(recipe_path: str, checkpoint: Path, requests: list, sampling: Any) -> dict:
    """The batch a rollout result JSON was measured on: recipe, checkpoint, samples and sampling."""
    return {
        "recipe": recipe_path,
        "checkpoint": str(checkpoint),
        "samples": sum(r.num_samples for r in requests),
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(ROOT / "recipes/tiny/agapo.yaml"))
    parser.add_argument(
        "--checkpoint", default=None, help="model to serve (default: the recipe's tiny model)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/kexaone-bench-rollout")
    parser.add_argument("--quick", action="store_true", help="2 prompts x 2 samples x 8 tokens, 1 round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import dataclasses

    import torch

    from kexaone_align.runtime.rollout.hf import HFRolloutBackend
    from kexaone_align.runtime.rollout.vllm import VLLMRolloutBackend

    overrides = (
        ["agapo.prompts_per_step=2", "agapo.group_size=2", "rollout.max_new_tokens=8"] if args.quick else []
    )
    repeats = 1 if args.quick else args.repeats
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    path, requests, sampling, recipe = tiny_agapo_batch(
        Path(args.recipe), ckpt, Path(args.workdir), overrides
    )
    info = machine_info()
    started = time.perf_counter()
    hf = HFRolloutBackend(path, dtype="float32", max_batch_size=recipe.rollout.batch_size)
    hf_start = time.perf_counter() - started
    started = time.perf_counter()
    batch = recipe.rollout.batch_size
    vllm = VLLMRolloutBackend(path, dtype="float32", max_model_len=1024, max_num_seqs=batch, seed=recipe.seed)
    vllm_start = time.perf_counter() - started
    rounds = []
    try:
        for r in range(repeats):
            seeded = dataclasses.replace(sampling, seed=sampling.seed + r)
            row = {}
            for name, backend in (("hf", hf), ("vllm", vllm)) if r % 2 == 0 else (("vllm", vllm), ("hf", hf)):
                t0 = time.perf_counter()
                samples = backend.generate(requests, seeded)
                seconds = time.perf_counter() - t0
                tokens = sum(len(s.token_ids) for s in samples)
                row[name] = {
                    "tokens": tokens,
                    "seconds": round(seconds, 3),
                    "tokens_per_s": round(tokens / seconds, 1),
                }
            rounds.append(row)
            print(
                f"round {r}: hf {row['hf']['tokens_per_s']} tok/s, vllm {row['vllm']['tokens_per_s']} tok/s"
            )
    finally:
        vllm.shutdown()
    hf_rate = median([x["hf"]["tokens_per_s"] for x in rounds])
    vllm_rate = median([x["vllm"]["tokens_per_s"] for x in rounds])
    result = {
        "benchmark": "rollout_backends",
        "command": command_line(),
        "machine": info,
        "settings": {
            "recipe": args.recipe,
            "checkpoint": str(path),
            "requests": len(requests),
            "samples": sum(r.num_samples for r in requests),
            "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "hf_max_batch_size": recipe.rollout.batch_size,
            "torch_threads_hf": torch.get_num_threads(),
            "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        },
        "startup_seconds": {"hf": round(hf_start, 1), "vllm": round(vllm_start, 1)},
        "rounds": rounds,
        "median_tokens_per_s": {"hf": hf_rate, "vllm": vllm_rate},
        "vllm_over_hf": round(vllm_rate / hf_rate, 2) if hf_rate else None,
    }
    print(f"median tokens/s: hf {hf_rate}, vllm {vllm_rate} (vllm/hf {result['vllm_over_hf']})")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
