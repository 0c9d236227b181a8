"""A pipeline: stage recipes run in order, each starting from the previous stage's exported policy.

Every stage module is looked up before anything runs, so a missing stage fails in seconds rather than
after an hour of SFT. With ``checkpoint.resume: auto`` (the default) a stage that already finished (its
``summary.json`` and export exist) is not run again, so re-running a pipeline after a crash continues
where it stopped; inside the interrupted stage, its own checkpoints take over.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from kexaone_align.config import Recipe, load_pipeline_stages, recipe_to_yaml, start_from_checkpoint
from kexaone_align.errors import KexaoneError
from kexaone_align.stages import stage_module
from kexaone_align.stages.common import EXPORT_DIR, SUMMARY_FILE, run_with_restarts, write_summary

logger = logging.getLogger(__name__)


def finished_summary(stage: Recipe) -> dict[str, Any] | None:
    """The summary of a stage that already ran to completion in its run_dir (None if it did not)."""
    if stage.checkpoint.resume != "auto":
        return None
    path = stage.resolved_run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    export = summary.get("export")
    if stage.checkpoint.export and not (export and (Path(export) / "config.json").is_file()):
        return None
    return summary


def _key(stage: Recipe, index: int, taken: dict[str, Any]) -> str:
    return stage.stage if stage.stage not in taken else f"{index:02d}_{stage.stage}"


def run(recipe: Recipe) -> dict[str, Any]:
    """Run every stage of a pipeline recipe; writes ``<run_dir>/summary.json`` after each stage."""
    started = time.perf_counter()
    stages = load_pipeline_stages(recipe)
    modules = [stage_module(stage.stage) for stage in stages]  # fail fast on a missing stage
    for i, stage in enumerate(stages[:-1]):
        if not stage.checkpoint.export:
            raise KexaoneError(
                f"pipeline stage {i} ({stage.stage}) has checkpoint.export: false, but stage {i + 1} "
                "starts from its export"
            )
    out: dict[str, Any] = {"name": recipe.name, "stages": {}, "wall_seconds": 0.0}
    previous: str | None = None
    for i, (stage, module) in enumerate(zip(stages, modules, strict=True)):
        if previous is not None:
            stage = start_from_checkpoint(stage, previous)
        key = _key(stage, i, out["stages"])
        done = finished_summary(stage)
        if done is not None:
            logger.warning(
                "pipeline: stage %d (%s) already finished in %s; skipping", i, key, stage.resolved_run_dir
            )
            result = {**done, "skipped": True}
        else:
            stage.resolved_run_dir.mkdir(parents=True, exist_ok=True)
            (stage.resolved_run_dir / "recipe.resolved.yaml").write_text(
                recipe_to_yaml(stage), encoding="utf-8"
            )
            result = run_with_restarts(module.run, stage)
        out["stages"][key] = result
        previous = result.get("export") or str(stage.resolved_run_dir / EXPORT_DIR)
        out["wall_seconds"] = round(time.perf_counter() - started, 2)
        write_summary(recipe.resolved_run_dir, out)
    out["export"] = previous
    write_summary(recipe.resolved_run_dir, out)
    return out
