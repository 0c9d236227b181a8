"""The transformers rollout backend: processed log-probs, stopping, determinism, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.models.attention import GQA_SDPA
from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig
from kexaone_align.runtime.rollout.hf import HFRolloutBackend
from kexaone_align.runtime.rollout.sampling import draw_tokens, processed_logprobs
from kexaone_align.runtime.rollout.tiny import save_tiny_exaone_moe, tiny_exaone_moe


@pytest.fixture(scope="module")
def model():
    return tiny_exaone_moe(seed=0)


@pytest.fixture(scope="module")
def backend(model):
    return HFRolloutBackend.from_model(model, max_batch_size=8)


# prompts of different lengths (left padding) and longer than the sliding window (8)
REQUESTS = [
    RolloutRequest("short", [1, 17, 40], num_samples=2, metadata={"reasoning": False}),
    RolloutRequest("long", [1, *range(100, 114)], num_samples=2, metadata={"reasoning": True}),
    RolloutRequest("mid", [1, 5, 6, 7, 8, 9], num_samples=1),
]


def reference_logprobs(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int = -1
) -> torch.Tensor:
    """Independent float64 numpy reference: top-k, then the smallest most-likely set reaching top_p."""
    scaled = logits.double().numpy() / temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.full_like(probs, -np.inf)
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        if top_k > 0:
            order = order[:top_k]
        q = p[order] / p[order].sum()
        keep = int(np.searchsorted(np.cumsum(q), top_p)) + 1
        out[row, order[:keep]] = np.log(q[:keep] / q[:keep].sum())
    return torch.from_numpy(out)


def full_forward_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits that predict each response token, from one uncached, unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def test_processed_logprobs_matches_reference_nucleus():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    for temperature, top_p, top_k in [
        (1.0, 0.95, -1),
        (0.6, 0.5, -1),
        (1.7, 0.9, 10),
        (1.0, 0.01, -1),
        (1, 1, 5),
    ]:
        ours = processed_logprobs(logits, temperature, top_p, top_k)
        ref = reference_logprobs(logits, temperature, top_p, top_k)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        finite = torch.isfinite(ref)
        assert torch.allclose(ours[finite].double(), ref[finite], atol=1e-5)
        assert torch.allclose(ours.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert torch.isfinite(processed_logprobs(logits, 1.0, 1.0)).all()


def test_draw_tokens_follows_the_distribution_and_skips_removed_tokens():
    probs = processed_logprobs(torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0, -6.0]]), 1.0, 0.9).exp()
    assert probs[0, -1] == 0  # outside the nucleus
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    drawn = draw_tokens(probs.expand(n, -1), u)
    freq = torch.bincount(drawn, minlength=6).double() / n
    assert freq[probs[0] == 0].sum() == 0
    assert torch.allclose(freq, probs[0].double(), atol=0.01)
    # the edges of [0, 1) land on the first and last token that carry mass
    edges = draw_tokens(probs.expand(2, -1), torch.tensor([0.0, 1.0 - 1e-7]))
    assert edges.tolist() == [0, int((probs[0] > 0).nonzero().max())]


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 0.95, -1), (0.7, 0.8, -1), (1.3, 0.9, 40)])
def test_logprobs_equal_full_forward_recomputation(model, backend, temperature, top_p, top_k):
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k, seed=11)
    samples = backend.generate(REQUESTS, sampling)
    assert [(s.request_id, s.sample_index) for s in samples] == [
        ("short", 0),
        ("short", 1),
        ("long", 0),
        ("long", 1),
        ("mid", 0),
    ]
    truncated = 0
    for s in samples:
        assert len(s.logprobs) == len(s.token_ids) > 0
        ref = reference_logprobs(
            full_forward_logits(model, s.prompt_token_ids, s.token_ids), temperature, top_p, top_k
        )
        truncated += int(torch.isinf(ref).any())
        expected = ref[torch.arange(len(s.token_ids)), torch.tensor(s.token_ids)]
        assert torch.isfinite(expected).all(), "a token outside the nucleus was sampled"
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), expected, atol=1e-4)
    assert truncated > 0, "top-p never removed a token; the test would not notice a missing filter"


def test_plain_sampling_logprobs_equal_log_softmax(model, backend):
    samples = backend.generate(REQUESTS, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5))
    for s in samples:
        logp = torch.log_softmax(full_forward_logits(model, s.prompt_token_ids, s.token_ids), dim=-1)
        expected = logp[torch.arange(len(s.token_ids)), torch.tensor(s.token_ids)]
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-4)


def first_stop(tokens: list[int], stops: set[int]) -> int | None:
    return next((i for i, t in enumerate(tokens) if t in stops), None)


def test_stop_token_ends_sample_and_is_kept(backend):
    eos = set(backend.default_stop_token_ids)
    free = backend.generate(REQUESTS, SamplingConfig(max_new_tokens=10, seed=3))
    for s in free:  # without extra stop ids only eos stops a sample
        cut = first_stop(s.token_ids, eos)
        assert (s.finish_reason, len(s.token_ids)) == (("length", 10) if cut is None else ("stop", cut + 1))
    stop_tok = free[2].token_ids[4]
    stopped = backend.generate(
        REQUESTS, SamplingConfig(max_new_tokens=10, seed=3, stop_token_ids=(stop_tok,))
    )
    for a, b in zip(free, stopped, strict=True):
        cut = first_stop(a.token_ids, eos | {stop_tok})
        if cut is None:
            assert b.finish_reason == a.finish_reason and b.token_ids == a.token_ids
        else:
            assert b.finish_reason == "stop"
            assert b.token_ids == a.token_ids[: cut + 1]
            assert b.logprobs == pytest.approx(a.logprobs[: cut + 1], abs=1e-5)
    assert stopped[2].finish_reason == "stop" and len(stopped[2].token_ids) <= 5
    assert stopped[2].token_ids[-1] == stop_tok, "the stop token is part of the sample"


def test_default_stop_is_models_eos(model):
    be = HFRolloutBackend.from_model(model)
    assert be.default_stop_token_ids == (model.config.eos_token_id,)


def test_deterministic_given_seed_and_seed_matters(backend):
    sampling = SamplingConfig(max_new_tokens=8, seed=21)
    a = backend.generate(REQUESTS, sampling)
    b = backend.generate(REQUESTS, sampling)
    c = backend.generate(REQUESTS, SamplingConfig(max_new_tokens=8, seed=22))
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    assert a[0].token_ids != a[1].token_ids, "samples of one group must differ"


def test_batched_equals_unbatched(model, backend):
    sampling = SamplingConfig(max_new_tokens=10, seed=8)
    batched = backend.generate(REQUESTS, sampling)
    single = HFRolloutBackend.from_model(model, max_batch_size=1)
    one_by_one = [s for r in REQUESTS for s in single.generate([r], sampling)]
    assert [s.token_ids for s in batched] == [s.token_ids for s in one_by_one]
    for a, b in zip(batched, one_by_one, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_samples_carry_version_metadata_and_throughput(backend):
    samples = backend.generate(REQUESTS, SamplingConfig(max_new_tokens=6, seed=1))
    assert {s.policy_version for s in samples} == {backend.policy_version}
    assert samples[0].metadata == {"reasoning": False} and samples[2].metadata == {"reasoning": True}
    m = backend.last_metrics
    assert m["rollout/generated_tokens"] == sum(len(s.token_ids) for s in samples)
    assert m["rollout/tokens_per_s"] > 0
    print(f"hf rollout tiny model: {m['rollout/tokens_per_s']:.0f} tokens/s")


def test_loads_from_saved_checkpoint(tmp_path, model):
    path = save_tiny_exaone_moe(tmp_path / "tiny", seed=0)
    loaded = HFRolloutBackend(path, max_batch_size=4)
    ids = [[1, 2, 3, 4, 5, 6]]
    assert torch.equal(loaded.logits(ids), HFRolloutBackend.from_model(model).logits(ids))
    with pytest.raises(KexaoneError, match="not found"):
        HFRolloutBackend(tmp_path / "missing")
    with pytest.raises(KexaoneError, match="dtype"):
        HFRolloutBackend(path, dtype="float64x")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_sampling_config_validation(kwargs, match):
    with pytest.raises(KexaoneError, match=match):
        SamplingConfig(**kwargs)


def test_bad_requests_are_refused(backend):
    with pytest.raises(KexaoneError, match="empty prompt"):
        RolloutRequest("x", [])
    with pytest.raises(KexaoneError, match="outside the vocabulary"):
        backend.generate([RolloutRequest("big", [1, 10**6])], SamplingConfig(max_new_tokens=1))
    with pytest.raises(KexaoneError, match="duplicate"):
        backend.generate(
            [RolloutRequest("a", [1]), RolloutRequest("a", [2])], SamplingConfig(max_new_tokens=1)
        )


def test_sampling_config_from_recipe_section():
    from kexaone_align.config.infra import RolloutConfig

    cfg = SamplingConfig.from_recipe(RolloutConfig(max_new_tokens=77, top_k=12), stop_token_ids=[5], seed=3)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (1.0, 0.95, 12, 77)
    assert cfg.stop_token_ids == (5,) and cfg.seed == 3


# requests whose rows finish at different steps: own budgets 3, 7 and 12 tokens, and one stop token
STAGGERED = [
    RolloutRequest("b3", [1, 17, 40], num_samples=2, max_new_tokens=3),
    RolloutRequest("b7", [1, *range(100, 114)], num_samples=3, max_new_tokens=7),
    RolloutRequest("b12", [1, 5, 6, 7, 8, 9], num_samples=3),
]


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_dropping_finished_rows_changes_no_sample(model, fraction):
    """Compaction leaves every token, log-prob and stop reason as decoding the full batch gives them."""
    full = HFRolloutBackend.from_model(model, max_batch_size=8, compact_fraction=None)
    compact = HFRolloutBackend.from_model(model, max_batch_size=8, compact_fraction=fraction)
    stops = (3, 7, 11, 19, 23, 29)
    for sampling in (
        SamplingConfig(max_new_tokens=12, seed=4, top_p=0.9),
        SamplingConfig(max_new_tokens=12, seed=5, stop_token_ids=stops),
    ):
        a, b = full.generate(STAGGERED, sampling), compact.generate(STAGGERED, sampling)
        assert [(s.token_ids, s.finish_reason) for s in a] == [(s.token_ids, s.finish_reason) for s in b]
        for x, y in zip(a, b, strict=True):
            assert y.logprobs == pytest.approx(x.logprobs, abs=1e-5)
        # finished rows were not decoded: fewer rows went through the model per step
        assert compact.decode_row_steps < full.decode_row_steps
    longest = max(len(s.token_ids) for s in b)
    assert full.decode_row_steps == 8 * (longest - 1)  # without compaction every row runs to the end
    for s in b:  # and the compacted samples still equal a full uncached forward of their text
        logits = full_forward_logits(model, s.prompt_token_ids, s.token_ids)
        ref = reference_logprobs(logits, sampling.temperature, sampling.top_p, sampling.top_k)
        expected = ref[torch.arange(len(s.token_ids)), torch.tensor(s.token_ids)]
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), expected, atol=1e-4)


def test_compact_fraction_is_validated(model):
    with pytest.raises(KexaoneError, match="compact_fraction"):
        HFRolloutBackend.from_model(model, compact_fraction=1.0)


def test_cpu_backend_decodes_with_unrepeated_kv_heads_and_identical_samples(tmp_path, model):
    """A CPU backend that loads its own model switches it to grouped-query SDPA (no K/V head copies);
    samples and log-probs are bit-identical to the model's own sdpa attention."""
    path = save_tiny_exaone_moe(tmp_path / "tiny", seed=0)
    loaded = HFRolloutBackend(path, max_batch_size=8)
    assert loaded.model.config._attn_implementation == GQA_SDPA
    plain = HFRolloutBackend.from_model(model, max_batch_size=8)  # a model it does not own: left alone
    assert plain.model.config._attn_implementation == "sdpa"
    sampling = SamplingConfig(max_new_tokens=10, seed=2, top_p=0.9)
    a, b = loaded.generate(REQUESTS, sampling), plain.generate(REQUESTS, sampling)
    assert [(s.token_ids, s.logprobs) for s in a] == [(s.token_ids, s.logprobs) for s in b]
