"""The format (reasoning structure, answer length) and choice (multiple-choice letter) verifiers."""

from __future__ import annotations

import pytest
from kexaone_align.verifiers import Sample, get_verifier
from kexaone_align.verifiers.format import FormatVerifier

from kexaone_align.errors import KexaoneError


def fmt(response: str, reference=None, **kw) -> float:
    return (
        FormatVerifier(**kw)
        .verify(Sample(prompt="p", response=response, reference=reference, task="format"))
        .reward
    )


def test_format_accepts_one_closed_think_then_answer() -> None:
    assert fmt("<think>reason</think>\nThe answer.") == 1.0
    assert get_verifier("format").verify(Sample(prompt="p", response="<think>r</think>ok")).reward == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<think>never closed, the answer is 4",
        "<think>r</think>",  # no answer
        "<think>r</think>   \n",
        "no think block at all",
        "<think>a</think>b<think>c</think>d",  # two blocks
        "</think>answer<think>",  # out of order
        "<think><think>nested</think>ans",
    ],
)
def test_format_rejects_malformed(response: str) -> None:
    assert fmt(response) == 0.0


def test_format_think_opened_by_template_and_length_limits() -> None:
    prefilled = Sample(prompt="p", response="reasoning</think>answer", metadata={"think_in_prompt": True})
    assert FormatVerifier().verify(prefilled).reward == 1.0
    assert fmt("<think>r</think>one two three", max_answer_words=3) == 1.0
    assert fmt("<think>r</think>one two three four", max_answer_words=3) == 0.0
    assert fmt("<think>r</think>" + "x" * 50, reference={"max_answer_chars": 10}) == 0.0
    res = FormatVerifier(partial=True, max_answer_chars=10).verify(
        Sample(prompt="p", response="<think>r</think>" + "x" * 50)
    )
    assert res.reward == pytest.approx(3 / 4) and res.details["failed"] == ["answer_chars"]
    assert fmt("plain answer", require_think=False) == 1.0
    assert fmt("<think>r</think>plain", require_think=False) == 0.0
    with pytest.raises(KexaoneError, match="unknown keys"):
        fmt("x", reference={"max_len": 3})


def choose(response: str, reference, **meta) -> float:
    return (
        get_verifier("choice")
        .verify(Sample(prompt="p", response=response, reference=reference, metadata=meta))
        .reward
    )


@pytest.mark.parametrize(
    "response",
    [
        "The answer is (B).",
        "Answer: B",
        "**Answer:** B",
        "After checking each option, the correct option is B.",
        "\\boxed{B}",
        "$\\boxed{\\text{(B)}}$",
        "B",
        "(B)",
        "Reasoning about A and C first.\nB) 42 newtons",
        "<think>The answer is A? no.</think>Final answer: B",
        "정답: B",
        "The answer is B. To double check, the answer is B.",
    ],
)
def test_choice_extracts_the_letter(response: str) -> None:
    assert choose(response, "B") == 1.0
    assert choose(response, "C") == 0.0


def test_choice_zero_for_several_letters_unclosed_think_and_no_letter() -> None:
    assert choose("The answer is B. Actually, the answer is C.", "B") == 0.0
    assert choose("\\boxed{B} or \\boxed{C}", "B") == 0.0
    assert choose("<think>The answer is B", "B") == 0.0
    assert choose("I cannot decide.", "B") == 0.0
    # "A" as an article is not a choice.
    assert choose("A careful look shows nothing.", "A") == 0.0


def test_choice_reference_forms() -> None:
    assert choose("Answer: C", 2) == 1.0
    assert choose("Answer: C", "(C)") == 1.0
    choices = ["red", "green", "blue"]
    assert choose("Answer: B", {"answer": "green", "choices": choices}) == 1.0
    assert choose("green", {"answer": "B", "choices": choices}) == 1.0
    assert get_verifier("stem").verify(Sample(prompt="p", response="Answer: A", reference="A")).reward == 1.0
    with pytest.raises(KexaoneError, match="choice reference"):
        choose("Answer: A", "purple")
