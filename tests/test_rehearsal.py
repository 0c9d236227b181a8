"""The CPU dress rehearsal of the 236B pipeline: the fitted recipe, and one full run with kill-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kexaone_align.config import load_pipeline_stages, load_recipe
from kexaone_align.rehearsal import rehearse, scaled_architecture, write_rehearsal

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "recipes/k-exaone-236b/pipeline.yaml"


def test_rehearsal_keeps_the_cluster_recipe_and_fits_it_to_cpu(tmp_path):
    path = write_rehearsal(PIPELINE, tmp_path)
    stages = load_pipeline_stages(load_recipe(path))
    assert [s.stage for s in stages] == ["sft", "agapo", "grouper"]
    for stage in stages:
        assert stage.learners.num_learners == 2 and stage.learners.zero_stage == 3
        assert stage.cluster.simulated_gpus and stage.cluster.gpus_per_node == 4
        assert stage.cluster.placement == "disaggregated", "the recipe's layout is kept"
        assert stage.checkpoint.every_steps == 1
    agapo, grouper = stages[1], stages[2]
    assert agapo.rollout.backend == "vllm" and agapo.rollout.weight_sync_bucket_mb == 1
    assert (
        agapo.agapo.is_cap == 2.0 and agapo.verifiers == load_recipe(PIPELINE.parent / "agapo.yaml").verifiers
    )
    assert grouper.grouper.reward.judge.backend == "local", "the HTTP judge is replaced by a local one"
    assert set(grouper.grouper.reward.per_task) == {
        "chat",
        "safety",
        "creative_writing",
        "ifeval",
        "tool_use",
    }
    doc = yaml.safe_load(path.read_text())
    assert all(Path(e["recipe"]).is_file() for e in doc["pipeline"])

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "assets/checkpoint")
    assert config.layer_types == ["sliding_attention"] * 3 + ["full_attention"] + [
        "sliding_attention"
    ] * 3 + ["full_attention"], "3:1 sliding/global"
    assert config.mlp_layer_types[0] == "dense" and set(config.mlp_layer_types[1:]) == {"sparse"}
    assert config.num_shared_experts == 1 and config.head_dim == 32
    arch = scaled_architecture(stages[0])
    assert arch["num_experts_per_tok"] == 4 and arch["num_experts"] == 8, (
        "top-k routing kept (8 of 128 -> 4 of 8)"
    )


@pytest.mark.slow
def test_rehearsal_runs_the_236b_pipeline_with_a_kill_and_resume(tmp_path):
    summary = rehearse(PIPELINE, tmp_path, kill_stage=1, timeout_s=1500)
    facts = summary["rehearsal"]
    assert facts["killed"], "the run was killed once AGAPO had a checkpoint"
    stages = summary["stages"]
    assert stages["sft"].get("skipped") is True, "the finished stage is not run again"
    assert stages["agapo"]["resumed_from"], "the killed stage resumed from its checkpoint"
    assert stages["agapo"]["policy_version"] == 3
    assert stages["grouper"]["sampled_prompts"] >= 4
    for key in ("agapo", "grouper"):
        assert Path(stages[key]["export"], "config.json").is_file()
    # AGAPO's batches mixed tool episodes (calculator, stateful orders) on the vLLM engines with plain rows
    rows = [json.loads(line) for p in tmp_path.rglob("metrics.jsonl") for line in p.read_text().splitlines()]
    tool_steps = [r for r in rows if r.get("stage") == "agapo" and "tools/turns" in r]
    assert tool_steps and all(r["tools/turns"] >= 1 for r in tool_steps)
    assert any(k.startswith("tools/pass_rate/") for r in tool_steps for k in r)
