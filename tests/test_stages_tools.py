"""The tiny tool recipe end to end at a small size: SFT on calculator traces, then AGAPO whose rollouts are
multi-turn calculator episodes on a Ray rollout worker (episode rewards, tool metrics, masked batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kexaone_align.config import load_recipe
from kexaone_align.stages import run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def test_tools_recipes_validate():
    recipe = load_recipe(TINY / "tools_agapo.yaml")
    assert recipe.data.generator == "tiny_tools" and recipe.tools.max_turns == 3


@pytest.mark.slow
def test_tiny_tools_pipeline_runs_episodes(tmp_path: Path):
    small = ["logging.progress_bar=false", "logging.plots=false"]
    stages = [
        {"recipe": str(TINY / "tools_sft.yaml"),
         "overrides": [*small, "sft.max_steps=3", "data.num_train=24", "data.num_eval=2"]},
        {"recipe": str(TINY / "tools_agapo.yaml"),
         "overrides": [*small, "agapo.steps=2", "data.num_train=16", "data.num_eval=4", "agapo.group_size=2",
                       "agapo.prompts_per_step=4", "agapo.eval_samples_per_prompt=1",
                       "agapo.zero_variance_filter=false", "rollout.max_new_tokens=48"]},
    ]  # fmt: skip
    path = tmp_path / "tools.yaml"
    recipe = {"stage": "pipeline", "name": "t", "pipeline": stages, "run_dir": str(tmp_path / "run")}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    summary = run_recipe(load_recipe(path))
    agapo = summary["stages"]["agapo"]
    assert agapo["eval_before"]["tools/episodes"] == 4.0
    assert 0.0 <= agapo["eval_after"]["tools/pass_rate/calculator"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "01_agapo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tools/turns" in r]
    assert len(steps) == 2 and all(r["tools/episodes"] == 8.0 and r["tools/turns"] >= 1 for r in steps)
