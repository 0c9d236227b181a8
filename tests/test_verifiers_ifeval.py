"""IFEval-style instructions: each kind accepts a compliant response and rejects a violating one."""

from __future__ import annotations

import pytest
from kexaone_align.verifiers import Sample, get_verifier
from kexaone_align.verifiers.ifeval import CHECKS, IFEvalVerifier

from kexaone_align.errors import KexaoneError

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES = [
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "at least"},
        "one two three four five",
        "one two",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 4, "relation": "less than"},
        "just three words",
        "a b c d e",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Only one.",
        "A. B. C.",
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        "One block.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "Start here.\n\nThen finish.",
        "Start here.\n\nAfter that finish.",
    ),
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "Alpha and beta.", "Only alpha here."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "A good answer, badge ok.", "This is bad."),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "cat and cat",
        "a cat",
    ),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zz", "z"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{'a': 1} plus words"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    ("detectable_format:title", {}, "<<My Title>>\nBody", "My Title\nBody"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* only"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nx\nSECTION 2\ny",
        "SECTION 1\nx",
    ),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, definitely."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("startend:quotation", {}, '"wrapped in quotes"', 'not "wrapped"'),
    ("startend:start_checker", {"start_phrase": "Dear"}, "Dear team, hi", "Hi team"),
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
    ("change_case:english_lowercase", {}, "all lower case", "Not all lower"),
    ("change_case:english_capital", {}, "ALL CAPS HERE", "ALL CAPS Mostly"),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "AI and ML",
        "AI",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "At [name] in [city]", "At [name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\nP.S. bye", "Body without it."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "Say hi. Hi!", "Hi!"),
    ("combination:two_responses", {}, "first one ****** second one", "only one"),
]


def test_at_least_fifteen_kinds() -> None:
    assert len({c[0] for c in CASES}) >= 15
    assert {c[0] for c in CASES} <= set(CHECKS)


@pytest.mark.parametrize(
    ("iid", "kwargs", "good", "bad"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_instruction_positive_and_negative(iid: str, kwargs: dict, good: str, bad: str) -> None:
    verifier = IFEvalVerifier()
    ref = {"instruction_id_list": [iid], "kwargs": [kwargs]}
    assert verifier.verify(Sample(prompt="p", response=good, reference=ref, task="ifeval")).reward == 1.0
    res = verifier.verify(Sample(prompt="p", response=bad, reference=ref, task="ifeval"))
    assert res.reward == 0.0
    assert res.details["failed"] == [iid]


def test_fraction_and_all_or_nothing_modes() -> None:
    ref = {
        "instruction_id_list": [
            "punctuation:no_comma",
            "change_case:english_lowercase",
            "startend:quotation",
        ],
        "kwargs": [{}, {"num_words": None}, {}],  # IFEval stores unused kwargs as None
    }
    sample = Sample(prompt="p", response="all lower, with a comma", reference=ref)
    assert get_verifier("ifeval").verify(sample).reward == pytest.approx(1 / 3)
    assert IFEvalVerifier(mode="all").verify(sample).reward == 0.0
    per_row = Sample(prompt="p", response=sample.response, reference={**ref, "mode": "all"})
    assert get_verifier("instruction_following").verify(per_row).reward == 0.0


def test_reasoning_is_stripped_and_unclosed_think_fails() -> None:
    ref = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    ok = Sample(prompt="p", response="<think>a, b, c</think>no commas", reference=ref)
    assert IFEvalVerifier().verify(ok).reward == 1.0
    unclosed = Sample(prompt="p", response="<think>no commas", reference=ref)
    assert IFEvalVerifier().verify(unclosed).reward == 0.0


def test_loose_mode_forgives_markdown_and_framing_lines() -> None:
    ref = {
        "instruction_id_list": ["startend:end_checker"],
        "kwargs": [{"end_phrase": "Is there anything else?"}],
    }
    sample = Sample(
        prompt="p", response="Body. Is there anything else?\n-- sent from my assistant", reference=ref
    )
    assert IFEvalVerifier().verify(sample).reward == 0.0
    assert IFEvalVerifier(loose=True).verify(sample).reward == 1.0


def test_bad_references_raise_clear_errors() -> None:
    v = IFEvalVerifier()
    with pytest.raises(KexaoneError, match="unknown instruction id"):
        v.verify(
            Sample(prompt="p", response="x", reference={"instruction_id_list": ["nope:nope"], "kwargs": [{}]})
        )
    with pytest.raises(KexaoneError, match="bad kwargs"):
        ref = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"bogus": 1}]}
        v.verify(Sample(prompt="p", response="x", reference=ref))
    with pytest.raises(KexaoneError, match="instruction_id_list"):
        v.verify(Sample(prompt="p", response="x", reference="3"))
    with pytest.raises(KexaoneError, match="2 instruction ids but 1"):
        ref = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}]}
        v.verify(Sample(prompt="p", response="x", reference=ref))
