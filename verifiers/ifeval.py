"""The ``ifeval`` verifier: IFEval-style verifiable instructions, one small checker per instruction id.

Reference: ``{"instruction_id_list": [...], "kwargs": [{...}, ...]}`` (IFEval's layout). Reward is the
fraction of instructions followed (``mode="fraction"``, the default) or 1/0 for all of them
(``mode="all"``); the reference may carry ``"mode"`` to override per row. ``loose=True`` also accepts a
response that passes once markdown emphasis or its first/last line is removed, like IFEval's loose
metric. In reasoning mode only the text after the last ``</think>`` is checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from kexaone_align.verifiers.answer import strip_reasoning
from kexaone_align.verifiers.api import Sample, VerifyResult, register_verifier

from kexaone_align.errors import KexaoneError

Check = Callable[..., bool]
CHECKS: dict[str, Check] = {}


def instruction(instruction_id: str) -> Callable[[Check], Check]:
    """Register ``fn(response, **kwargs) -> bool`` as the checker for ``instruction_id``."""

    def decorate(fn: Check) -> Check:
        CHECKS[instruction_id] = fn
        return fn

    return decorate


def _compare(value: int, relation: str | None, target: int) -> bool:
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


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w[\w'-]*\b", text)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p for p in parts if re.search(r"\w", p)]


@instruction("length_constraints:number_words")
def number_words(response: str, num_words: int, relation: str = "at least") -> bool:
    return _compare(len(_words(response)), relation, int(num_words))


@instruction("length_constraints:number_sentences")
def number_sentences(response: str, num_sentences: int, relation: str = "at least") -> bool:
    return _compare(len(_sentences(response)), relation, int(num_sentences))


@instruction("length_constraints:number_paragraphs")
def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Paragraphs are separated by a markdown divider ``***`` (IFEval's convention)."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    if any(not p.strip() for i, p in enumerate(parts) if 0 < i < len(parts) - 1):
        return False
    return len([p for p in parts if p.strip()]) == int(num_paragraphs)


@instruction("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs separated by blank lines; the nth must start with ``first_word``."""
    paragraphs = [p for p in re.split(r"\n\s*\n", response) if p.strip()]
    if len(paragraphs) != int(num_paragraphs) or not 1 <= int(nth_paragraph) <= len(paragraphs):
        return False
    words = _words(paragraphs[int(nth_paragraph) - 1])
    return bool(words) and words[0].lower() == first_word.strip().lower()


@instruction("keywords:existence")
def keyword_existence(response: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), response, re.IGNORECASE) for k in keywords)


@instruction("keywords:forbidden_words")
def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, re.IGNORECASE) for w in forbidden_words)


@instruction("keywords:frequency")
def keyword_frequency(response: str, keyword: str, frequency: int, relation: str = "at least") -> bool:
    count = len(re.findall(r"\b" + re.escape(keyword) + r"\b", response, re.IGNORECASE))
    return _compare(count, relation, int(frequency))


@instruction("keywords:letter_frequency")
def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str = "at least") -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, int(let_frequency))


@instruction("detectable_format:json_format")
def json_format(response: str) -> bool:
    """The whole response is JSON (a surrounding ```json fence is allowed)."""
    text = response.strip()
    fence = re.fullmatch(r"```(?:json|JSON|Json)?\s*\n?(.*?)\n?```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@instruction("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullets (``*`` or ``-`` at line start)."""
    bullets = re.findall(r"^\s*[*-][ \t]+\S", response, re.MULTILINE)
    return len(bullets) == int(num_bullets)


@instruction("detectable_format:title")
def title(response: str) -> bool:
    """A title wrapped in double angular brackets, like <<poem of joy>>."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


@instruction("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least ``num_highlights`` markdown highlights like *highlighted* or **highlighted**."""
    singles = [h for h in re.findall(r"(?<!\*)\*([^\n*]+)\*(?!\*)", response) if h.strip()]
    doubles = [h for h in re.findall(r"\*\*([^\n*]+)\*\*", response) if h.strip()]
    return len(singles) + len(doubles) >= int(num_highlights)


@instruction("detectable_format:multiple_sections")
def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` sections, each starting with e.g. ``SECTION 1``."""
    pattern = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= int(num_sections)


@instruction("detectable_format:constrained_response")
def constrained_response(response: str, options: list[str] | None = None) -> bool:
    options = options or ["My answer is yes.", "My answer is no.", "My answer is maybe."]
    return any(o in response.strip() for o in options)


@instruction("startend:end_checker")
def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().lower().endswith(end_phrase.strip().lower())


@instruction("startend:quotation")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@instruction("punctuation:no_comma")
def no_comma(response: str) -> bool:
    return "," not in response and "，" not in response


@instruction("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    return response == response.lower() and any(c.isalpha() for c in response)


@instruction("change_case:english_capital")
def english_capital(response: str) -> bool:
    return response == response.upper() and any(c.isalpha() for c in response)


@instruction("change_case:capital_word_frequency")
def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str = "at least") -> bool:
    capitals = [w for w in _words(response) if w.isupper() and any(c.isalpha() for c in w)]
    return _compare(len(capitals), capital_relation, int(capital_frequency))


@instruction("detectable_content:number_placeholders")
def number_placeholders(response: str, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as [address]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= int(num_placeholders)


@instruction("detectable_content:postscript")
def postscript(response: str, postscript_marker: str = "P.S.") -> bool:
    marker = postscript_marker.strip()
    if marker.upper() == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    elif marker.upper() == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return re.search(pattern, response.lower(), re.MULTILINE) is not None


@instruction("combination:repeat_prompt")
def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@instruction("combination:two_responses")
def two_responses(response: str) -> bool:
    """Two different responses separated by six asterisks ``******``."""
    parts = response.split("******")
    if len(parts) != 2:
        return False
    a, b = parts[0].strip(), parts[1].strip()
    return bool(a) and bool(b) and a != b


@instruction("startend:start_checker")
def start_checker(response: str, start_phrase: str) -> bool:
    return response.strip().lower().startswith(start_phrase.strip().lower())


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    bases = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return [v for b in bases for v in (b, b.replace("*", ""))]


def _clean_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    # IFEval's data stores every possible kwarg with None for the unused ones.
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def check_instruction(instruction_id: str, response: str, kwargs: dict[str, Any] | None, loose: bool) -> bool:
    """Whether ``response`` follows one instruction; unknown ids and bad kwargs raise ``KexaoneError``."""
    fn = CHECKS.get(instruction_id)
    if fn is None:
        raise KexaoneError(f"unknown instruction id {instruction_id!r}; known: {', '.join(sorted(CHECKS))}")
    clean = _clean_kwargs(kwargs)
    variants = _loose_variants(response) if loose else [response]
    try:
        return any(fn(v, **clean) for v in variants if v.strip() or v == response)
    except TypeError as exc:
        raise KexaoneError(f"bad kwargs {clean!r} for instruction {instruction_id!r}: {exc}") from exc


def _parse_reference(reference: Any) -> tuple[list[str], list[dict[str, Any]], str | None]:
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
    return ids, list(kwargs), reference.get("mode")


@register_verifier("instruction_following")
@register_verifier("ifeval")
class IFEvalVerifier:
    """Grades IFEval-style verifiable instructions; see the module docstring for the reference layout."""

    name = "ifeval"

    def __init__(self, mode: str = "fraction", loose: bool = False) -> None:
        if mode not in ("fraction", "all"):
            raise KexaoneError(f"ifeval mode must be 'fraction' or 'all', got {mode!r}")
        self.mode = mode
        self.loose = loose

    def verify(self, sample: Sample) -> VerifyResult:
        ids, kwargs, mode = _parse_reference(sample.reference)
        mode = mode or self.mode
        stripped = strip_reasoning(sample.response, reasoning=sample.metadata.get("reasoning"))
        if stripped.answer is None:
            return VerifyResult(0.0, {"reason": stripped.reason, "followed": [False] * len(ids)})
        followed = [
            check_instruction(i, stripped.answer, kw, self.loose) for i, kw in zip(ids, kwargs, strict=True)
        ]
        if not ids:
            return VerifyResult(1.0, {"reason": "no instructions", "followed": []})
        frac = sum(followed) / len(followed)
        reward = frac if mode == "fraction" else float(all(followed))
        failed = [i for i, ok in zip(ids, followed, strict=True) if not ok]
        return VerifyResult(reward, {"followed": followed, "failed": failed, "mode": mode})
