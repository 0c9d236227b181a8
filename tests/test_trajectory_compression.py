"""Trajectory compression of tool episodes on the hf backend: it triggers at N calls, the record is JSON with
its fields, a bad record falls back, the trained sample (the final context) matches a transformers forward,
and a re-issued episode is the same episode."""

from __future__ import annotations

import json

import pytest
import torch
from kexaone_align.environments import ToolLimits
from transformers import ExaoneMoeForCausalLM

from kexaone_align.data.prompts import parse_prompt_row
from kexaone_align.models import build_tokenizer
from kexaone_align.models.tiny import tiny_config
from kexaone_align.runtime.rollout.base import RolloutSample, SamplingConfig
from kexaone_align.runtime.rollout.compression import (
    INSTRUCTION,
    RECORD_INTRO,
    CompressionSpec,
    fallback_record,
    parse_record,
)
from kexaone_align.runtime.rollout.episodes import run_episodes
from kexaone_align.runtime.rollout.hf import HFRolloutBackend
from kexaone_align.runtime.rollout.sampling import processed_logprobs
from kexaone_align.stages import rl

SAMPLING = SamplingConfig(max_new_tokens=250, temperature=0.8, top_p=0.9, seed=5)
CALL = '</think>\n\n<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>'
RECORD = '</think>\n\n```json\n{"facts": ["12 * 7 = 84"], "open_questions": ["none"]}\n```'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
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


class Scripted:
    """The hf backend, except that requests whose id ends with a key of ``script`` get that fixed text (scored
    with the model's own processed log-probs), so a random model makes tool calls and writes records."""

    def __init__(self, model, tokenizer, script: dict[str, str]):
        self.backend, self.tok = HFRolloutBackend.from_model(model, max_batch_size=3), tokenizer
        self.script = {k: tokenizer(v, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                       for k, v in script.items()}  # fmt: skip
        self.seen: list = []

    @property
    def policy_version(self):
        return self.backend.policy_version

    def forced(self, rid: str):
        return next((ids for key, ids in self.script.items() if rid.endswith(key)), None)

    def generate(self, requests, sampling):
        self.seen += requests
        real = self.backend.generate([r for r in requests if self.forced(r.request_id) is None], sampling)
        out, pos = [], 0
        for req in requests:
            ids = self.forced(req.request_id)
            if ids is None:
                out.append(real[pos])
                pos += 1
                continue
            logits = self.backend.logits([req.prompt_token_ids + ids])[0]
            n = len(req.prompt_token_ids)
            logp = processed_logprobs(logits[n - 1 : -1], sampling.temperature, sampling.top_p)
            lps = logp.gather(1, torch.tensor(ids)[:, None]).squeeze(1).tolist()
            out.append(RolloutSample(req.request_id, 0, req.prompt_token_ids, list(ids), lps, "stop", 0))
        return out


def request(tokenizer, rid: str, spec: CompressionSpec | None, n: int = 2):
    raw = {"id": rid, "messages": [{"role": "user", "content": "What is 12 * 7?"}], "task": "math",
           "reference": "84", "environment": "calculator"}  # fmt: skip
    row = parse_prompt_row(raw, rid)
    limits = ToolLimits(max_turns=2)  # a forced call, then one sampled turn after the record
    (req,) = rl.build_requests(tokenizer, [row], n, rid, tool_limits=limits, compression=spec)
    return req


def check_against_forward(model, s: RolloutSample) -> None:
    """Rollout log-probs of the policy tokens = a transformers forward of prompt + token_ids (the final
    context); environment and record tokens are 0."""
    full = s.prompt_token_ids + s.token_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0].float()
    n = len(s.prompt_token_ids)
    logp = processed_logprobs(logits[n - 1 : -1], SAMPLING.temperature, SAMPLING.top_p)
    ref = logp.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1)
    got, on = torch.tensor(s.logprobs), torch.tensor(s.policy_mask, dtype=torch.bool)
    assert on.any()
    assert torch.allclose(got[on], ref[on], atol=2e-4), (got[on] - ref[on]).abs().max()
    assert torch.all(got[~on] == 0.0)


def test_the_policy_compresses_at_n_calls_and_the_final_context_is_trained(tokenizer, model):
    backend = Scripted(model, tokenizer, {"#t0": CALL, "#c0": RECORD})
    req = request(tokenizer, "q", CompressionSpec(after_calls=1, producer="policy", max_tokens=64))
    samples = run_episodes(backend, [req], SAMPLING, tokenizer)
    asks = [r for r in backend.seen if "#c" in r.request_id]
    assert sorted(r.request_id for r in asks) == ["q-0-q#0#c0", "q-0-q#1#c0"]
    assert all(r.max_new_tokens == 64 for r in asks)
    ask_text = tokenizer.decode(asks[0].prompt_token_ids)
    tail = f"<tool_result>84</tool_result><|endofturn|>\n<|user|>\n{INSTRUCTION}<|endofturn|>\n"
    assert ask_text.endswith(tail + "<|assistant|>\n<think>\n\n</think>\n\n")
    for s in samples:
        info = s.metadata["episode"]
        assert info["compressions"] == 1 and info["compress_fallbacks"] == 0 and info["tool_calls"] == 1
        record = info["record"]
        assert record == {"task": "What is 12 * 7?", "facts": ["12 * 7 = 84"], "open_questions": ["none"],
                          "tool_calls": 1}  # fmt: skip
        assert info["untrained_policy_tokens"] == len(backend.script["#t0"])
        # the sample: the prompt, then the record (context), then the turns after it (policy)
        n_ctx = s.policy_mask.index(1)
        context = tokenizer.decode(s.token_ids[:n_ctx])
        line = json.loads(context.split(RECORD_INTRO, 1)[1].split("<|endofturn|>")[0])
        assert line == record
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 12 * 7?"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": RECORD_INTRO + json.dumps(record)}],
            tools=rl.row_tools(parse_prompt_row(json.loads(json.dumps(req.metadata["episode"]["row"])), "r")),
            tokenize=False, add_generation_prompt=True, enable_thinking=True,
        )  # fmt: skip
        assert tokenizer.decode(s.prompt_token_ids) + context == expected
        assert s.policy_mask[n_ctx:] == [1] * (len(s.token_ids) - n_ctx)  # one turn after the record
        check_against_forward(model, s)
    batch = rl.training_batch(samples, [1.0, -1.0], tokenizer.pad_token_id)
    for i, s in enumerate(samples):  # AGAPO's 1/|o_i| counts the policy tokens after the record
        assert batch["loss_mask"][i].sum() == sum(s.policy_mask)
        assert batch["input_ids"][i, : len(s.prompt_token_ids)].tolist() == s.prompt_token_ids


def test_a_bad_record_falls_back_to_the_calls_and_results(tokenizer, model):
    backend = Scripted(model, tokenizer, {"#t0": CALL, "#c0": "</think>\n\nfacts: 84, no JSON here"})
    req = request(tokenizer, "q", CompressionSpec(after_calls=1, producer="policy", max_tokens=64), n=1)
    (s,) = run_episodes(backend, [req], SAMPLING, tokenizer)
    info = s.metadata["episode"]
    assert info["compressions"] == 1 and info["compress_fallbacks"] == 1
    assert info["record"] == {"task": "What is 12 * 7?", "open_questions": [], "tool_calls": 1,
                              "facts": ['calculator({"expression": "12 * 7"}) returned 84']}  # fmt: skip
    check_against_forward(model, s)
    groups = [rl.Group(parse_prompt_row(req.metadata["episode"]["row"], "r"), [s])]
    metrics = rl.episode_metrics(groups)
    assert metrics["tools/compressions"] == 1.0 and metrics["tools/compress_fallbacks"] == 1.0


def test_no_compression_before_n_calls(tokenizer, model):
    backend = Scripted(model, tokenizer, {"#t0": CALL, "#t1": "</think>\n\n84"})
    req = request(tokenizer, "q", CompressionSpec(after_calls=2), n=1)
    (s,) = run_episodes(backend, [req], SAMPLING, tokenizer)
    info = s.metadata["episode"]
    assert info["outcome"] == "answer" and info["passed"] and info["compressions"] == 0
    assert info["record"] is None and not any("#c" in r.request_id for r in backend.seen)
    assert s.policy_mask[: len(backend.script["#t0"])] == [1] * len(backend.script["#t0"])


class Judge:
    """A judge backend double (the ``reward_models`` interface): a valid record for the first chat it is
    sent, then text that is no record, then an exception."""

    def __init__(self):
        self.sent = []

    def complete(self, messages, *, max_tokens, temperature):
        self.sent.append(messages)
        if len(self.sent) == 1:
            return '{"facts": ["84 is 12 * 7"], "open_questions": []}'
        if len(self.sent) == 2:
            return '{"facts": "not a list"}'
        raise RuntimeError("judge down")


def test_a_judge_writes_the_record_and_its_failures_fall_back(tokenizer, model):
    backend = Scripted(model, tokenizer, {"#t0": CALL})
    judge = Judge()
    spec = CompressionSpec(after_calls=1, producer="judge", judge={"backend": "local", "model": "unused"})
    req = request(tokenizer, "q", spec, n=3)
    samples = run_episodes(backend, [req], SAMPLING, tokenizer, compressor=judge)
    assert not any("#c" in r.request_id for r in backend.seen)  # the policy was not asked
    assert "calculator" in judge.sent[0][1]["content"] and "-> 84" in judge.sent[0][1]["content"]
    infos = [s.metadata["episode"] for s in samples]
    assert [i["compress_fallbacks"] for i in infos] == [0, 1, 1]
    assert infos[0]["record"]["facts"] == ["84 is 12 * 7"]
    assert infos[1]["record"] == infos[2]["record"] == fallback_record(
        "What is 12 * 7?", [{"name": "calculator", "arguments": {"expression": "12 * 7"}, "result": "84",
                              "error": False}], None, 1)  # fmt: skip
    for s in samples:
        check_against_forward(model, s)


def test_a_reissued_compressed_episode_is_the_same_episode(tokenizer, model):
    backend = Scripted(model, tokenizer, {"#t0": CALL})  # the records are sampled: invalid, so fallbacks
    spec = CompressionSpec(after_calls=1, max_tokens=24)
    alone = run_episodes(backend, [request(tokenizer, "q", spec)], SAMPLING, tokenizer)
    crowded = run_episodes(backend, [request(tokenizer, "o", spec, 3), request(tokenizer, "q", spec)],
                           SAMPLING, tokenizer)[3:]  # fmt: skip
    assert [s.token_ids for s in alone] == [s.token_ids for s in crowded]
    assert [s.metadata["episode"] for s in alone] == [
        {**s.metadata["episode"], "env_seconds": a.metadata["episode"]["env_seconds"]}
        for a, s in zip(alone, crowded, strict=True)
    ]
    assert all(s.metadata["episode"]["compressions"] == 1 for s in alone)


def test_parse_record_and_recipe_keys():
    assert parse_record('noise {"facts": ["a"], "open_questions": []} tail', "t", 2) == {
        "task": "t", "facts": ["a"], "open_questions": [], "tool_calls": 2}  # fmt: skip
    assert parse_record('{"facts": ["a"]}', "t", 1) is None
    assert parse_record('{"facts": [1], "open_questions": []}', "t", 1) is None
    assert parse_record("[]", "t", 1) is None
    from pydantic import ValidationError

    from kexaone_align.config.tools import ToolsConfig
    from kexaone_align.errors import KexaoneError

    with pytest.raises(ValidationError, match="compress_judge"):
        ToolsConfig(compress_after_calls=2, compress_producer="judge")
    with pytest.raises(ValidationError, match="base_url"):
        ToolsConfig(compress_after_calls=2, compress_producer="judge",
                    compress_judge={"backend": "openai", "model": "m"})  # fmt: skip

    class R:
        tools = ToolsConfig(compress_after_calls=3, compress_max_tokens=100)

    assert rl.compression_spec(R()) == CompressionSpec(3, "policy", 100, None)
    R.tools = ToolsConfig()
    assert rl.compression_spec(R()) is None
    with pytest.raises(KexaoneError, match="producer"):
        CompressionSpec(1, "nobody")


def test_judge_backends_from_settings_and_a_hung_judge():
    import time

    from kexaone_align.reward_models import OpenAICompatibleBackend
    from kexaone_align.reward_models.backends import backend_from_settings

    from kexaone_align.errors import KexaoneError
    from kexaone_align.runtime.rollout.compression import judge_texts

    made = backend_from_settings({"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"})
    assert isinstance(made, OpenAICompatibleBackend) and made.model == "m"
    with pytest.raises(KexaoneError, match="needs base_url"):
        backend_from_settings({"backend": "openai", "model": "m"})
    with pytest.raises(KexaoneError, match="'openai' or 'local'"):
        backend_from_settings({"backend": "ollama"})

    class Hung:
        def complete(self, messages, *, max_tokens, temperature):
            time.sleep(5)

    started = time.perf_counter()
    assert judge_texts(Hung(), [[{"role": "user", "content": "x"}]], 8, timeout_s=0.2) == [None]
    assert time.perf_counter() - started < 2


def test_no_room_for_the_policys_record_gives_the_fallback(tokenizer, model):
    from kexaone_align.runtime.rollout.episodes import tool_turn_text

    backend = Scripted(model, tokenizer, {"#t0": CALL, "#c0": RECORD})
    ask = tokenizer(tool_turn_text(tokenizer, ["84"], False, then_user=INSTRUCTION), add_special_tokens=False)
    budget = len(backend.script["#t0"]) + len(ask["input_ids"]) + 10  # < 16 tokens left for a record
    sampling = SamplingConfig(max_new_tokens=budget, temperature=0.8, top_p=0.9, seed=5)
    req = request(tokenizer, "q", CompressionSpec(after_calls=1, max_tokens=64), n=1)
    (s,) = run_episodes(backend, [req], sampling, tokenizer)
    info = s.metadata["episode"]
    assert not any("#c" in r.request_id for r in backend.seen)  # never asked: no request past the budget
    assert info["compressions"] == 1 and info["compress_fallbacks"] == 1
    assert len(s.token_ids) <= budget
    check_against_forward(model, s)


def test_the_worker_path_plays_compressed_episodes_from_plain_metadata(tokenizer, model):
    import pickle

    from kexaone_align.runtime.rollout.worker import RolloutWorker

    worker = RolloutWorker(Scripted(model, tokenizer, {"#t0": CALL, "#c0": RECORD}))
    req = request(tokenizer, "w", CompressionSpec(after_calls=1, max_tokens=64), n=1)
    req = pickle.loads(pickle.dumps(req))  # as a Ray call ships it; the worker loads the tokenizer by path
    (s,) = worker.generate([req], SAMPLING)
    assert s.metadata["episode"]["compressions"] == 1 and s.metadata["episode"]["compress_fallbacks"] == 0
    assert json.loads(json.dumps(s.metadata)) == s.metadata  # the GROUPER group cache stores it as JSON
    check_against_forward(model, s)
