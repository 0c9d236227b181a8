"""The pipeline runner: stage chaining through exports, per-stage and pipeline summaries, missing stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from kexaone_align import cli
from kexaone_align.config import load_recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.stages import run_recipe, stage_module

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes" / "tiny" / "sft.yaml"
FAST = [
    "sft.max_steps=2",
    "sft.batch_size=8",
    "data.num_train=32",
    "data.num_eval=2",
    "logging.progress_bar=false",
    "logging.plots=false",
]


def write_pipeline(tmp_path: Path, stages: list[dict]) -> Path:
    path = tmp_path / "pipeline.yaml"
    recipe = {
        "stage": "pipeline",
        "name": "test-pipeline",
        "pipeline": stages,
        "run_dir": str(tmp_path / "pipe"),
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_missing_stage_module_is_a_clear_user_error_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stage package that is not installed: importing it fails exactly as a missing file does.
    monkeypatch.setitem(sys.modules, "kexaone_align.stages.grouper", None)
    with pytest.raises(KexaoneError, match="stage 'grouper' is not available"):
        stage_module("grouper")
    path = write_pipeline(
        tmp_path,
        [
            {"recipe": str(SFT_RECIPE), "overrides": FAST},
            {"recipe": str(ROOT / "recipes" / "tiny" / "grouper.yaml")},
        ],
    )
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "grouper" in err and "not available" in err and "Traceback" not in err
    assert not (tmp_path / "pipe" / "00_sft" / "metrics.jsonl").exists()  # SFT did not start


def test_unknown_stage_name_is_rejected() -> None:
    with pytest.raises(KexaoneError, match="unknown stage"):
        stage_module("dpo")


class RecordingStage:
    """Stands in for a later stage module: records the recipe it was given, exports nothing new."""

    def __init__(self) -> None:
        self.recipes: list = []

    def run(self, recipe) -> dict:
        self.recipes.append(recipe)
        summary = {"stage": recipe.stage, "eval_before": {"accuracy": 0.1}, "eval_after": {"accuracy": 0.2}}
        return {**summary, "export": recipe.model.path}


@pytest.mark.slow
def test_pipeline_chains_stages_through_exports_and_skips_finished_ones_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = RecordingStage()
    monkeypatch.setitem(sys.modules, "kexaone_align.stages.agapo", later)
    path = write_pipeline(
        tmp_path,
        [
            {"recipe": str(SFT_RECIPE), "overrides": FAST},
            {"recipe": str(ROOT / "recipes" / "tiny" / "agapo.yaml")},
        ],
    )
    summary = run_recipe(load_recipe(path))
    first, second = tmp_path / "pipe" / "00_sft", tmp_path / "pipe" / "01_agapo"
    assert list(summary["stages"]) == ["sft", "agapo"]
    assert summary["stages"]["sft"]["export"] == str(first / "export")
    assert "eval_loss" in summary["stages"]["sft"]["eval"]
    # The second stage starts from the first one's export (model and tokenizer), not a fresh tiny model.
    (chained,) = later.recipes
    assert (chained.model.source, chained.model.path) == ("pretrained", str(first / "export"))
    assert chained.resolved_run_dir == second
    resolved = yaml.safe_load((second / "recipe.resolved.yaml").read_text())
    assert resolved["model"]["path"] == str(first / "export")
    on_disk = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert on_disk["stages"]["agapo"]["eval_after"] == {"accuracy": 0.2} and on_disk["wall_seconds"] > 0
    assert on_disk["stages"]["sft"]["eval"] == summary["stages"]["sft"]["eval"]

    # Re-running: the finished SFT stage is not trained again; the later stage runs again (it wrote no
    # summary.json of its own, so it does not count as finished).
    again = run_recipe(load_recipe(path))
    assert again["stages"]["sft"]["skipped"] is True
    assert again["stages"]["sft"]["eval"] == summary["stages"]["sft"]["eval"]
    assert len(later.recipes) == 2 and later.recipes[1].model.path == str(first / "export")
