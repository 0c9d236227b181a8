"""Tool environments: parsing calls, bounded execution, the built-ins, and whole scripted episodes
(malformed calls, unknown tools, hanging and flooding tools, calls past the turn limit)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import pytest
from kexaone_align.environments import (
    DATA_DIR,
    Environment,
    ToolError,
    ToolLimits,
    get_environment,
    parse_tool_calls,
    register_environment,
    registered_environments,
    resolve_environment,
    rows_from_environment,
    run_tool_call,
    score_episode,
)

from kexaone_align.data.prompts import parse_prompt_row
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import RolloutRequest, RolloutSample, SamplingConfig
from kexaone_align.runtime.rollout.episodes import episode_metadata, run_episodes


def call(name: str, **args) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


_BEFORE: set[int] = set()


def _live_children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(autouse=True)
def _children_before_the_test():
    """Processes earlier tests of the session left running (a math pool, Ray) are not this test's."""
    _BEFORE.clear()
    _BEFORE.update(_live_children())
    yield


def no_children_left() -> bool:
    """No process this test started is still running (polled briefly: a killed group takes a moment)."""
    deadline = time.monotonic() + 2.0
    while _live_children() - _BEFORE and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _live_children() - _BEFORE


class SlowEnv(Environment):
    """A plugin environment (process isolation, the default) with a hanging and a flooding tool."""

    name = "slow"

    def tools(self, row):
        return [{"name": n} for n in ("hang", "flood", "add", "boom")]

    def reset(self, row):
        return {"total": 0}

    def call(self, state, name, arguments):
        if name == "hang":
            subprocess.Popen(["sleep", "300"])  # a grandchild: must die with the call
            time.sleep(300)
        if name == "flood":
            return "x" * (5 << 20)
        if name == "add":
            state["total"] += int(arguments["n"])
            return str(state["total"])
        if name == "boom":
            raise ToolError("boom refused")
        raise ToolError(f"unknown tool {name!r}")

    def score(self, state, row, answer):
        return float(str(state["total"]) in answer)


register_environment("test-slow", overwrite=True)(SlowEnv)


# ---------------------------------------------------------------------------------------- parsing
def test_parse_tool_calls_good_malformed_and_unclosed():
    text = '<think>\nmaybe <tool_call>{"name": "x"}</tool_call>\n</think>\n\nok ' + call("add", n=2)
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"n": 2}, None)]
    bad = parse_tool_calls('<tool_call>{"name": 1}</tool_call><tool_call>{nope</tool_call><tool_call>{"name"')
    assert [c.error is not None for c in bad] == [True, True, True]
    assert "never closed" in bad[2].error
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call>')[
        0
    ].arguments == {"k": 1}
    assert (
        "must be an object"
        in parse_tool_calls('<tool_call>{"name": "a", "arguments": [1]}</tool_call>')[0].error
    )
    assert parse_tool_calls("just an answer") == []


# -------------------------------------------------------------------------------------- execution
def test_hanging_tool_is_killed_with_everything_it_started():
    env = resolve_environment("test-slow")
    limits = ToolLimits(call_timeout_s=1.0)
    start = time.perf_counter()
    out = run_tool_call(env, {"total": 0}, parse_tool_calls(call("hang"))[0], {"hang"}, limits)
    assert out.error and out.timed_out and "did not finish within 1 s" in out.content
    assert time.perf_counter() - start < 5
    assert no_children_left()


def test_flooding_tool_output_is_truncated_and_state_comes_back():
    env = resolve_environment("test-slow")
    limits = ToolLimits(max_output_chars=100)
    out = run_tool_call(env, {"total": 0}, parse_tool_calls(call("flood"))[0], {"flood"}, limits)
    assert not out.error and len(out.content) < 200 and "output truncated" in out.content
    out = run_tool_call(env, {"total": 5}, parse_tool_calls(call("add", n=3))[0], {"add"}, limits)
    assert out.content == "8" and out.state == {"total": 8}
    out = run_tool_call(env, {"total": 5}, parse_tool_calls(call("boom"))[0], {"boom"}, limits)
    assert out.error and out.content == "error: boom refused" and out.state == {"total": 5}
    out = run_tool_call(env, {}, parse_tool_calls(call("nope"))[0], {"add"}, limits)
    assert out.error and "unknown tool 'nope'" in out.content
    assert no_children_left()


def test_registry_and_references(tmp_path):
    assert {"python", "calculator", "orders", "test-slow"} <= set(registered_environments())
    with pytest.raises(KexaoneError, match="no tool environment named 'nope'"):
        get_environment("nope")
    plugin = tmp_path / "myenv.py"
    plugin.write_text("from kexaone_align.environments import Environment\nclass E(Environment):\n  pass\n")
    assert isinstance(resolve_environment(f"{plugin}:E"), Environment)
    assert resolve_environment("kexaone_align.environments:CalculatorEnvironment").name == "calculator"
    with pytest.raises(KexaoneError, match="no attribute"):
        resolve_environment(f"{plugin}:Missing")
    assert resolve_environment(str(DATA_DIR / "orders.json")).name == "orders"
    (tmp_path / "bad.json").write_text(
        json.dumps({"state": {"t": {}}, "tools": [{"name": "x", "op": "drop"}]})
    )
    with pytest.raises(KexaoneError, match=r"bad.json: tools\[0\].op must be one of"):
        resolve_environment(str(tmp_path / "bad.json"))


def test_calculator_is_exact_and_bounded():
    env = get_environment("calculator")
    assert env.call(None, "calculator", {"expression": "347 * 29 + (8 - 2) ** 2"}) == str(347 * 29 + 36)
    for bad in ("__import__('os')", "9 ** 9 ** 9", "1/0", "x" * 300):
        with pytest.raises(ToolError):
            env.call(None, "calculator", {"expression": bad})


def test_python_tool_runs_in_the_sandbox_and_is_bounded():
    env = get_environment("python")
    env.timeout_s = 1.5
    limits = ToolLimits(max_output_chars=500)
    names = {"python"}
    ok = run_tool_call(env, None, parse_tool_calls(call("python", code="print(6 * 7)"))[0], names, limits)
    assert (ok.content, ok.error) == ("42", False)
    flood = run_tool_call(
        env, None, parse_tool_calls(call("python", code="print('x' * 10**7)"))[0], names, limits
    )
    assert len(flood.content) < 600
    start = time.perf_counter()
    hang = run_tool_call(
        env, None, parse_tool_calls(call("python", code="while True: pass"))[0], names, limits
    )
    assert hang.error and "did not finish" in hang.content and time.perf_counter() - start < 15
    crash = run_tool_call(env, None, parse_tool_calls(call("python", code="1/0"))[0], names, limits)
    assert "ZeroDivisionError" in crash.content and "exit code" in crash.content
    assert no_children_left()


# ------------------------------------------------------------------------------- stateful data env
def test_orders_environment_state_and_pass_criteria():
    env = get_environment("orders")
    rows = {r["reference"]: parse_prompt_row(r, r["id"]) for r in rows_from_environment(env, "orders")}
    assert len(rows) == 6 and all(r.environment == "orders" for r in rows.values())
    row = rows["refund-kettle"]
    state = env.reset(row)
    assert json.loads(env.call(state, "find_orders", {"customer": "kim"})).keys() == {"A100", "A101"}
    with pytest.raises(ToolError, match="refused"):
        env.call(state, "refund_order", {"order_id": "A101"})  # pending, not delivered
    with pytest.raises(ToolError, match="missing argument"):
        env.call(state, "refund_order", {})
    with pytest.raises(ToolError, match="no record"):
        env.call(state, "lookup_order", {"order_id": "Z9"})
    env.call(state, "refund_order", {"order_id": "A100"})
    assert env.reset(row)["orders"]["A100"]["status"] == "delivered"  # episodes never share state
    limits = ToolLimits()
    assert score_episode(env, state, row, "Refunded 42 dollars.", limits).passed
    assert not score_episode(env, state, row, "Done.", limits).passed
    env.call(state, "update_address", {"order_id": "A101", "address": "x"})
    failed = score_episode(env, state, row, "Refunded 42.", limits)
    assert failed.reward == 0 and "A101.address changed" in failed.details["failed"][0]
    assert score_episode(env, state, row, None, limits).reward == 0.0
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in env.tools(row)}
    assert schemas["update_address"]["required"] == ["address", "order_id"]


# ------------------------------------------------------------------------------ scripted episodes
@pytest.fixture(scope="module")
def tokenizer():
    from kexaone_align.models import build_tokenizer

    return build_tokenizer()


class ScriptedBackend:
    """Plays fixed assistant turns (by sample index and turn) instead of sampling; log-prob -1 each."""

    policy_version = 3

    def __init__(self, tokenizer, scripts: dict[int, list[str]]):
        self.tok, self.scripts, self.calls = tokenizer, scripts, []

    def generate(self, requests, sampling):
        out = []
        for req in requests:
            self.calls.append(req.request_id)
            _, sample, turn = req.request_id.rsplit("#", 2)
            text = self.scripts[int(sample)][int(turn[1:])]
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            budget = min(req.max_new_tokens or 10**9, sampling.max_new_tokens)
            reason = "stop" if len(ids) <= budget else "length"
            ids = ids[:budget]
            out.append(
                RolloutSample(req.request_id, 0, req.prompt_token_ids, ids, [-1.0] * len(ids), reason, 3)
            )
        return out


def play(
    tokenizer,
    env: str,
    row: dict,
    scripts: dict[int, list[str]],
    limits: ToolLimits,
    max_new: int = 400,
    thinking: bool = True,
):
    row = parse_prompt_row({"task": "math", **row}, "row")
    from kexaone_align.data.chat_format import render_prompt

    tools = resolve_environment(env).tools(row)
    prompt = render_prompt(tokenizer, row.messages, thinking, tools=tools)
    meta = {"row": 0, "episode": episode_metadata(row, env, enable_thinking=thinking, limits=limits)}
    req = RolloutRequest("r0", prompt, len(scripts), meta)
    backend = ScriptedBackend(tokenizer, scripts)
    samples = run_episodes(backend, [req], SamplingConfig(max_new_tokens=max_new), tokenizer)
    return samples, backend


def test_scripted_episodes_end_cleanly_with_the_right_reward(tokenizer):
    row = {"messages": [{"role": "user", "content": "add things"}], "reference": None}
    answer = "</think>\n\nThe total is 5."
    scripts = {
        0: ["</think>\n\n" + call("add", n=5), answer],  # clean: one call, then the answer
        1: ["</think>\n\n<tool_call>{not json</tool_call>", "</think>\n\n" + call("add", n=5), answer],
        2: ["</think>\n\n" + call("nosuch"), "</think>\n\n" + call("add", n=5), answer],
        3: ["</think>\n\n" + call("hang"), "</think>\n\n" + call("add", n=5), answer],
        4: ["</think>\n\n" + call("flood"), "</think>\n\n" + call("add", n=5), answer],
        5: ["</think>\n\n" + call("add", n=5)] * 3 + [answer],  # still calling at the turn limit
        6: ["</think>\n\n" + call("boom") + call("add", n=5), answer],
    }
    limits = ToolLimits(max_turns=3, call_timeout_s=1.0, max_output_chars=300)
    samples, backend = play(tokenizer, "test-slow", row, scripts, limits, max_new=1500)
    info = [s.metadata["episode"] for s in samples]
    assert [i["reward"] for i in info] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0], info
    assert [i["outcome"] for i in info] == ["answer"] * 5 + ["max_turns", "answer"]
    assert [i["tool_errors"] for i in info] == [0, 1, 1, 1, 0, 0, 1]
    assert info[3]["tool_timeouts"] == 1 and info[3]["env_seconds"] >= 1.0
    assert info[5]["turns"] == 3 and info[5]["tool_calls"] == 2  # the third turn's call never ran
    assert not any("#5#t3" in c for c in backend.calls)
    for s in samples:
        assert len(s.token_ids) == len(s.logprobs) == len(s.policy_mask)
        assert all(lp == (-1.0 if m else 0.0) for lp, m in zip(s.logprobs, s.policy_mask, strict=True))
        assert s.token_ids[-1] == tokenizer.eos_token_id and s.policy_mask[-1] == 1
        assert s.policy_version == 3 and s.metadata["row"] == 0
    flood_text = tokenizer.decode(samples[4].token_ids)
    assert "output truncated" in flood_text and len(flood_text) < 3000
    assert no_children_left()


def test_episode_text_is_the_chat_template_rendering(tokenizer):
    """Prompt + episode tokens decode to what the chat template renders for the same conversation."""
    row = {"messages": [{"role": "user", "content": "What is 347 * 29?"}], "reference": "10063"}
    turns = ["</think>\n\n" + call("calculator", expression="347 * 29"), "ok\n</think>\n\n\\boxed{10063}"]
    (sample,), _ = play(tokenizer, "calculator", row, {0: turns}, ToolLimits())
    assert sample.metadata["episode"]["reward"] == 1.0 and sample.metadata["episode"]["tool_calls"] == 1
    tools = get_environment("calculator").tools(None)
    messages = [
        *row["messages"],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "calculator", "arguments": {"expression": "347 * 29"}}],
        },
        {"role": "tool", "content": "10063"},
        {"role": "assistant", "content": "<think>ok</think>\\boxed{10063}"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, enable_thinking=True)
    text = tokenizer.decode(sample.prompt_token_ids + sample.token_ids)
    assert text + "\n" == rendered.replace(
        "<think>\n\n</think>\n\n<tool_call>", "<think>\n</think>\n\n<tool_call>"
    )


def test_token_budget_ends_the_episode(tokenizer):
    row = {"messages": [{"role": "user", "content": "add"}], "reference": None}
    scripts = {0: ["</think>\n\n" + call("flood"), "</think>\n\n5"]}
    samples, _ = play(tokenizer, "test-slow", row, scripts, ToolLimits(max_output_chars=5000), max_new=80)
    (s,) = samples
    assert s.metadata["episode"]["outcome"] == "length" and s.metadata["episode"]["reward"] == 0.0
    assert len(s.token_ids) <= 80 and s.finish_reason == "length"
    assert os.getpid() and no_children_left()


def test_sft_tool_traces_tokenize_like_episodes(tokenizer):
    """The tiny tool task's SFT trace and the RL episode with the same turns are the same tokens, and the
    SFT loss mask is the episode's policy mask, except that SFT also trains the empty think block that
    the non-reasoning generation prompt writes (context in an episode)."""
    from kexaone_align.data.chat_format import tokenize_conversation
    from kexaone_align.data.tiny_tools import generate_tool_sft_rows

    row = next(r for r in generate_tool_sft_rows(20, 0, tool_skip=0.0, copy_noise=0.0))
    messages = row["messages"]
    turns = [
        "<tool_call>" + json.dumps(messages[1]["tool_calls"][0]) + "</tool_call>",
        messages[3]["content"],
    ]
    prompt_row = {"messages": messages[:1], "reference": row["metadata"]["answer"]}
    (sample,), _ = play(tokenizer, "calculator", prompt_row, {0: turns}, ToolLimits(), thinking=False)
    assert sample.metadata["episode"]["reward"] == 1.0
    ids, mask = tokenize_conversation(tokenizer, messages, False, tools=row["tools"])
    n = len(sample.prompt_token_ids)
    assert ids[:n] == sample.prompt_token_ids and ids[n:-1] == sample.token_ids
    full_mask = [0] * n + sample.policy_mask
    differ = [i for i, (a, b) in enumerate(zip(mask[:-1], full_mask, strict=True)) if a != b]
    assert all(full_mask[i] == 0 and mask[i] == 1 for i in differ)
    assert tokenizer.decode([ids[i] for i in differ]) == "<think>\n\n</think>\n\n" * 2
