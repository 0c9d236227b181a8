"""The vLLM backend around the engine, with fakes shaped like vLLM's objects: argument building, output
conversion, version bookkeeping and the calls made. The real engine is in ``test_rollout_vllm_engine.py``.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from kexaone_align.errors import KexaoneError, MissingExtraError
from kexaone_align.runtime.rollout.base import RolloutBackend, RolloutRequest, SamplingConfig
from kexaone_align.runtime.rollout.vllm import (
    WORKER_EXTENSION,
    VLLMRolloutBackend,
    import_vllm,
    request_output_to_samples,
    sampling_params_kwargs,
    vllm_engine_kwargs,
)
from kexaone_align.runtime.rollout.vllm_ext import checkpoint_names, unpack_bucket
from kexaone_align.runtime.rollout.worker import make_backend


# -- fakes with the documented shapes of vllm.outputs / vllm.logprobs ---------------------------------
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    text: str = ""
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def completion(index, tokens, lps, reason="length", extra_top=True):
    entries = []
    for tok, lp in zip(tokens, lps, strict=True):
        entry = {tok: Logprob(lp, rank=3)}
        if extra_top:  # vLLM may add the top-1 token next to the sampled one
            entry[tok + 1000] = Logprob(-0.01, rank=1)
        entries.append(entry)
    return CompletionOutput(index=index, token_ids=tokens, logprobs=entries, finish_reason=reason)


REQ = RolloutRequest("q1", [1, 2, 3], num_samples=2, metadata={"reasoning": True})


def test_missing_extra_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'kexaone-align\[vllm(-cpu)?\]'"):
        import_vllm()
    with pytest.raises(MissingExtraError, match="the vllm rollout backend"):
        make_backend("vllm", model_path="/nonexistent")
    with pytest.raises(KexaoneError, match="unknown rollout backend"):
        make_backend("sglang")


def test_engine_kwargs_follow_the_recipe():
    kw = vllm_engine_kwargs("/m", tensor_parallel_size=8, gpu_memory_utilization=0.8, max_model_len=4096)
    assert kw["model"] == "/m" and kw["tensor_parallel_size"] == 8 and kw["max_model_len"] == 4096
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert kw["worker_extension_cls"] == WORKER_EXTENSION
    assert "speculative_config" not in kw
    mtp = vllm_engine_kwargs("/m", enable_mtp=True, num_speculative_tokens=2)
    assert mtp["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 2}
    with pytest.raises(KexaoneError, match="tensor_parallel_size"):
        vllm_engine_kwargs("/m", tensor_parallel_size=0)
    with pytest.raises(KexaoneError, match="gpu_memory_utilization"):
        vllm_engine_kwargs("/m", gpu_memory_utilization=1.5)


def test_worker_extension_is_importable_by_qualified_name():
    module, _, name = WORKER_EXTENSION.rpartition(".")
    ext = getattr(importlib.import_module(module), name)
    methods = ("kexaone_begin_update", "kexaone_load_bucket", "kexaone_finish_update",
               "kexaone_join_sync_group", "kexaone_receive_weights")  # fmt: skip
    for method in methods:
        assert callable(getattr(ext, method))


def test_sampling_params_kwargs():
    sampling = SamplingConfig(max_new_tokens=64, stop_token_ids=(53,), seed=4)
    kw = sampling_params_kwargs(sampling, REQ)
    assert kw["n"] == 2 and kw["temperature"] == 1.0 and kw["top_p"] == 0.95 and kw["max_tokens"] == 64
    assert kw["stop_token_ids"] == [53] and kw["logprobs"] == 0
    assert kw["seed"] == sampling_params_kwargs(sampling, REQ)["seed"]
    assert "top_k" not in kw
    assert sampling_params_kwargs(SamplingConfig(top_k=50), REQ)["top_k"] == 50
    other = RolloutRequest("q2", [1], num_samples=2)
    assert kw["seed"] != sampling_params_kwargs(sampling, other)["seed"]


def test_request_output_conversion():
    out = RequestOutput(
        "0",
        [1, 2, 3],
        [completion(1, [7, 53], [-0.5, -0.25], "stop"), completion(0, [9, 9, 9], [-1.0, -2.0, -3.0])],
    )
    samples = request_output_to_samples(out, REQ, policy_version=7)
    assert [s.sample_index for s in samples] == [0, 1]
    assert samples[0].token_ids == [9, 9, 9] and samples[0].logprobs == [-1.0, -2.0, -3.0]
    assert samples[0].finish_reason == "length"
    assert samples[1].token_ids == [7, 53] and samples[1].logprobs == [-0.5, -0.25]
    assert samples[1].finish_reason == "stop"
    assert all(s.policy_version == 7 and s.prompt_token_ids == [1, 2, 3] for s in samples)
    assert samples[0].metadata == {"reasoning": True}


@pytest.mark.parametrize(
    "outputs,match",
    [
        ([CompletionOutput(0, [5], None, "stop"), completion(1, [5], [-1.0])], "no logprobs"),
        ([completion(0, [5], [-1.0], "abort"), completion(1, [5], [-1.0])], "abort"),
        ([completion(0, [5], [-1.0])], "expected 2"),
        (
            [CompletionOutput(0, [5], [{6: Logprob(-1.0)}], "stop"), completion(1, [5], [-1.0])],
            "sampled token",
        ),
        ([CompletionOutput(0, [5, 6], [{5: Logprob(-1.0)}], "stop"), completion(1, [5], [-1.0])], "entries"),
    ],
)
def test_request_output_conversion_refuses_bad_outputs(outputs, match):
    with pytest.raises(KexaoneError, match=match):
        request_output_to_samples(RequestOutput("0", [1, 2, 3], outputs), REQ, policy_version=0)


# -- the backend against a fake engine ----------------------------------------------------------------
@dataclass
class FakeLLM:
    calls: list[tuple] = field(default_factory=list)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params))
        outs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params, strict=True)):
            comps = [completion(k, [10 + k, 11], [-0.1 * (k + 1), -0.2]) for k in range(params.kwargs["n"])]
            outs.append(RequestOutput(str(i), prompt["prompt_token_ids"], comps))
        return outs

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up",))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    module.SamplingParams = SamplingParams
    module.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_backend_generate_and_weight_updates_against_fake_engine(fake_vllm):
    llm = FakeLLM()
    backend = VLLMRolloutBackend.from_llm(llm, tensor_parallel_size=2, enable_sleep_mode=True)
    assert isinstance(backend, RolloutBackend)
    reqs = [REQ, RolloutRequest("q2", [4, 5], num_samples=1)]
    samples = backend.generate(reqs, SamplingConfig(max_new_tokens=4))
    assert [(s.request_id, s.sample_index) for s in samples] == [("q1", 0), ("q1", 1), ("q2", 0)]
    assert llm.calls[0][1][1] == {"prompt_token_ids": [4, 5]}
    assert backend.last_metrics["rollout/generated_tokens"] == 6

    bucket = [
        ("model.embed_tokens.weight", torch.zeros(2, 2)),
        ("model.layers.1.mlp.gate.e_score_correction_bias", torch.ones(3)),
    ]
    backend.update_weights(1, bucket)
    backend.update_weights(1, bucket[:1])
    assert backend.policy_version == 0, "a version is published only by finish_update"
    backend.finish_update(1)
    assert backend.policy_version == 1
    names = [c[0] for c in llm.calls if c[0].startswith("kexaone")]
    assert names == [
        "kexaone_begin_update",
        "kexaone_load_bucket",
        "kexaone_load_bucket",
        "kexaone_finish_update",
    ]
    metas, payload = next(c[1] for c in llm.calls if c[0] == "kexaone_load_bucket")
    assert isinstance(payload, bytes), "the multiprocess engine cannot carry tensors in collective_rpc"
    loaded = checkpoint_names(unpack_bucket(metas, payload))
    assert [n for n, _ in loaded] == [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.e_score_correction_bias",
    ]
    assert torch.equal(loaded[1][1], torch.ones(3))
    assert llm.calls[-1] == ("reset_prefix_cache",), "stale prefix-cache KV must be dropped after a sync"
    assert {s.policy_version for s in backend.generate(reqs, SamplingConfig(max_new_tokens=4))} == {1}
    with pytest.raises(KexaoneError, match="stale"):
        backend.update_weights(1, bucket)

    # collective path: a stale version still joins the broadcast (no deadlock) but does not load
    assert backend.sync_ranks() == 2
    with pytest.raises(KexaoneError, match="stale"):
        backend.receive_weights(1)
    assert llm.calls[-1] == ("kexaone_receive_weights", (1, False))
    backend.receive_weights(2)
    assert llm.calls[-2:] == [("kexaone_receive_weights", (2, True)), ("reset_prefix_cache",)]
    assert backend.policy_version == 2

    backend.release_memory()
    backend.resume()
    assert llm.calls[-2:] == [("sleep", 1), ("wake_up",)]
