"""Which transformers MoE experts kernel to use on CPU: seconds per training step and per decode batch.

transformers runs ExaoneMoe's routed experts with a selectable kernel (``experts_implementation``):
``grouped_mm`` (its default), ``batched_mm`` or ``eager`` (a loop over the experts that got tokens).
This script times, side by side and interleaved, the tiny K-EXAONE of ``recipes/tiny/sft.yaml`` under
each kernel on the same weights and inputs:

* a training step: forward + backward over a batch of ``--batch`` x ``--seq`` tokens (what the SFT,
  AGAPO and GROUPER learners do);
* a decode batch: ``generate`` of ``--new-tokens`` sampled tokens for ``--gen-batch`` prompts (what the
  hf rollout backend does).

Every kernel's logits are checked equal to eager's first. Medians over ``--repeats``, plus the ratio
to the default kernel; results to JSON.

    python benchmarks/moe_kernels.py --out benchmarks/results/moe_kernels.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, write_json

KERNELS = ("eager", "grouped_mm", "batched_mm")
DEFAULT_KERNEL = "grouped_mm"


def build_models(kernels: tuple[str, ...]) -> dict:
    """One tiny model per kernel, all with the same weights."""
    import torch
    from transformers import ExaoneMoeForCausalLM

    from kexaone_align.models.tiny import tiny_config
    from kexaone_align.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    config = tiny_config(len(build_tokenizer()))
    models = {}
    for kernel in kernels:
        model = ExaoneMoeForCausalLM(copy.deepcopy(config))  # the kernel choice lives on the config
        model.set_experts_implementation(kernel)
        if model.config._experts_implementation != kernel:
            raise RuntimeError(f"transformers did not switch the experts kernel to {kernel!r}")
        models[kernel] = model
    state = models[kernels[0]].state_dict()
    for model in models.values():
        model.load_state_dict(state)
    return models


def time_train_step(model, ids) -> float:
    start = time.perf_counter()
    logits = model(input_ids=ids).logits
    logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_decode(model, prompts, new_tokens: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_p=0.95,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="training rows")
    parser.add_argument("--seq", type=int, default=64, help="training tokens per row")
    parser.add_argument("--gen-batch", type=int, default=64, help="prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=32, help="sampled tokens per prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (for tests)")
    parser.add_argument("--out", default="benchmarks/results/moe_kernels.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.gen_batch, args.new_tokens, args.repeats = 2, 16, 4, 4, 2

    import torch

    torch.set_num_threads(args.threads)
    kernels = tuple(k for k in args.kernels.split(",") if k)
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernel(s) {unknown}; choose from {list(KERNELS)}")
    info = machine_info()
    models = build_models(kernels)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 900, (args.batch, args.seq), generator=gen)
    prompts = torch.randint(10, 900, (args.gen_batch, 20), generator=gen)
    with torch.no_grad():
        reference = models[kernels[0]](input_ids=ids).logits
        logits = {k: m(input_ids=ids).logits for k, m in models.items()}
    max_abs_diff = {k: float((v - reference).abs().max()) for k, v in logits.items()}
    train: dict[str, list[float]] = {k: [] for k in kernels}
    decode: dict[str, list[float]] = {k: [] for k in kernels}
    for model in models.values():  # warm-up, untimed
        time_train_step(model, ids)
        time_decode(model, prompts, 2)
    for _ in range(args.repeats):  # interleaved: every kernel sees the same machine load
        for kernel, model in models.items():
            train[kernel].append(time_train_step(model, ids))
            decode[kernel].append(time_decode(model, prompts, args.new_tokens))
    base = DEFAULT_KERNEL if DEFAULT_KERNEL in kernels else kernels[0]
    results = {}
    for kernel in kernels:
        t, d = median(train[kernel]), median(decode[kernel])
        results[kernel] = {
            "train_step_s_median": t,
            "train_tokens_per_s": args.batch * args.seq / t,
            "decode_s_median": d,
            "decode_tokens_per_s": args.gen_batch * args.new_tokens / d,
            f"train_speedup_vs_{base}": median(train[base]) / t,
            f"decode_speedup_vs_{base}": median(decode[base]) / d,
            "max_abs_logit_diff_vs_first": max_abs_diff[kernel],
            "train_step_s_runs": train[kernel],
            "decode_s_runs": decode[kernel],
        }
    out = {
        "benchmark": "moe_kernels",
        "command": "python benchmarks/moe_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": info,
        "results": results,
    }
    write_json(args.out, out)
    for kernel, r in results.items():
        print(
            f"{kernel:>10}: train step {r['train_step_s_median']:.3f} s "
            f"(x{r[f'train_speedup_vs_{base}']:.2f}), decode {r['decode_s_median']:.3f} s "
            f"(x{r[f'decode_speedup_vs_{base}']:.2f})"
        )
    return out


if __name__ == "__main__":
    main()
