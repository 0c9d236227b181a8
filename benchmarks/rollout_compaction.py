"""hf rollout tokens/s with finished rows dropped from the decode batch, against decoding them to the end.

The batch is one AGAPO step of ``recipes/tiny/agapo.yaml`` (``prompts_per_step`` x ``group_size``
samples, the recipe's sampling, rendered as the stage renders them; see ``rollout_backends.py``). Use
an SFT export as ``--checkpoint``: its responses stop at different lengths, which is what compaction
is for (a fresh tiny model never says end-of-turn, so every row runs to the budget and there is
nothing to drop). Each ``--fractions`` setting is one ``HFRolloutBackend.compact_fraction`` (``none``:
finished rows keep decoding pad tokens until the whole batch stops, the behaviour before compaction);
all settings share one model in this process, run interleaved (rotated order per round, a fresh seed
per round, every setting on the same seed within a round) after one warm-up call each, with
``--threads`` torch threads (1: what a rollout actor gets under Ray). Every setting must return the
same tokens as ``none`` in a round, or the script fails. ``--budgets 18,36,54,72`` gives the
prompts these per-request token budgets in turn (``RolloutRequest.max_new_tokens``), a batch whose rows
end at very different steps, as long-tailed response lengths do.

    python benchmarks/rollout_compaction.py --checkpoint <sft run_dir>/export --repeats 5 \\
        --out benchmarks/results/rollout_compaction.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, median, write_json
from rollout_backends import QUICK_BATCH_OVERRIDES, batch_settings, tiny_agapo_batch

ROOT = Path(__file__).resolve().parents[1]


def parse_fractions(text: str) -> list[float | None]:
    """``none,0.25`` -> [None, 0.25]."""
    out: list[float | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(None if item == "none" else float(item))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(ROOT / "recipes/tiny/agapo.yaml"))
    parser.add_argument("--checkpoint", default=None, help="SFT export (default: the recipe's tiny model)")
    parser.add_argument("--fractions", default="none,0.25,0.01", help="compact_fraction settings; none = off")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budgets", default=None, help="per-request max_new_tokens in turn, e.g. 18,36,54,72"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/kexaone-bench-compaction")
    parser.add_argument("--quick", action="store_true", help="2 prompts x 4 samples x 12 tokens, 1 round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from kexaone_align.runtime.rollout.hf import HFRolloutBackend

    torch.set_num_threads(args.threads)
    overrides = QUICK_BATCH_OVERRIDES if args.quick else []
    repeats = 1 if args.quick else args.repeats
    fractions = parse_fractions(args.fractions)
    names = ["none" if f is None else str(f) for f in fractions]
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    path, requests, sampling, recipe = tiny_agapo_batch(
        Path(args.recipe), ckpt, Path(args.workdir), overrides
    )
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else []
    if budgets:
        requests = [
            dataclasses.replace(r, max_new_tokens=budgets[i % len(budgets)]) for i, r in enumerate(requests)
        ]
    base = HFRolloutBackend(path, dtype="float32", max_batch_size=recipe.rollout.batch_size)
    backends = {
        name: HFRolloutBackend.from_model(base.model, max_batch_size=base.max_batch_size, compact_fraction=f)
        for name, f in zip(names, fractions, strict=True)
    }
    for backend in backends.values():  # warm-up (allocator, first-call overheads)
        backend.generate(requests, dataclasses.replace(sampling, seed=sampling.seed + 10_000))
    rounds = []
    for r in range(repeats):
        seeded = dataclasses.replace(sampling, seed=sampling.seed + r)
        order = names[r % len(names) :] + names[: r % len(names)]
        row, tokens_of = {}, {}
        for name in order:
            backend = backends[name]
            t0 = time.perf_counter()
            samples = backend.generate(requests, seeded)
            seconds = time.perf_counter() - t0
            tokens = sum(len(s.token_ids) for s in samples)
            tokens_of[name] = [s.token_ids for s in samples]
            row[name] = {
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
                "decode_row_steps": backend.decode_row_steps,
            }
        lengths = sorted(len(t) for t in tokens_of[names[0]])
        row["response_length_min_median_max"] = [lengths[0], lengths[len(lengths) // 2], lengths[-1]]
        for name in names[1:]:
            if tokens_of[name] != tokens_of[names[0]]:
                sys.exit(
                    f"rollout_compaction: setting {name} sampled other tokens than {names[0]} in round {r}"
                )
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{n} {row[n]['tokens_per_s']} tok/s" for n in names), flush=True)
    rates = {n: median([x[n]["tokens_per_s"] for x in rounds]) for n in names}
    result = {
        "benchmark": "rollout_compaction",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            **batch_settings(args.recipe, path, requests, sampling),
            "max_batch_size": recipe.rollout.batch_size,
            "torch_threads": args.threads,
            "request_budgets": budgets or None,
            "fractions": names,
            "order": "interleaved, rotated per round; warm-up call per setting",
        },
        "rounds": rounds,
        "median_tokens_per_s": rates,
        "speedup_over_none": {n: round(rates[n] / rates["none"], 3) for n in names}
        if "none" in rates
        else None,
    }
    print(f"median tokens/s: {rates}; over none: {result['speedup_over_none']}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
