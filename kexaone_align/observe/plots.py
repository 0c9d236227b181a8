"""PNG plots of a run, drawn from ``metrics.jsonl``: one figure per metric family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Metric families worth a picture; a plot is drawn only for keys the run actually logged. An entry
# ending in "/" stands for every key with that prefix (e.g. one reward curve per task).
PLOT_GROUPS: dict[str, list[str]] = {
    "reward": ["reward/", "reward_mean", "eval_accuracy", "eval_reward", "eval_before/", "eval_after/"],
    "loss": ["loss", "eval_loss"],
    "importance_ratio": [
        "is_ratio_mean",
        "is_ratio_min",
        "is_ratio_max",
        "is_truncated_frac",
        "mismatch_kl_k3",
    ],
    "zero_variance": ["zero_variance_frac"],
    "throughput": ["rollout/tokens_per_s", "rollout_tokens_per_s", "learner_tokens_per_s"],
    "weight_sync": ["weight_sync/seconds", "weight_sync/gb_per_s"],
}


def _group_keys(spec: list[str], logged: list[str]) -> list[str]:
    keys: list[str] = []
    for entry in spec:
        matches = [k for k in logged if k.startswith(entry)] if entry.endswith("/") else [entry]
        keys.extend(
            k for k in matches if k not in keys and not k.endswith(("num_samples", "response_length"))
        )
    return keys


def plot_metrics(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``<stage>_<group>.png`` for every (stage, group) with data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    stages = sorted({str(r.get("stage")) for r in rows})
    for stage in stages:
        stage_rows = [r for r in rows if str(r.get("stage")) == stage]
        logged = sorted({k for r in stage_rows for k in r})
        for group, spec in PLOT_GROUPS.items():
            keys = _group_keys(spec, logged)
            series = {
                key: [(r["step"], r[key]) for r in stage_rows if isinstance(r.get(key), int | float)]
                for key in keys
            }
            series = {k: v for k, v in series.items() if v}
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for key, points in series.items():
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=key)
            ax.set_xlabel("step")
            ax.set_title(f"{stage}: {group}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{stage}_{group}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
