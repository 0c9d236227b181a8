"""Summaries of the RL time-to-accuracy runs (``rl_time_to_accuracy.py``): time to a target accuracy,
per-arm medians, TRL/arm ratios, and the same per seed. Pure functions over the runs' JSON rows."""

from __future__ import annotations

from typing import Any

from _common import median

SYSTEMS = ("ours", "trl")


def time_to_target(curve: list[dict[str, float]], target: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches ``target`` (None: never)."""
    for point in curve:
        if point["accuracy"] >= target - 1e-12:
            return float(point["train_seconds"])
    return None


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def summarize(runs: list[dict[str, Any]], target: float, arms: tuple[str, ...] = SYSTEMS) -> dict[str, Any]:
    """Per-arm medians and TRL/arm ratios of medians (time to target only if every run reached it).

    ``ratio_trl_over_ours`` compares with the ``ours`` arm; every other arm of ours gets its own
    ``ratio_trl_over_<arm>`` and ``speedup_time_to_target_<arm>``.
    """
    keys = ("train_seconds", "steps_per_minute", "learner_tokens_per_s", "rollout_tokens_per_s",
            "rollout_seconds", "learner_seconds", "other_seconds", "learner_steps")  # fmt: skip
    out: dict[str, Any] = {}
    for system in arms:
        mine = [r for r in runs if r["system"] == system]
        times = [r["time_to_target_s"] for r in mine]
        out[system] = {k: _median_or_none([r[k] for r in mine]) for k in keys}
        out[system]["reached_target"] = f"{sum(t is not None for t in times)}/{len(times)}"
        full = all(t is not None for t in times) and times
        out[system]["time_to_target_s"] = median(times) if full else None
        out[system]["final_accuracy"] = _median_or_none([r["curve"][-1]["accuracy"] for r in mine])
    for arm in arms:
        if arm == "trl" or "trl" not in arms:
            continue
        ratios: dict[str, float | None] = {}
        for k in ("time_to_target_s", *keys):
            a, b = out["trl"][k], out[arm][k]
            ratios[k] = a / b if a is not None and b else None
        out[f"ratio_trl_over_{arm}"] = ratios
        out["speedup_time_to_target" + ("" if arm == "ours" else f"_{arm}")] = ratios["time_to_target_s"]
    out["target_accuracy"] = target
    return out


def summarize_seeds(
    runs: list[dict[str, Any]], targets: dict[int, float], arms: tuple[str, ...] = SYSTEMS
) -> dict[str, Any]:
    """Medians and TRL/arm ratios over every run (all seeds), plus the same per seed.

    Every run carries ``seed`` and a ``time_to_target_s`` against its own seed's target. Over all seeds,
    ``ratio_trl_over_<arm>`` is the ratio of medians (as in :func:`summarize`), and
    ``per_seed_ratio_time_to_target_<arm>`` lists each seed's ratio with their median alongside.
    """
    seeds = sorted(targets)
    out = summarize(runs, float("nan"), arms)
    out["target_accuracy"] = {str(seed): targets[seed] for seed in seeds}
    out["per_seed"] = {
        str(seed): summarize([r for r in runs if r["seed"] == seed], targets[seed], arms) for seed in seeds
    }
    for arm in arms:
        if arm == "trl" or "trl" not in arms:
            continue
        per_seed = [out["per_seed"][str(seed)][f"ratio_trl_over_{arm}"]["time_to_target_s"] for seed in seeds]
        out[f"per_seed_ratio_time_to_target_{arm}"] = per_seed
        full = all(r is not None for r in per_seed)
        out[f"median_per_seed_ratio_time_to_target_{arm}"] = median(per_seed) if full else None
    return out
