"""IFEval-style instructions: each kind accepts a compliant response and rejects a violating one."""

from __future__ import annotations

import pytest
from kexaone_align.verifiers import Sample, get_verifier
from kexaone_align.verifiers.ifeval import CHECKS, IFEvalVerifier, check_instruction
from kexaone_align.verifiers.ifeval_text import detect_language, sentences, word_tokens

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


def _follows(iid: str, kwargs: dict, response: str, reading: str = "reference", loose: bool = False) -> bool:
    return check_instruction(iid, response, kwargs, loose, reading)


# (instruction id, kwargs, response, verdict with the reference's reading, verdict with ours)
READING_CASES = [
    # \w+ words: "don't" and "well-known" are two words each (7 in all); ours: 5.
    (
        "length_constraints:number_words",
        {"num_words": 6, "relation": "less than"},
        "I don't know well-known facts",
        False,
        True,
    ),
    # Punkt: titles, initials and "p.m." do not end a sentence; a line break without punctuation does not.
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "Dr. Smith met J. R. Tolkien at 5 p.m. today. It rained.",
        True,
        True,
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Item one\nItem two\nItem three",
        True,
        False,
    ),
    # NLTK word tokens: "DON'T" is "DO" + "N'T", two capital words; ours: one.
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": "at least"},
        "DON'T STOP now",
        True,
        False,
    ),
    # Keyword frequency: substrings ("cat" in "category"); ours: whole words.
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        "a category of cat",
        True,
        False,
    ),
    # Keywords are regular expressions to the reference; literal text to us.
    ("keywords:existence", {"keywords": ["e.g."]}, "ergo", True, False),
    # Bullets: any line starting with "-" counts, a "---" rule included; ours needs "- " + text.
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "---\n- one", True, False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[] and [name]", True, False),
    ("punctuation:no_comma", {}, "one，two", True, False),
    # Both readings: English only for the case instructions, an end phrase inside closing quotes,
    # separators before the first and after the last paragraph.
    (
        "change_case:english_lowercase",
        {},
        "el perro corre por el parque todos los días con su dueño",
        False,
        False,
    ),
    ("change_case:english_lowercase", {}, "the weather is lovely today and we walk in the park", True, True),
    ("change_case:english_capital", {}, "THE WEATHER IS LOVELY TODAY AND WE WALK IN THE PARK", True, True),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        '"Done. Any other questions?"',
        True,
        True,
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nA\n***\nB\n***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB", False, False),
    (
        "language:response_language",
        {"language": "ko"},
        "오늘은 날씨가 정말 좋아서 공원에서 산책을 했습니다",
        True,
        True,
    ),
    (
        "language:response_language",
        {"language": "en"},
        "오늘은 날씨가 정말 좋아서 공원에서 산책을 했습니다",
        False,
        False,
    ),
    # No language can be detected in digits: the reference passes it, we do not.
    ("language:response_language", {"language": "en"}, "12345 678", True, False),
]


@pytest.mark.parametrize(("iid", "kwargs", "response", "reference", "ours"), READING_CASES)
def test_reference_and_kexaone_readings(
    iid: str, kwargs: dict, response: str, reference: bool, ours: bool
) -> None:
    assert _follows(iid, kwargs, response) is reference
    assert _follows(iid, kwargs, response, reading="kexaone") is ours


def test_details_report_strict_and_loose_scores() -> None:
    ref = {
        "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
        "kwargs": [{}, {}],
    }
    response = 'Sure, here it is:\n"all done"'
    res = IFEvalVerifier().verify(Sample(prompt="p", response=response, reference=ref))
    assert res.details["strict"] == {"followed": [False, False], "prompt": False, "instruction_fraction": 0.0}
    assert res.details["loose"] == {"followed": [True, True], "prompt": True, "instruction_fraction": 1.0}
    assert res.reward == 0.0 and res.details["reward_from"] == "strict"
    assert (
        IFEvalVerifier(loose=True).verify(Sample(prompt="p", response=response, reference=ref)).reward == 1.0
    )
    assert (
        get_verifier("ifeval_loose").verify(Sample(prompt="p", response=response, reference=ref)).reward
        == 1.0
    )
    per_row = Sample(prompt="p", response=response, reference={**ref, "loose": True})
    assert IFEvalVerifier().verify(per_row).reward == 1.0


def test_kexaone_reading_by_name_and_by_row() -> None:
    ref = {"instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "cat", "frequency": 2}]}
    sample = Sample(prompt="p", response="a category of cat", reference=ref)
    assert IFEvalVerifier().verify(sample).reward == 1.0
    assert get_verifier("ifeval_kexaone").verify(sample).reward == 0.0
    assert get_verifier("ifeval_kexaone").verify(sample).details["reading"] == "kexaone"
    row = Sample(prompt="p", response=sample.response, reference={**ref, "reading": "kexaone"})
    assert IFEvalVerifier().verify(row).reward == 0.0
    with pytest.raises(KexaoneError, match="reading must be one of"):
        IFEvalVerifier().verify(Sample(prompt="p", response="x", reference={**ref, "reading": "lenient"}))
    with pytest.raises(KexaoneError, match="loose must be true or false"):
        IFEvalVerifier().verify(Sample(prompt="p", response="x", reference={**ref, "loose": "yes"}))


def test_empty_response_follows_nothing_and_raw_text_is_checked() -> None:
    ref = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert IFEvalVerifier(loose=True).verify(Sample(prompt="p", response="  \n", reference=ref)).reward == 0.0
    # Leading blank lines make an empty first paragraph, as in the reference.
    ref = {
        "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
        "kwargs": [{"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "hello"}],
    }
    assert IFEvalVerifier().verify(Sample(prompt="p", response="hello a\n\nb", reference=ref)).reward == 1.0
    assert (
        IFEvalVerifier().verify(Sample(prompt="p", response="\n\nhello a\n\nb", reference=ref)).reward == 0.0
    )
    # After a think block the answer is stripped.
    thinking = Sample(prompt="p", response="<think>x</think>\n\nhello a\n\nb", reference=ref)
    assert IFEvalVerifier().verify(thinking).reward == 1.0


def test_punkt_model_gives_nltks_documented_splits() -> None:
    # Outputs from NLTK's own documentation of sent_tokenize / word_tokenize with its English model.
    text = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks."
    assert sentences(text) == [
        "Good muffins cost $3.88\nin New York.",
        "Please buy me\ntwo of them.",
        "Thanks.",
    ]
    assert word_tokens("I called Dr. Jones. I called Dr. Jones.") == (
        ["I", "called", "Dr.", "Jones", "."] * 2
    )
    german = "Ich muss unbedingt daran denken, Mehl, usw. fur einen Kuchen einzukaufen. Ich muss."
    assert word_tokens(german)[8:11] == ["usw", ".", "fur"]


def test_language_detection_is_seeded_without_global_state() -> None:
    from langdetect.detector_factory import DetectorFactory

    before = DetectorFactory.seed
    short = "hello world"  # langdetect wavers between English and Dutch on this when unseeded
    assert len({detect_language(short) for _ in range(8)}) == 1
    assert detect_language("12345") is None
    assert DetectorFactory.seed == before


def test_every_reference_instruction_is_supported() -> None:
    reference_ids = {
        "keywords:existence",
        "keywords:frequency",
        "keywords:forbidden_words",
        "keywords:letter_frequency",
        "language:response_language",
        "length_constraints:number_sentences",
        "length_constraints:number_paragraphs",
        "length_constraints:number_words",
        "length_constraints:nth_paragraph_first_word",
        "detectable_content:number_placeholders",
        "detectable_content:postscript",
        "detectable_format:number_bullet_lists",
        "detectable_format:constrained_response",
        "detectable_format:number_highlighted_sections",
        "detectable_format:multiple_sections",
        "detectable_format:json_format",
        "detectable_format:title",
        "combination:two_responses",
        "combination:repeat_prompt",
        "startend:end_checker",
        "change_case:capital_word_frequency",
        "change_case:english_capital",
        "change_case:english_lowercase",
        "punctuation:no_comma",
        "startend:quotation",
    }
    assert reference_ids <= set(CHECKS)
