"""In-process models: the scalar classifier RM and the transformers judge backend (plus its Ray actor)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from kexaone_align.reward_models import (
    RayJudgeBackend,
    Rubric,
    RubricDimension,
    RubricJudge,
    SequenceClassifierRM,
    TransformersJudgeBackend,
)
from kexaone_align.verifiers import Sample
from test_reward_models_tiny_kit import save_tiny_causal_lm, tiny_causal_lm, tiny_classifier

from kexaone_align.errors import KexaoneError

RUBRIC = Rubric((RubricDimension("quality", "overall quality"),), scale_min=1, scale_max=10, name="q")


def samples(n: int) -> list[Sample]:
    return [
        Sample(
            prompt=[{"role": "user", "content": f"Q{i}?" * (1 + i % 3)}],
            response="ok " * (i + 1),
            task="chat",
        )
        for i in range(n)
    ]


# -- classifier RM ---------------------------------------------------------------------------------------
def test_classifier_scores_in_unit_interval_deterministic_and_batch_invariant():
    model, tok = tiny_classifier()
    rm = SequenceClassifierRM(model, tok, batch_size=3)
    batch = samples(7)
    results = rm.score_batch(batch)
    rewards = [r.reward for r in results]
    assert all(0.0 < r < 1.0 for r in rewards)
    assert len({round(r, 6) for r in rewards}) > 1  # the model does look at the text
    one_by_one = [rm.score(s).reward for s in batch]
    assert one_by_one == pytest.approx(rewards, abs=1e-5)
    assert [r.reward for r in rm.score_batch(batch)] == pytest.approx(rewards, abs=1e-6)
    raw = results[0].details["raw_score"]
    assert results[0].reward == pytest.approx(1 / (1 + torch.exp(torch.tensor(-raw)).item()), rel=1e-6)


def test_classifier_matches_unpadded_forward_and_shift_scale():
    model, tok = tiny_classifier(seed=1)
    rm = SequenceClassifierRM(model, tok, batch_size=4)
    s = samples(4)[3]
    ids = tok(rm.text(s), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, 0].item()
    assert rm.raw_scores(samples(4))[3] == pytest.approx(expected, abs=1e-4)
    shifted = SequenceClassifierRM(model, tok, shift=expected, scale=2.0)
    assert shifted.score(s).reward == pytest.approx(0.5, abs=1e-4)


def test_classifier_loads_from_directory_and_reports_bad_input(tmp_path):
    model, tok = tiny_classifier()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    from_dir = SequenceClassifierRM(tmp_path / "rm")
    assert from_dir.score(samples(1)[0]).reward == pytest.approx(
        SequenceClassifierRM(model, tok).score(samples(1)[0]).reward, abs=1e-5
    )
    with pytest.raises(KexaoneError, match="does not exist"):
        SequenceClassifierRM(tmp_path / "missing")
    with pytest.raises(KexaoneError, match="no tokenizer"):
        SequenceClassifierRM(model)
    with pytest.raises(KexaoneError, match="label_index"):
        SequenceClassifierRM(model, tok, label_index=3)


# -- transformers judge backend --------------------------------------------------------------------------
def test_transformers_backend_batched_equals_single_and_judge_counts_garbage():
    model, tok = tiny_causal_lm()
    backend = TransformersJudgeBackend(model, tok, max_batch_size=2)
    chats = [[{"role": "user", "content": "x" * (i + 1)}] for i in range(3)]
    batched = backend.complete_batch(chats, max_tokens=5, temperature=0.0)
    assert all(isinstance(t, str) for t in batched)
    assert [
        backend.complete(c, max_tokens=5, temperature=0.0) for c in chats
    ] == batched  # left padding is exact
    judge = RubricJudge(backend, RUBRIC, retries=1, max_tokens=5)
    results = judge.score_batch(samples(3))
    assert [r.reward for r in results] == [0.0] * 3
    assert all(r.details["reason"].startswith("parse_failure") for r in results)
    assert judge.stats.parse_failures == 6 and judge.stats.requests == 6


def test_transformers_backend_loads_from_directory(tmp_path):
    path = save_tiny_causal_lm(tmp_path / "judge")
    backend = TransformersJudgeBackend(path)
    model, tok = tiny_causal_lm()
    chat = [{"role": "user", "content": "hello"}]
    assert backend.complete(chat, max_tokens=4) == TransformersJudgeBackend(model, tok).complete(
        chat, max_tokens=4
    )
    with pytest.raises(KexaoneError, match="does not exist"):
        TransformersJudgeBackend(tmp_path / "missing")


def test_importing_reward_models_does_not_import_ray():
    import subprocess

    code = "import sys, kexaone_align.reward_models; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_judge_actor_matches_in_process(tmp_path):
    import ray

    path = save_tiny_causal_lm(tmp_path / "judge")
    chats = [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "a much longer prompt"}]]
    expected = TransformersJudgeBackend(path).complete_batch(chats, max_tokens=4)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    backend = RayJudgeBackend(path, num_cpus=1, call_timeout_s=120)
    try:
        assert backend.complete_batch(chats, max_tokens=4) == expected
        assert backend.complete(chats[0], max_tokens=4) == expected[0]
    finally:
        backend.close()
        if started:
            ray.shutdown()
