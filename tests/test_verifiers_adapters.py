"""TRL reward functions and verl compute_score functions register and grade as verifiers."""

from __future__ import annotations

import pytest
from kexaone_align.verifiers import (
    Sample,
    get_verifier,
    register_trl_reward,
    register_verl_compute_score,
    score_batch,
    to_unit_interval,
)

from kexaone_align.errors import KexaoneError


def test_trl_reward_function_receives_trl_arguments() -> None:
    seen = {}

    def accuracy_reward(prompts, completions, solution, **kwargs):
        seen.update(prompts=prompts, completions=completions, solution=solution, kwargs=kwargs)
        return [
            1.0 if c[0]["content"].strip() == s else -1.0 for c, s in zip(completions, solution, strict=True)
        ]

    register_trl_reward("kx_trl_acc", accuracy_reward, scale="rescale", bounds=(-1.0, 1.0))
    prompt = [{"role": "user", "content": "2+2?"}]
    good = Sample(prompt=prompt, response="4", reference="4", task="math", metadata={"level": 3})
    res = get_verifier("kx_trl_acc").verify(good)
    assert res.reward == 1.0 and res.details["raw"] == 1.0
    assert seen["completions"] == [[{"role": "assistant", "content": "4"}]]
    assert seen["kwargs"]["level"] == [3] and seen["kwargs"]["task"] == ["math"]
    bad = Sample(prompt=prompt, response="5", reference="4")
    assert get_verifier("kx_trl_acc").verify(bad).reward == 0.0


def test_trl_plain_text_completions_clamp_and_none() -> None:
    def length_reward(prompts, completions, **kwargs):
        return [len(c) / 4 if c else None for c in completions]

    register_trl_reward("kx_trl_len", length_reward)
    v = get_verifier("kx_trl_len")
    assert v.verify(Sample(prompt="p", response="ab")).reward == 0.5
    assert v.verify(Sample(prompt="p", response="abcdefgh")).reward == 1.0  # 2.0 clamped
    assert (
        v.verify(Sample(prompt="p", response=""))
        .details["reason"]
        .startswith("reward function returned None")
    )


def test_verl_compute_score_float_and_dict() -> None:
    calls = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        calls.append((data_source, extra_info))
        if data_source == "dict_source":
            return {"score": 0.5, "acc": True}
        return float(solution_str == ground_truth)

    register_verl_compute_score("kx_verl", compute_score)
    register_verl_compute_score("kx_verl_dict", compute_score, data_source="dict_source")
    res = get_verifier("kx_verl").verify(
        Sample(
            prompt="p", response="x", reference="x", task="gsm8k", metadata={"extra_info": {"split": "test"}}
        )
    )
    assert res.reward == 1.0 and calls[-1] == ("gsm8k", {"split": "test", "prompt": "p"})
    res = get_verifier("kx_verl_dict").verify(Sample(prompt="p", response="x", reference="y"))
    assert res.reward == 0.5 and res.details["acc"] is True


def test_adapter_failures_are_counted_errors_in_batches() -> None:
    register_verl_compute_score("kx_verl_nan", lambda *a: float("nan"))
    register_trl_reward("kx_trl_wrong_len", lambda prompts, completions, **kw: [1.0, 1.0])
    samples = [Sample(prompt="p", response="r", task="a"), Sample(prompt="p", response="r", task="b")]
    from kexaone_align.verifiers import TaskRouter

    result = score_batch(samples, TaskRouter({"a": "kx_verl_nan", "b": "kx_trl_wrong_len"}))
    assert result.rewards == [0.0, 0.0] and result.errors == 2
    assert "NaN" in result.results[0].details["reason"]
    assert "2 values for 1 completion" in result.results[1].details["reason"]


def test_to_unit_interval() -> None:
    assert to_unit_interval(-3) == 0.0 and to_unit_interval(0.3) == 0.3
    assert to_unit_interval(0, "rescale", (-1, 1)) == 0.5
    with pytest.raises(KexaoneError, match="lo < hi"):
        to_unit_interval(0, "rescale", (1, 1))
    with pytest.raises(KexaoneError, match="not a number"):
        to_unit_interval("high")
