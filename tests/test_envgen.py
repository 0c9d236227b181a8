"""The LLM generator and filter of stateful tool environments: what it writes loads with the same code, and
broken, unsolvable, vacuous and judge-rejected environments or tasks are filtered out with their reason."""

from __future__ import annotations

import copy
import json

import pytest
from kexaone_align.environments import (
    DataEnvironment,
    ToolCall,
    ToolLimits,
    resolve_environment,
    rows_from_environment,
    run_tool_call,
    score_episode,
)
from kexaone_align.environments.generate import check_environment, generate_environments, report

from kexaone_align.cli import main

LIBRARY = {
    "name": "Library",
    "description": "A small lending library.",
    "state": {"books": {
        "B1": {"title": "Dune", "author": "herbert", "status": "available", "borrower": ""},
        "B2": {"title": "Emma", "author": "austen", "status": "on_loan", "borrower": "kim"},
        "B3": {"title": "Persuasion", "author": "austen", "status": "available", "borrower": ""},
    }},
    "tools": [
        {"name": "get_book", "op": "get", "table": "books", "key": "book_id"},
        {"name": "find_books", "op": "find", "table": "books", "match": ["author"]},
        {"name": "lend_book", "op": "set", "table": "books", "key": "book_id",
         "set": {"status": "on_loan", "borrower": "$member"}, "require": {"status": ["available"]}},
    ],
    "tasks": [
        {"id": "lend-dune", "prompt": "Lend Dune (B1) to member lee.",
         "expect": {"state": [{"table": "books", "key": "B1", "field": "borrower", "equals": "lee"},
                              {"table": "books", "key": "B1", "field": "status", "equals": "on_loan"}],
                    "unchanged_otherwise": True},
         "solution": {"calls": [{"name": "lend_book", "arguments": {"book_id": "B1", "member": "lee"}}],
                      "answer": "B1 is now on loan to lee."}},
        {"id": "count-austen", "prompt": "How many books by austen do we hold?",
         "expect": {"unchanged_otherwise": True, "answer_contains": ["2"]},
         "solution": {"calls": [{"name": "find_books", "arguments": {"author": "austen"}}],
                      "answer": "We hold 2 books by austen."}},
        {"id": "lend-emma", "prompt": "Lend Emma (B2) to lee.",
         "expect": {"state": [{"table": "books", "key": "B2", "field": "borrower", "equals": "lee"}]},
         "solution": {"calls": [{"name": "lend_book", "arguments": {"book_id": "B2", "member": "lee"}}],
                      "answer": "Done."}},
        {"id": "hello", "prompt": "Say hello.", "expect": {},
         "solution": {"calls": [{"name": "get_book", "arguments": {"book_id": "B1"}}], "answer": "hello"}},
        {"id": "who-wrote", "prompt": "Who wrote B1?", "expect": {"answer_contains": ["herbert"]},
         "solution": {"calls": [{"name": "get_book", "arguments": {"book_id": "B1"}}], "answer": "Dune"}},
        {"id": "no-solution", "prompt": "Who wrote B3?", "expect": {"answer_contains": ["austen"]}},
        {"id": "count-austen", "prompt": "Again?", "expect": {"answer_contains": ["2"]},
         "solution": {"calls": [{"name": "find_books", "arguments": {"author": "austen"}}], "answer": "2"}},
    ],
}  # fmt: skip
DROPPED = {"lend-emma": "solution call 0 fails", "hello": "passes without any tool call",
           "who-wrote": "does not pass", "no-solution": "no reference solution",
           "count-austen (again)": "second task with this id"}  # fmt: skip


def dragon_bank() -> dict:
    spec = copy.deepcopy(LIBRARY)
    spec["name"] = "dragon_bank"
    return spec


class Writer:
    """A writer double with the judge-backend interface: its answer depends on the theme it is asked for."""

    def __init__(self):
        self.sent = []

    def complete(self, messages, *, max_tokens, temperature):
        self.sent.append(messages)
        theme = messages[-1]["content"].rsplit("Write a new environment about: ", 1)[1].split(".")[0]
        if theme == "library":
            return "Here it is:\n```json\n" + json.dumps(LIBRARY) + "\n```"
        if theme == "dragons":
            return json.dumps(dragon_bank())
        if theme == "chatty":
            return "Sure! An environment about shops: {name: shop"
        if theme == "bad op":
            return json.dumps({**LIBRARY, "tools": [{"name": "drop", "op": "delete", "table": "books"}]})
        raise RuntimeError("the writer's server went away")


class Judge:
    """A judge double: rejects the dragon bank, accepts the library but calls one of its tasks ambiguous."""

    def __init__(self):
        self.sent = []

    def complete(self, messages, *, max_tokens, temperature):
        self.sent.append(json.loads(messages[-1]["content"]))
        if self.sent[-1]["name"] == "dragon_bank":
            return '{"accept": false, "reason": "dragons do not keep bank accounts", "bad_tasks": []}'
        return '{"accept": true, "reason": "count-austen is ambiguous", "bad_tasks": ["count-austen"]}'


def test_generated_environments_are_filtered_and_load_with_the_same_code(tmp_path):
    writer, judge = Writer(), Judge()
    themes = ["library", "dragons", "chatty", "bad op", "offline", "library"]
    verdicts = generate_environments(writer, themes, tmp_path, judge=judge, temperature=0.5)
    assert "orders" in writer.sent[0][-1]["content"] and len(writer.sent) == 6  # the format's example
    summary = report(verdicts)
    assert (summary["answers"], summary["accepted"], summary["rejected"]) == (6, 2, 4)
    reasons = {r["theme"]: r["reason"] for r in summary["rejections"]}
    assert reasons["dragons"] == "judge: dragons do not keep bank accounts"
    assert reasons["chatty"] == "the writer's answer is not a JSON object"
    assert "does not load" in reasons["bad op"] and "tools[0].op must be one of" in reasons["bad op"]
    assert reasons["offline"].startswith("the writer failed: RuntimeError")
    assert len(judge.sent) == 3  # only what passed the structural and solvability checks
    assert all(t["id"] in ("lend-dune", "count-austen") for j in judge.sent for t in j["tasks"])
    dropped = {(d["task"], d["reason"]) for d in summary["dropped"] if d["theme"] == "library"}
    for task, why in DROPPED.items():
        assert any(t == task and why in r for t, r in dropped), (task, dropped)
    assert ("count-austen", "judge: count-austen is ambiguous") in dropped
    assert sorted(p.rsplit("/", 1)[1] for p in summary["files"]) == ["library.json", "library_2.json"]
    for path in summary["files"]:
        env = resolve_environment(path)  # the loader every episode uses
        assert isinstance(env, DataEnvironment) and env.name in ("library", "library_2")
        assert list(env.tasks) == ["lend-dune"]
        (row,) = rows_from_environment(env)
        assert row["environment"] == path and row["reference"] == "lend-dune"
        # the written solution still passes on the loaded environment
        from kexaone_align.data.prompts import parse_prompt_row

        prow, limits = parse_prompt_row(row, "r"), ToolLimits()
        state = env.reset(prow)
        call = env.tasks["lend-dune"]["solution"]["calls"][0]
        out = run_tool_call(
            env, state, ToolCall(call["name"], call["arguments"]), set(env.tool_specs), limits
        )
        assert not out.error and score_episode(env, out.state, prow, "done", limits).passed
        assert not score_episode(env, env.reset(prow), prow, "done", limits).passed


def test_checks_without_a_judge_and_a_garbled_verdict():
    verdict = check_environment(json.dumps(LIBRARY), "t")
    assert verdict.spec is not None and [t["id"] for t in verdict.spec["tasks"]] == [
        "lend-dune",
        "count-austen",
    ]
    garbled = check_environment(json.dumps(LIBRARY), "t", judge_text="looks fine to me")
    assert garbled.spec is None and "verdict is not readable" in garbled.reason
    unsolvable = copy.deepcopy(LIBRARY)
    unsolvable["tasks"] = [t for t in unsolvable["tasks"] if t["id"] in DROPPED]
    verdict = check_environment(json.dumps(unsolvable), "t")
    assert verdict.spec is None and verdict.reason == "no task is solvable by its reference solution"
    assert set(verdict.dropped) == {"lend-emma", "hello", "who-wrote", "no-solution"}
    assert check_environment(json.dumps({**LIBRARY, "tasks": []}), "t").reason == "has no tasks"


@pytest.mark.slow  # a tiny checkpoint is built and reads the ~2,200-token writer prompt
def test_envgen_command(tmp_path, capsys):
    from kexaone_align.models.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "envs"
    argv = ["envgen", "library loans", "--out", str(out), "--backend", "local", "--model", str(ckpt),
            "--max-tokens", "6", "--no-judge"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "envgen_report.json").read_text())
    assert summary["accepted"] == 0 and summary["rejections"] == [
        {"theme": "library loans", "reason": "the writer's answer is not a JSON object"}
    ]  # a random tiny model writes no environment
    assert json.loads(capsys.readouterr().out) == summary
    assert main(["envgen", "x", "--out", str(out), "--backend", "openai", "--model", "m"]) == 2
    assert "needs base_url and model" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "[1, 2]", '{"name": "x"}'])
def test_non_environments_are_rejected(text):
    verdict = check_environment(text, "t")
    assert verdict.spec is None and verdict.reason
