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


@pytest.mark.slow
def test_pipeline_chains_stages_through_exports_and_skips_finished_ones_on_rerun(tmp_path: Path) -> None:
    path = write_pipeline(
        tmp_path,
        [
            {"recipe": str(SFT_RECIPE), "overrides": FAST},
            {"recipe": str(SFT_RECIPE), "overrides": [*FAST, "sft.lr=1e-4"]},
        ],
    )
    summary = run_recipe(load_recipe(path))
    first, second = tmp_path / "pipe" / "00_sft", tmp_path / "pipe" / "01_sft"
    assert list(summary["stages"]) == ["sft", "01_sft"]
    assert summary["stages"]["sft"]["export"] == str(first / "export")
    assert summary["export"] == str(second / "export")
    # The second stage started from the first one's export, not from a fresh tiny model.
    resolved = yaml.safe_load((second / "recipe.resolved.yaml").read_text())
    assert resolved["model"]["source"] == "pretrained"
    assert resolved["model"]["path"] == str(first / "export")
    assert not (second / "init").exists()
    on_disk = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert set(on_disk["stages"]) == {"sft", "01_sft"} and on_disk["wall_seconds"] > 0
    assert "eval_loss" in on_disk["stages"]["01_sft"]["eval"]

    again = run_recipe(load_recipe(path))
    assert all(stage.get("skipped") for stage in again["stages"].values())
    assert again["stages"]["01_sft"]["eval"] == summary["stages"]["01_sft"]["eval"]
