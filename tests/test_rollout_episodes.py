"""Multi-turn tool episodes on the hf backend: token tags, log-probs against a transformers forward of the
same text, fixed seeds, mixed batches on a worker, and the learner batch, rewards and metrics."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ExaoneMoeForCausalLM

from kexaone_align.data.prompts import parse_prompt_row
from kexaone_align.models import build_tokenizer
from kexaone_align.models.tiny import tiny_config
from kexaone_align.runtime.rollout.base import RolloutRequest, RolloutSample, SamplingConfig
from kexaone_align.runtime.rollout.hf import HFRolloutBackend
from kexaone_align.runtime.rollout.sampling import processed_logprobs
from kexaone_align.runtime.rollout.worker import RolloutWorker
from kexaone_align.stages import rl

SAMPLING = SamplingConfig(max_new_tokens=90, temperature=0.8, top_p=0.9, seed=5)
FORCED = '</think>\n\n<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Loaded from a path, as in a stage: requests name that path so a worker can load it."""
    from kexaone_align.models import load_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = tiny_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    return ExaoneMoeForCausalLM(config).eval()


class ForcedFirstTurn:
    """The hf backend, except that every episode's first turn is the fixed tool call ``FORCED`` (scored with
    the model's own processed log-probs), so a random model still plays a multi-turn episode; later turns
    are sampled by the real backend."""

    def __init__(self, backend: HFRolloutBackend, tokenizer):
        self.backend, self.tok = backend, tokenizer
        self.forced = tokenizer(FORCED, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    @property
    def policy_version(self):
        return self.backend.policy_version

    def generate(self, requests, sampling):
        real = self.backend.generate([r for r in requests if not r.request_id.endswith("#t0")], sampling)
        out, pos = [], 0
        for req in requests:
            if not req.request_id.endswith("#t0"):
                out.append(real[pos])
                pos += 1
                continue
            logits = self.backend.logits([req.prompt_token_ids + self.forced])[0]
            n = len(req.prompt_token_ids)
            logp = processed_logprobs(logits[n - 1 : -1], sampling.temperature, sampling.top_p)
            lps = logp.gather(1, torch.tensor(self.forced)[:, None]).squeeze(1).tolist()
            out.append(
                RolloutSample(req.request_id, 0, req.prompt_token_ids, list(self.forced), lps, "stop", 0)
            )
        return out


def episode_request(tokenizer, rid: str, n: int = 2) -> tuple[RolloutRequest, object]:
    raw = {"id": rid, "messages": [{"role": "user", "content": "What is 12 * 7?"}], "task": "math",
           "reference": "84", "environment": "calculator"}  # fmt: skip
    row = parse_prompt_row(raw, rid)
    (req,) = rl.build_requests(tokenizer, [row], n, rid)
    return req, row


def test_multi_turn_sample_matches_a_transformers_forward(tokenizer, model):
    backend = ForcedFirstTurn(HFRolloutBackend.from_model(model), tokenizer)
    req, _ = episode_request(tokenizer, "q")
    from kexaone_align.runtime.rollout.episodes import run_episodes

    samples = run_episodes(backend, [req], SAMPLING, tokenizer)
    assert [s.sample_index for s in samples] == [0, 1]
    for s in samples:
        info = s.metadata["episode"]
        assert info["tool_calls"] == 1 and info["tool_errors"] == 0 and info["turns"] >= 2
        n_forced = len(backend.forced)
        env_text = "\n<|tool|>\n<tool_result>84</tool_result><|endofturn|>\n<|assistant|>\n<think>\n"
        n_env = len(tokenizer(env_text, add_special_tokens=False)["input_ids"])
        mask = s.policy_mask
        assert mask[:n_forced] == [1] * n_forced and mask[n_forced : n_forced + n_env] == [0] * n_env
        assert (
            set(mask[n_forced + n_env :]) == {1} and len(mask) == len(s.token_ids) <= SAMPLING.max_new_tokens
        )
        assert tokenizer.decode(s.token_ids[n_forced : n_forced + n_env]) == env_text
        assert "<tool_call>" in tokenizer.decode(s.prompt_token_ids)  # the tools are listed in the prompt
        # one uncached, unpadded forward of the whole text, processed like the sampler
        full = s.prompt_token_ids + s.token_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0].float()
        n = len(s.prompt_token_ids)
        logp = processed_logprobs(logits[n - 1 : -1], SAMPLING.temperature, SAMPLING.top_p)
        ref = logp.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1)
        got = torch.tensor(s.logprobs)
        on = torch.tensor(mask, dtype=torch.bool)
        assert torch.allclose(got[on], ref[on], atol=2e-4), (got[on] - ref[on]).abs().max()
        assert torch.all(got[~on] == 0.0)
    # the learner batch: loss (and AGAPO's 1/|o_i|) on policy tokens only, log-probs aligned with input_ids
    batch = rl.training_batch(samples, [1.0, -1.0], tokenizer.pad_token_id)
    for i, s in enumerate(samples):
        n, m = len(s.prompt_token_ids), len(s.token_ids)
        assert batch["loss_mask"][i, n : n + m].tolist() == s.policy_mask
        assert batch["loss_mask"][i].sum() == sum(s.policy_mask)
        assert batch["rollout_logprobs"][i, n : n + m].tolist() == pytest.approx(s.logprobs)


def test_a_reissued_episode_is_the_same_episode(tokenizer, model):
    backend = ForcedFirstTurn(HFRolloutBackend.from_model(model, max_batch_size=3), tokenizer)
    from kexaone_align.runtime.rollout.episodes import run_episodes

    req, _ = episode_request(tokenizer, "q")
    other, _ = episode_request(tokenizer, "other", 3)
    alone = run_episodes(backend, [req], SAMPLING, tokenizer)
    crowded = run_episodes(backend, [other, req], SAMPLING, tokenizer)[3:]
    assert [s.token_ids for s in alone] == [s.token_ids for s in crowded]
    for a, b in zip(alone, crowded, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert alone[0].token_ids != alone[1].token_ids  # the two samples use their own seeds


def test_worker_mixes_single_turn_and_episodes_in_one_call(tokenizer, model):
    worker = RolloutWorker(HFRolloutBackend.from_model(model))
    episode, _ = episode_request(tokenizer, "ep")
    plain = RolloutRequest("plain", tokenizer("hi", add_special_tokens=False)["input_ids"], 2, {"row": 1})
    samples = worker.generate([plain, episode], SamplingConfig(max_new_tokens=12, seed=1))
    assert [(s.request_id, s.sample_index) for s in samples] == [
        ("plain", 0),
        ("plain", 1),
        ("ep-0-ep", 0),
        ("ep-0-ep", 1),
    ]
    assert samples[0].policy_mask is None and "episode" not in samples[0].metadata
    assert samples[2].policy_mask is not None and samples[2].metadata["row"] == 0
    assert samples[2].metadata["episode"]["environment"] == "calculator"
    assert worker.metrics()["rollout/samples"] == 4.0


def test_rewards_and_metrics_route_per_task():
    def fake(rid, reward=None, passed=False, env="orders"):
        meta = {"row": 0}
        if reward is not None:
            meta["episode"] = {"reward": reward, "passed": passed, "environment": env, "turns": 2,
                               "tool_calls": 1, "tool_errors": 0, "env_seconds": 0.5}  # fmt: skip
        return RolloutSample(rid, 0, [1], [2], [-0.5], "stop", 0, meta)

    from kexaone_align.verifiers import Sample

    samples = [
        Sample("p", "r", None, "t", {"episode": {"reward": 1.0}}),
        Sample("p", "r", None, "t", {}),
        Sample("p", "r", None, "t", {"episode": {"reward": 0.0}}),
    ]
    seen = []
    assert rl.grade_mixed(lambda ss: seen.extend(ss) or [0.25] * len(ss), samples) == [1.0, 0.25, 0.0]
    assert len(seen) == 1
    row = parse_prompt_row({"messages": [{"role": "user", "content": "x"}], "task": "orders"}, "r")
    groups = [rl.Group(row, [fake("a", 1.0, True), fake("b", 0.0), fake("c", 1.0, True, "calc"), fake("d")])]
    metrics = rl.episode_metrics(groups)
    assert metrics["tools/episodes"] == 3 and metrics["tools/turns"] == 2.0
    assert metrics["tools/pass_rate/orders"] == 0.5 and metrics["tools/pass_rate/calc"] == 1.0


def test_prompt_rows_carry_tools_and_environment():
    raw = {"id": 1, "prompt": "hi", "task": "x", "tools": [{"name": "f"}], "environment": "orders"}
    row = parse_prompt_row(raw, "r")
    assert row.tools == [{"name": "f"}] and row.environment == "orders" and "tools" not in row.metadata
    assert parse_prompt_row(json.loads(json.dumps(row.to_dict())), "again") == row
    from kexaone_align.errors import KexaoneError

    with pytest.raises(KexaoneError, match="'tools' must be a list"):
        parse_prompt_row({**raw, "tools": "f"}, "r")
    with pytest.raises(KexaoneError, match="'environment' must be a non-empty string"):
        parse_prompt_row({**raw, "environment": 3}, "r")


def test_a_request_budget_cuts_the_same_sample(tokenizer, model):
    backend = HFRolloutBackend.from_model(model)
    ids = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    sampling = SamplingConfig(max_new_tokens=20, seed=3)
    (full,) = backend.generate([RolloutRequest("a", ids, 1)], sampling)
    (cut,) = backend.generate([RolloutRequest("a", ids, 1, max_new_tokens=3)], sampling)
    assert cut.token_ids == full.token_ids[:3] and cut.finish_reason == "length"
    from kexaone_align.runtime.rollout.vllm import sampling_params_kwargs

    assert sampling_params_kwargs(sampling, RolloutRequest("a", ids, 1, max_new_tokens=3))["max_tokens"] == 3
    assert sampling_params_kwargs(sampling, RolloutRequest("a", ids, 1))["max_tokens"] == 20
