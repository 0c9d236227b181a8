"""The ``ifeval`` verifier: IFEval's verifiable instructions, one small checker per instruction id.

Reference: ``{"instruction_id_list": [...], "kwargs": [{...}, ...]}`` (IFEval's layout). Reward is the
fraction of instructions followed (``mode="fraction"``, the default) or 1/0 for all of them
(``mode="all"``). Both of IFEval's scores are computed and reported in ``details``: ``strict`` (the
response as it is) and ``loose`` (an instruction also counts as followed when the response passes with
markdown ``*`` removed and/or its first or last line dropped); the reward uses ``loose`` only when asked.
An empty response follows no instruction. A response without a think block is checked exactly as
written; with one, only the text after the last ``</think>`` is checked, stripped of surrounding
whitespace.

Readings (``reading``): ``"reference"`` (the default) agrees with Google's reference checkers, the
ones IFEval scores are measured with (same tokenizers: NLTK Punkt sentences, ``\\w+`` words, NLTK word
tokens, langdetect). ``"kexaone"`` keeps our stricter readings where we think the reference is wrong:
contractions and hyphenated words count as one word, every non-empty line ends a sentence, capital
words are whole words ("DON'T" is one, not two), keyword frequency counts whole words (the reference
counts "cat" in "category"), keywords, section splitters and postscript markers are literal text (the
reference reads them as regular expressions), a bullet needs a marker followed by a space (the
reference counts a ``---`` rule or "-5 degrees"), a placeholder needs text inside the brackets, a
full-width comma is a comma, and an undetectable language fails (the reference passes it). The row's
reference may carry ``"mode"``, ``"loose"`` and ``"reading"`` to override the verifier's settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from kexaone_align.verifiers import ifeval_text as text
from kexaone_align.verifiers.answer import strip_reasoning
from kexaone_align.verifiers.api import Sample, VerifyResult, register_verifier

from kexaone_align.errors import KexaoneError

READINGS = ("reference", "kexaone")
Check = Callable[..., bool]
CHECKS: dict[str, Check] = {}


def instruction(instruction_id: str) -> Callable[[Check], Check]:
    """Register ``fn(response, own, **kwargs) -> bool`` for ``instruction_id`` (``own``: kexaone reading)."""

    def decorate(fn: Check) -> Check:
        CHECKS[instruction_id] = fn
        return fn

    return decorate


def _compare(value: int, relation: str | None, target: Any) -> bool:
    target = int(target)
    relation = (relation or "at least").strip().lower()
    if relation in ("less than", "<"):
        return value < target
    if relation in ("at least", ">="):
        return value >= target
    if relation in ("at most", "<="):
        return value <= target
    if relation in ("more than", ">"):
        return value > target
    if relation in ("exactly", "=", "=="):
        return value == target
    raise KexaoneError(f"unknown relation {relation!r} (use 'less than', 'at least', 'at most', 'exactly')")


def _pattern(phrase: str, own: bool, around: str = "{}") -> str:
    """``around`` with ``phrase`` put in: the reference reads keywords, section splitters and postscript
    markers as regular expressions ("e.g." also matches "ergo"); ours reads them as literal text. A
    phrase that makes no valid regex is literal in both."""
    if not own:
        try:
            return re.compile(around.format(phrase)).pattern
        except re.error:
            pass
    return around.format(re.escape(phrase))


@instruction("length_constraints:number_words")
def number_words(response: str, own: bool, num_words: int, relation: str = "at least") -> bool:
    words = text.own_words(response) if own else text.reference_words(response)
    return _compare(len(words), relation, num_words)


@instruction("length_constraints:number_sentences")
def number_sentences(response: str, own: bool, num_sentences: int, relation: str = "at least") -> bool:
    found = text.own_sentences(response) if own else text.sentences(response)
    return _compare(len(found), relation, num_sentences)


@instruction("length_constraints:number_paragraphs")
def number_paragraphs(response: str, own: bool, num_paragraphs: int) -> bool:
    """Paragraphs are separated by a markdown divider ``***``; one before the first or after the last
    paragraph is allowed, an empty paragraph between two dividers is not."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    inner = parts[1:-1]
    if any(not p.strip() for p in inner):
        return False
    return sum(1 for p in parts if p.strip()) == int(num_paragraphs)


@instruction("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(
    response: str, own: bool, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """Paragraphs separated by a blank line; the nth must start with ``first_word`` (case-insensitive,
    quotes before it and punctuation after it ignored)."""
    paragraphs = re.split(r"\n[ \t]*\n" if own else r"\n\n", response)
    count = sum(1 for p in paragraphs if p.strip())
    nth = int(nth_paragraph)
    if not 1 <= nth <= count or not paragraphs[nth - 1].strip():
        return False
    word = paragraphs[nth - 1].split()[0].lstrip("'").lstrip('"')
    first = re.match("[^.,?!'\"]*", word).group(0).lower()  # type: ignore[union-attr]
    wanted = first_word.strip().lower() if own else first_word.lower()
    return count == int(num_paragraphs) and first == wanted


@instruction("keywords:existence")
def keyword_existence(response: str, own: bool, keywords: list[str]) -> bool:
    return all(re.search(_pattern(k, own), response, re.IGNORECASE) for k in keywords)


@instruction("keywords:forbidden_words")
def forbidden_words(response: str, own: bool, forbidden_words: list[str]) -> bool:
    return not any(re.search(_pattern(w, own, r"\b{}\b"), response, re.IGNORECASE) for w in forbidden_words)


@instruction("keywords:frequency")
def keyword_frequency(
    response: str, own: bool, keyword: str, frequency: int, relation: str = "at least"
) -> bool:
    """Occurrences of ``keyword``, case-insensitive: as a substring (reference) or a whole word (kexaone)."""
    pattern = _pattern(keyword.strip(), own)
    if own:
        pattern = r"(?<!\w)" + pattern + r"(?!\w)"
    return _compare(len(re.findall(pattern, response, re.IGNORECASE)), relation, frequency)


@instruction("keywords:letter_frequency")
def letter_frequency(
    response: str, own: bool, letter: str, let_frequency: int, let_relation: str = "at least"
) -> bool:
    return _compare(response.lower().count(letter.strip().lower()), let_relation, let_frequency)


@instruction("language:response_language")
def response_language(response: str, own: bool, language: str) -> bool:
    """The response is in ``language`` (an ISO 639-1 code, as langdetect reports it); kexaone reading:
    "zh" also matches "zh-cn"/"zh-tw", and text with no detectable language fails."""
    found = text.detect_language(response)
    if found is None:
        return not own
    wanted = language.strip().lower()
    return found == wanted or (own and found.split("-")[0] == wanted)


@instruction("detectable_format:json_format")
def json_format(response: str, own: bool) -> bool:
    """The whole response is JSON; a surrounding markdown code fence (```json) is allowed."""
    body = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


@instruction("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, own: bool, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullets: lines starting with ``*`` (not ``**``) or ``-``."""
    if own:
        bullets = re.findall(r"^[ \t]*[*-][ \t]+\S", response, re.MULTILINE)
    else:
        bullets = re.findall(r"^\s*\*[^*].*$", response, re.MULTILINE)
        bullets += re.findall(r"^\s*-.*$", response, re.MULTILINE)
    return len(bullets) == int(num_bullets)


@instruction("detectable_format:title")
def title(response: str, own: bool) -> bool:
    """A title wrapped in double angular brackets, like <<poem of joy>>."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


@instruction("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, own: bool, num_highlights: int) -> bool:
    """At least ``num_highlights`` non-empty markdown highlights like *highlighted* or **highlighted**."""
    singles = [h for h in re.findall(r"\*([^\n*]*)\*", response) if h.strip()]
    doubles = [h for h in re.findall(r"\*\*([^\n*]*)\*\*", response) if h.strip()]
    return len(singles) + len(doubles) >= int(num_highlights)


@instruction("detectable_format:multiple_sections")
def multiple_sections(response: str, own: bool, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` sections, each starting with e.g. ``SECTION 1``."""
    pattern = _pattern(section_spliter.strip(), own, r"\s?{}\s?\d+\s?")
    return len(re.split(pattern, response)) - 1 >= int(num_sections)


@instruction("detectable_format:constrained_response")
def constrained_response(response: str, own: bool, options: list[str] | None = None) -> bool:
    options = options or ["My answer is yes.", "My answer is no.", "My answer is maybe."]
    return any(o in response.strip() for o in options)


@instruction("startend:end_checker")
def end_checker(response: str, own: bool, end_phrase: str) -> bool:
    """Ends with ``end_phrase`` (case-insensitive), inside the closing quotation mark if it is quoted."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@instruction("startend:quotation")
def quotation(response: str, own: bool) -> bool:
    body = response.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


@instruction("punctuation:no_comma")
def no_comma(response: str, own: bool) -> bool:
    return "," not in response and not (own and "，" in response)


def _english(response: str, own: bool) -> bool:
    found = text.detect_language(response)
    return found == "en" if (own or found is not None) else True


@instruction("change_case:english_lowercase")
def english_lowercase(response: str, own: bool) -> bool:
    """All letters lowercase (at least one cased letter) and the text is English (langdetect)."""
    return response.islower() and _english(response, own)


@instruction("change_case:english_capital")
def english_capital(response: str, own: bool) -> bool:
    """All letters capital (at least one cased letter) and the text is English (langdetect)."""
    return response.isupper() and _english(response, own)


@instruction("change_case:capital_word_frequency")
def capital_word_frequency(
    response: str, own: bool, capital_frequency: int, capital_relation: str = "at least"
) -> bool:
    """Words in capitals: NLTK word tokens (reference; "DON'T" is two) or whole words (kexaone)."""
    words = text.own_words(response) if own else text.word_tokens(response)
    return _compare(sum(1 for w in words if w.isupper()), capital_relation, capital_frequency)


@instruction("detectable_content:number_placeholders")
def number_placeholders(response: str, own: bool, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as [address]."""
    pattern = r"\[[^\[\]\n]*\w[^\[\]\n]*\]" if own else r"\[.*?\]"
    return len(re.findall(pattern, response)) >= int(num_placeholders)


@instruction("detectable_content:postscript")
def postscript(response: str, own: bool, postscript_marker: str = "P.S.") -> bool:
    """A line holding the marker (``P.S.``, ``P.P.S`` or any other text), case-insensitive."""
    marker = postscript_marker.strip()
    if marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    elif marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    else:
        pattern = _pattern(marker.lower(), own, r"\s*{}.*$")
    return re.search(pattern, response.lower(), re.MULTILINE) is not None


@instruction("combination:repeat_prompt")
def repeat_prompt(response: str, own: bool, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@instruction("combination:two_responses")
def two_responses(response: str, own: bool) -> bool:
    """Two different responses separated by six asterisks ``******`` (one before or after is allowed)."""
    parts = response.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


@instruction("startend:start_checker")
def start_checker(response: str, own: bool, start_phrase: str) -> bool:
    """Not in IFEval: starts with ``start_phrase`` (case-insensitive)."""
    return response.strip().lower().startswith(start_phrase.strip().lower())


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: the response with its first and/or last line dropped, each also with
    every ``*`` removed; empty variants are skipped."""
    lines = response.split("\n")
    bases = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return [v for b in bases for v in (b, b.replace("*", "")) if v.strip()]


def _clean_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    # IFEval's data stores every possible kwarg with None for the unused ones.
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def check_instruction(
    instruction_id: str,
    response: str,
    kwargs: dict[str, Any] | None,
    loose: bool,
    reading: str = "reference",
) -> bool:
    """Whether ``response`` follows one instruction; unknown ids and bad kwargs raise ``KexaoneError``."""
    fn = CHECKS.get(instruction_id)
    if fn is None:
        raise KexaoneError(f"unknown instruction id {instruction_id!r}; known: {', '.join(sorted(CHECKS))}")
    if reading not in READINGS:
        raise KexaoneError(f"ifeval reading must be one of {READINGS}, got {reading!r}")
    clean = _clean_kwargs(kwargs)
    own = reading == "kexaone"
    variants = loose_variants(response) if loose else [response] if response.strip() else []
    try:
        return any(fn(v, own, **clean) for v in variants)
    except (TypeError, ValueError, AttributeError) as exc:
        raise KexaoneError(f"bad kwargs {clean!r} for instruction {instruction_id!r}: {exc}") from exc


def _parse_reference(reference: Any) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except ValueError:
            raise KexaoneError(
                "ifeval reference must be a dict with 'instruction_id_list' and 'kwargs'"
            ) from None
    if not isinstance(reference, dict) or "instruction_id_list" not in reference:
        raise KexaoneError(
            f"ifeval reference must be a dict with 'instruction_id_list' and 'kwargs', got {reference!r}"
        )
    ids = list(reference["instruction_id_list"])
    kwargs = reference.get("kwargs") or [{} for _ in ids]
    if len(kwargs) != len(ids):
        raise KexaoneError(
            f"ifeval reference has {len(ids)} instruction ids but {len(kwargs)} kwargs entries"
        )
    overrides = {k: reference[k] for k in ("mode", "loose", "reading") if reference.get(k) is not None}
    return ids, list(kwargs), overrides


def _check_settings(mode: Any, loose: Any, reading: Any) -> None:
    if mode not in ("fraction", "all"):
        raise KexaoneError(f"ifeval mode must be 'fraction' or 'all', got {mode!r}")
    if not isinstance(loose, bool):
        raise KexaoneError(f"ifeval loose must be true or false, got {loose!r}")
    if reading not in READINGS:
        raise KexaoneError(f"ifeval reading must be one of {READINGS}, got {reading!r}")


def _score(followed: list[bool]) -> dict[str, Any]:
    return {
        "followed": followed,
        "prompt": all(followed),
        "instruction_fraction": sum(followed) / len(followed) if followed else 1.0,
    }


@register_verifier("instruction_following")
@register_verifier("ifeval")
class IFEvalVerifier:
    """Grades IFEval's verifiable instructions; see the module docstring for the layout and readings.

    ``details`` reports both IFEval scores (``strict`` and ``loose``: per-instruction verdicts, the
    prompt-level verdict and the instruction-level fraction); ``followed``/``failed`` are the ones the
    reward is computed from (loose when ``loose``)."""

    name = "ifeval"

    def __init__(self, mode: str = "fraction", loose: bool = False, reading: str = "reference") -> None:
        _check_settings(mode, loose, reading)
        self.mode = mode
        self.loose = loose
        self.reading = reading
        # Tokenizer and language-profile loading (seconds on a busy machine) happens here, not inside
        # the first graded response's time limit.
        text.warm_up()

    def verify(self, sample: Sample) -> VerifyResult:
        ids, kwargs, overrides = _parse_reference(sample.reference)
        mode = overrides.get("mode", self.mode)
        loose = overrides.get("loose", self.loose)
        reading = overrides.get("reading", self.reading)
        _check_settings(mode, loose, reading)
        stripped = strip_reasoning(sample.response, reasoning=sample.metadata.get("reasoning"))
        if stripped.answer is None:
            return VerifyResult(0.0, {"reason": stripped.reason, "followed": [False] * len(ids)})
        if not ids:
            return VerifyResult(1.0, {"reason": "no instructions", "followed": []})
        # Without a think block the response is checked exactly as written, as the reference does
        # (leading blank lines change paragraph and first/last-line verdicts); after one, the answer.
        answer = sample.response if stripped.reasoning is None else stripped.answer
        pairs = list(zip(ids, kwargs, strict=True))
        strict_ok = [check_instruction(i, answer, kw, False, reading) for i, kw in pairs]
        # A check that passes strictly passes loosely (the response itself is a loose variant).
        relaxed = [
            ok or check_instruction(i, answer, kw, True, reading)
            for ok, (i, kw) in zip(strict_ok, pairs, strict=True)
        ]
        followed = relaxed if loose else strict_ok
        reward = sum(followed) / len(followed) if mode == "fraction" else float(all(followed))
        failed = [i for i, ok in zip(ids, followed, strict=True) if not ok]
        return VerifyResult(
            reward,
            {
                "followed": followed,
                "failed": failed,
                "mode": mode,
                "reward_from": "loose" if loose else "strict",
                "reading": reading,
                "strict": _score(strict_ok),
                "loose": _score(relaxed),
            },
        )


@register_verifier("ifeval_loose")
class LooseIFEvalVerifier(IFEvalVerifier):
    """``ifeval`` rewarded by IFEval's loose score (a recipe names verifiers, so this is the loose door)."""

    name = "ifeval_loose"

    def __init__(self, mode: str = "fraction", loose: bool = True, reading: str = "reference") -> None:
        super().__init__(mode=mode, loose=loose, reading=reading)


@register_verifier("ifeval_kexaone")
class KexaoneIFEvalVerifier(IFEvalVerifier):
    """``ifeval`` with our stricter readings (``reading="kexaone"``; see the module docstring)."""

    name = "ifeval_kexaone"

    def __init__(self, mode: str = "fraction", loose: bool = False, reading: str = "kexaone") -> None:
        super().__init__(mode=mode, loose=loose, reading=reading)
