"""Pool RL time-to-accuracy results over disjoint seeds: one summary over every seed of several runs.

Each input is a JSON written by ``rl_time_to_accuracy.py``. They must measure the same thing: same
checkpoint, recipe, overrides, steps, evaluation schedule, target gain, TRL settings and arms, on the
same machine kind (CPU model and core count), and their seeds must not overlap (a seed run twice is a
repeat, not a new seed). Arms are pooled where every input ran them (each with the same overrides;
``ours`` and ``trl`` always). Every run keeps its own seed's target; the pooled summary is computed with
the same functions as a single run's (``_tta_summary.summarize_seeds``), so the per-seed ratios
and their median cover all seeds.

    python benchmarks/rl_time_to_accuracy_pool.py benchmarks/results/a.json benchmarks/results/b.json \
        --out benchmarks/results/pooled.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, write_json
from _tta_summary import summarize_seeds

# settings that must agree between pooled results (seeds and the per-seed targets may differ)
SAME_SETTINGS = ("recipe", "steps", "eval_every", "num_eval", "repeats", "trl_threads", "trl_micro_batch",
                 "quick")  # fmt: skip
SAME_MACHINE = ("cpu_model", "nproc")


class PoolError(ValueError):
    """Inputs that cannot be pooled, named."""


def _overrides_without_seed(settings: dict[str, Any]) -> list[str]:
    return [o for o in settings["overrides"] if not o.startswith("seed=")]


def pool(results: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The pooled payload of ``results`` (loaded JSONs; ``names`` label them in errors)."""
    if len(results) < 2:
        raise PoolError("give at least two results to pool")
    first, first_name = results[0], names[0]
    for result, name in zip(results, names, strict=True):
        if result.get("benchmark") != "rl_time_to_accuracy":
            raise PoolError(f"{name} is not an rl_time_to_accuracy result")
        for key in SAME_SETTINGS:
            if result["settings"][key] != first["settings"][key]:
                raise PoolError(f"{name} and {first_name} differ in settings.{key}")
        if _overrides_without_seed(result["settings"]) != _overrides_without_seed(first["settings"]):
            raise PoolError(f"{name} and {first_name} differ in their recipe overrides")
        if result["settings"]["target"]["gain"] != first["settings"]["target"]["gain"]:
            raise PoolError(f"{name} and {first_name} differ in the target gain")
        if result["settings"]["checkpoint"] != first["settings"]["checkpoint"]:
            raise PoolError(f"{name} and {first_name} start from different checkpoints")
        for key in SAME_MACHINE:
            if result["machine"][key] != first["machine"][key]:
                raise PoolError(f"{name} ran on another machine kind than {first_name} ({key})")
    arms = tuple(a for a in first["settings"]["arms"] if all(a in r["settings"]["arms"] for r in results))
    if "ours" not in arms or "trl" not in arms:
        raise PoolError(f"the results share the arms {list(arms)}: pooling needs 'ours' and 'trl' in each")
    for result, name in zip(results, names, strict=True):
        for arm in arms:
            if result["settings"]["arms"][arm] != first["settings"]["arms"][arm]:
                raise PoolError(f"arm {arm!r} is defined differently in {name} and {first_name}")
    seen: dict[int, str] = {}
    for result, name in zip(results, names, strict=True):
        for seed in result["settings"]["seeds"]:
            if seed in seen:
                raise PoolError(f"seed {seed} is in both {seen[seed]} and {name}: pool disjoint seeds")
            seen[seed] = name
    runs = [run for result in results for run in result["runs"] if run["system"] in arms]
    targets = {int(seed): float(t) for r in results for seed, t in r["summary"]["target_accuracy"].items()}
    summary = summarize_seeds(runs, targets, arms)
    summary["before_rl_identical_across_arms_within_each_seed"] = all(
        r["summary"].get("before_rl_identical_across_arms_within_each_seed", False) for r in results
    )
    sources = [
        {
            "file": name,
            "command": r["command"],
            "git_commit": r["machine"].get("git_commit"),
            "seeds": r["settings"]["seeds"],
            "utc": r["machine"].get("utc"),
        }
        for r, name in zip(results, names, strict=True)
    ]
    settings = {k: first["settings"][k] for k in SAME_SETTINGS}
    settings.update(
        seeds=sorted(targets),
        target_gain=first["settings"]["target"]["gain"],
        arms={arm: first["settings"]["arms"][arm] for arm in arms},
    )
    return {
        "benchmark": "rl_time_to_accuracy",
        "pooled_from": sources,
        "machine": {k: first["machine"][k] for k in SAME_MACHINE},
        "settings": settings,
        "summary": summary,
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", help="rl_time_to_accuracy.py result JSONs with disjoint seeds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        if len(args.inputs) < 2:
            raise PoolError("give at least two results to pool")
        results = []
        for name in args.inputs:
            try:
                results.append(json.loads(Path(name).read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise PoolError(f"cannot read {name}: {exc}") from exc
        payload = pool(results, args.inputs)
    except PoolError as exc:
        sys.exit(f"rl_time_to_accuracy_pool: {exc}")
    write_json(args.out, {"command": command_line(), **payload})
    summary = payload["summary"]
    for arm in payload["settings"]["arms"]:
        key = f"median_per_seed_ratio_time_to_target_{arm}"
        if key in summary:
            print(f"{arm}: median per-seed TRL/{arm} time to target {summary[key]}, "
                  f"per seed {summary[f'per_seed_ratio_time_to_target_{arm}']}")  # fmt: skip


if __name__ == "__main__":
    main()
