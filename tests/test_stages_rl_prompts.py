"""RL prompt sets as the recipe reads them: data.max_prompt_tokens drops (and counts) long prompts, and
rollout.enable_thinking forces the chat template's mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from kexaone_align.config import load_recipe
from kexaone_align.data.chat_format import render_prompt
from kexaone_align.errors import KexaoneError
from kexaone_align.models import build_tokenizer
from kexaone_align.stages import rl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny(*overrides):
    return load_recipe(
        ROOT / "recipes/tiny/agapo.yaml", ["data.num_train=60", "data.num_eval=20", *overrides]
    )


def test_prompts_longer_than_max_prompt_tokens_are_dropped_and_counted(tokenizer):
    full_train, full_held, counts = rl.prompt_sets(tiny(), tokenizer)
    assert counts == {"dropped_long_prompts": 0, "dropped_long_eval_prompts": 0}
    lengths = sorted(len(render_prompt(tokenizer, r.messages, r.enable_thinking)) for r in full_train)
    limit = lengths[len(lengths) // 2]  # about half the prompts are longer
    train, held, counts = rl.prompt_sets(tiny(f"data.max_prompt_tokens={limit}"), tokenizer)
    assert 0 < counts["dropped_long_prompts"] < len(full_train)
    assert len(train) + counts["dropped_long_prompts"] == len(full_train)
    assert len(held) + counts["dropped_long_eval_prompts"] == len(full_held)
    assert all(len(render_prompt(tokenizer, r.messages, r.enable_thinking)) <= limit for r in train + held)
    with pytest.raises(KexaoneError, match="every training prompt is longer"):
        rl.prompt_sets(tiny("data.max_prompt_tokens=3"), tokenizer)


def test_enable_thinking_forces_the_mode_of_every_prompt(tokenizer):
    train, _, _ = rl.prompt_sets(tiny(), tokenizer)
    rows = train[:4]
    as_rows = rl.build_requests(tokenizer, rows, 2, "t")
    forced_off = rl.build_requests(tokenizer, rows, 2, "t", enable_thinking=False)
    forced_on = rl.build_requests(tokenizer, rows, 2, "t", enable_thinking=True)
    assert all(r.enable_thinking for r in rows), "tiny RL prompts are in reasoning mode"
    assert [r.prompt_token_ids for r in as_rows] == [r.prompt_token_ids for r in forced_on]
    assert all(a.prompt_token_ids != b.prompt_token_ids for a, b in zip(forced_on, forced_off, strict=True))
    recipe = tiny("rollout.enable_thinking=false")
    assert all(rl.thinking_mode(recipe, r) is False for r in rows)
