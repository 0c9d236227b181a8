"""Per-step metrics: one JSON line per step in ``metrics.jsonl`` plus TensorBoard and W&B scalars.

A run directory keeps every metric a stage logs, keyed by ``stage`` and ``step``, so plots and
``summary.json`` are derived from the JSONL file alone and a resumed run appends to it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _finite_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


class MetricsLogger:
    """Appends step metrics to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard events and a
    W&B run (``wandb``: an ``observe.wandb_logger.WandbSink``, closed with this logger)."""

    def __init__(
        self, run_dir: str | Path, *, tensorboard: bool = True, jsonl: bool = True, wandb: Any = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.wandb = wandb
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8") if jsonl else None
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        """Record one step; non-finite or non-numeric values go to JSONL only (as given)."""
        row = {"stage": stage, "step": int(step), "time": time.time(), **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row, default=_json_default) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in _finite_scalars(metrics).items():
                self._tb.add_scalar(f"{stage}/{key}", value, global_step=int(step))
            self._tb.flush()
        if self.wandb is not None:
            self.wandb.log(stage, int(step), metrics)

    def log_table(self, stage: str, step: int, label: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Sample rows (prompt, response, reward, ...) of an evaluation; only W&B keeps tables."""
        if self.wandb is not None:
            self.wandb.log_table(stage, int(step), label, rows)

    def drop_rows(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite ``metrics.jsonl`` with only the rows ``keep`` accepts (a resumed run drops what it
        redoes); a torn last line is dropped too. The other sinks stay open."""
        if self._jsonl is None or not self.jsonl_path.is_file():
            return
        self._jsonl.close()
        kept = []
        for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if keep(row):
                kept.append(line + "\n")
        self.jsonl_path.write_text("".join(kept), encoding="utf-8")
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def read_metrics(path: str | Path, stage: str | None = None) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (optionally one stage's), skipping a torn last line."""
    rows: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a crash mid-write leaves at most one torn line
        if stage is None or row.get("stage") == stage:
            rows.append(row)
    return rows
