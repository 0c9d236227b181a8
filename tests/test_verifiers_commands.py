"""The `verifiers` and `verify` command handlers (called directly, the CLI wires them)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from kexaone_align.verifiers.commands import (
    add_verifiers_arguments,
    add_verify_arguments,
    verifiers_command,
    verify_command,
)

from kexaone_align.errors import KexaoneError


def _args(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_verifiers_lists_builtins() -> None:
    out = io.StringIO()
    assert verifiers_command(_args(add_verifiers_arguments, []), out) == 0
    text = out.getvalue()
    for name in ("math", "ifeval", "instruction_following", "format", "choice", "stem"):
        assert f"\n{name} " in "\n" + text
    out = io.StringIO()
    verifiers_command(_args(add_verifiers_arguments, ["--json"]), out)
    listed = {row["name"]: row["description"] for row in json.loads(out.getvalue())}
    assert listed["math"].startswith("Reward 1 when every final answer")
    assert listed["choice"].startswith("Reward 1")


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_verify_scores_file_prints_per_task_stats_and_writes_out(tmp_path: Path) -> None:
    ifeval_ref = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    data = _write(
        tmp_path / "rollouts.jsonl",
        [
            {"prompt": "1+1?", "response": "\\boxed{2}", "reference": "2", "task": "math"},
            {"prompt": "1+2?", "response": "<think>hm</think>\\boxed{4}", "reference": "3", "task": "math"},
            {"prompt": "q", "response": "no commas", "reference": ifeval_ref, "task": "ifeval", "id": 7},
            {"prompt": "q", "response": "Answer: D", "reference": "D", "task": "stem"},
            {"prompt": "q", "response": "x", "reference": None, "task": "poetry"},
            {"prompt": "q", "response": "\\boxed{1}", "task": "math"},  # missing reference -> counted error
        ],
    )
    out_path = tmp_path / "scored" / "out.jsonl"
    out = io.StringIO()
    args = _args(add_verify_arguments, ["--data", str(data), "--out", str(out_path), "--timeout", "30"])
    assert verify_command(args, out) == 0
    lines = {line.split()[0]: line.split()[1:] for line in out.getvalue().splitlines() if line.strip()}
    assert lines["math"][:3] == ["3", "0.3333", "1"]  # count, mean, errors
    assert lines["ifeval"][:2] == ["1", "1.0000"] and lines["stem"][:2] == ["1", "1.0000"]
    assert lines["poetry"][-1] == "1"  # unrouted
    assert lines["all"][:2] == ["6", "0.5000"]
    scored = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert scored[2]["id"] == 7 and "followed" in scored[2]["details"]


def test_verify_with_fixed_verifier_and_routes(tmp_path: Path) -> None:
    data = _write(tmp_path / "r.jsonl", [{"response": "Answer: A", "reference": "A", "task": "mcq"}])
    out = io.StringIO()
    verify_command(_args(add_verify_arguments, ["--data", str(data), "--verifier", "choice"]), out)
    assert "mcq" in out.getvalue() and "1.0000" in out.getvalue()
    out = io.StringIO()
    verify_command(_args(add_verify_arguments, ["--data", str(data), "--route", "mcq=stem"]), out)
    assert " 1.0000 " in out.getvalue()
    with pytest.raises(KexaoneError, match="TASK=VERIFIER"):
        verify_command(_args(add_verify_arguments, ["--data", str(data), "--route", "mcq"]), io.StringIO())


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"response": "x"}', "{not json"], r"r\.jsonl:2: not valid JSON"),
        (['{"response": 3}'], r"r\.jsonl:1: 'response' must be a string"),
        (["[1, 2]"], r"r\.jsonl:1: expected a JSON object"),
        (['{"response": "x", "task": 5}'], r"r\.jsonl:1: 'task' must be a non-empty string"),
        (['{"response": "x", "metadata": [1]}'], r"r\.jsonl:1: 'metadata' must be an object"),
    ],
)
def test_verify_rejects_bad_rows_naming_the_line(tmp_path: Path, rows: list, message: str) -> None:
    data = _write(tmp_path / "r.jsonl", rows)
    with pytest.raises(KexaoneError, match=message):
        verify_command(_args(add_verify_arguments, ["--data", str(data)]), io.StringIO())


def test_verify_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(KexaoneError, match="does not exist"):
        verify_command(_args(add_verify_arguments, ["--data", str(tmp_path / "nope.jsonl")]), io.StringIO())
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(KexaoneError, match="no rows"):
        verify_command(_args(add_verify_arguments, ["--data", str(tmp_path / "empty.jsonl")]), io.StringIO())
