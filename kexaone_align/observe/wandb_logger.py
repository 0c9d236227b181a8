"""Weights & Biases sink: the same scalars as ``metrics.jsonl``, plus sample tables of evaluations.

Optional: ``wandb`` is imported only when a recipe sets ``logging.wandb``, and a missing package is a
``KexaoneError`` saying how to install it. The default mode is ``offline``: the run is written under
``<dir>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``; nothing touches the network.
Each stage run is one W&B run; scalars are logged as ``<stage>/<metric>`` at the stage's optimizer step
(TensorBoard's names), evaluation samples as a ``wandb.Table`` under ``<stage>/<label>_samples``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kexaone_align.errors import KexaoneError

INSTALL_HINT = "pip install 'kexaone-align[wandb]' (or pip install wandb)"


def import_wandb() -> Any:
    """The ``wandb`` module, or a ``KexaoneError`` saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise KexaoneError(
            f"logging.wandb is set but the 'wandb' package is not installed: {INSTALL_HINT}, "
            "or remove logging.wandb from the recipe"
        ) from None
    return wandb


class WandbSink:
    """One W&B run: ``log`` scalars at a step, ``log_table`` rows of dicts, ``close`` to finish."""

    def __init__(
        self, section: Any, *, run_dir: str | Path, default_name: str, config: Mapping[str, Any]
    ) -> None:
        wandb = import_wandb()
        self._wandb = wandb
        self.table_rows = int(section.table_rows)
        directory = Path(section.dir or run_dir).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(
                project=section.project,
                entity=section.entity,
                name=section.name or default_name,
                mode=section.mode,
                tags=list(section.tags),
                dir=str(directory),
                config=dict(config),
                reinit="create_new",  # never finishes a run the calling program has open
                settings=wandb.Settings(console="off"),
            )
        except Exception as exc:  # wandb raises its own types (UsageError, CommError) for bad settings
            raise KexaoneError(
                f"logging.wandb: could not start a W&B run in {section.mode!r} mode ({type(exc).__name__}: "
                f"{str(exc).strip()[:300]})"
            ) from None

    @property
    def run_dir(self) -> Path | None:
        """The W&B run's own folder (``.../wandb/offline-run-*``), None when disabled."""
        files = getattr(self._run, "dir", None)
        return Path(files).parent if files else None

    def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Every finite numeric metric (bools as 0/1) as ``<stage>/<key>`` at ``step``."""
        data = {}
        for key, value in metrics.items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, int | float) and math.isfinite(float(value)):
                data[f"{stage}/{key}"] = float(value)
        if data:
            self._run.log(data, step=int(step))

    def log_table(self, stage: str, step: int, label: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """At most ``table_rows`` rows (dicts with the same keys) as ``<stage>/<label>_samples``."""
        rows = list(rows)[: self.table_rows]
        if not rows:
            return
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self._run.log({f"{stage}/{label}_samples": table}, step=int(step))

    def close(self) -> None:
        """Finish the run (flushes everything to the offline run folder or the server)."""
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_wandb(
    section: Any, *, run_dir: str | Path, default_name: str, config: Mapping[str, Any]
) -> WandbSink | None:
    """A ``WandbSink`` for a recipe's ``logging.wandb`` section, or None when it is unset."""
    if section is None:
        return None
    return WandbSink(section, run_dir=run_dir, default_name=default_name, config=config)
