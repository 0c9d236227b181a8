"""The tiny tool recipe end to end at a small size: SFT on calculator traces, then AGAPO whose rollouts are
multi-turn calculator episodes on a Ray rollout worker (episode rewards, tool metrics, masked batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kexaone_align.config import load_recipe
from kexaone_align.data.tiny_tools import generate_tool_prompts, generate_tool_sft_rows
from kexaone_align.errors import KexaoneError
from kexaone_align.stages import run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def test_tools_recipes_validate():
    recipe = load_recipe(TINY / "tools_agapo.yaml")
    assert recipe.data.generator == "tiny_tools" and recipe.tools.max_turns == 3


def test_tool_rows_follow_operand_digits_and_split():
    prompts = generate_tool_prompts(50, 0, "heldout", operand_digits=[3, 2])
    for row in prompts:
        a, b = (int(x) for x in row["metadata"]["problem"].split(" * "))
        assert 100 <= a <= 999 and 10 <= b <= 99 and row["reference"] == str(a * b)
    train = {r["metadata"]["problem"] for r in generate_tool_prompts(400, 0)}  # default 2x2 digits
    held = {r["metadata"]["problem"] for r in generate_tool_prompts(200, 0, "heldout")}
    assert len(train) == 400 and len(held) == 200 and not train & held
    assert all(len(p.split(" * ")[0]) == 2 for p in train)
    rows = generate_tool_sft_rows(300, 0, tool_skip=0.0, copy_noise=0.0)
    answers = [r["messages"][-1]["content"] for r in rows]
    assert answers == [f"The answer is \\boxed{{{r['metadata']['answer']}}}." for r in rows]
    noisy = generate_tool_sft_rows(1000, 0, tool_skip=0.3, copy_noise=0.2)
    skips = [r for r in noisy if r["metadata"]["skip"]]
    slips = [r for r in noisy if r["metadata"]["noisy"]]
    assert all(len(r["messages"]) == 2 for r in skips) and all(len(r["messages"]) == 4 for r in slips)
    assert 0.25 < len(skips) / 1000 < 0.35 and 0.1 < len(slips) / 1000 < 0.18
    assert all(r["metadata"]["answer"] not in r["messages"][-1]["content"] for r in skips + slips)


@pytest.mark.parametrize("digits", [[1, 2], [2], [2, 7], [2.0, 2]])
def test_tool_rows_refuse_bad_operand_digits(digits):
    with pytest.raises(KexaoneError, match="operand_digits"):
        generate_tool_prompts(4, 0, operand_digits=digits)


def test_tool_prompts_refuse_more_distinct_problems_than_exist():
    with pytest.raises(KexaoneError, match="distinct heldout prompts"):
        generate_tool_prompts(1000, 0, "heldout")


@pytest.mark.slow
def test_tiny_tools_pipeline_runs_episodes(tmp_path: Path):
    """A short SFT (60 of the full recipe's 500 steps) already writes well-formed calculator calls in most
    held-out episodes; AGAPO then plays multi-turn episodes and trains on them. Learning to copy the
    numbers (the pass rate) takes ~300 SFT steps: the README measures the full recipe."""
    small = ["logging.progress_bar=false", "logging.plots=false"]
    stages = [
        {"recipe": str(TINY / "tools_sft.yaml"),
         "overrides": [*small, "sft.max_steps=60", "data.num_train=400", "data.num_eval=2"]},
        {"recipe": str(TINY / "tools_agapo.yaml"),
         "overrides": [*small, "agapo.steps=2", "data.num_train=16", "data.num_eval=16", "agapo.group_size=4",
                       "agapo.prompts_per_step=4", "agapo.zero_variance_filter=false"]},
    ]  # fmt: skip
    path = tmp_path / "tools.yaml"
    recipe = {"stage": "pipeline", "name": "t", "pipeline": stages, "run_dir": str(tmp_path / "run")}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    summary = run_recipe(load_recipe(path))
    agapo = summary["stages"]["agapo"]
    before = agapo["eval_before"]
    assert before["tools/episodes"] == 16.0
    # measured 0.75 calls and 0.19 errors per episode: most calls already parse and evaluate
    calls, errors = before["tools/tool_calls"], before["tools/tool_errors"]
    assert calls >= 0.5 and errors <= 0.5 * calls
    assert 1.0 < before["tools/turns"] <= 3.0  # a call, its tool turn, then a final answer turn
    assert 0.0 <= agapo["eval_after"]["tools/pass_rate/calculator"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "01_agapo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tools/turns" in r]
    assert len(steps) == 2 and all(r["tools/episodes"] == 16.0 and r["tools/tool_calls"] > 0 for r in steps)
    assert all("skipped" not in r and r["learner_tokens"] > 0 for r in steps)  # each step trained
