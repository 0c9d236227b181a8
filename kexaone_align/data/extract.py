"""Reference-answer extractors for the dataset shapes users bring (GSM8K, MATH, plain answers).

Each extractor turns the text of a dataset's answer column into the short string a verifier grades
against. They are pure functions of one string, so a recipe names one (``data.columns.reference_extractor``)
and every row goes through it; a row the extractor cannot read is an error naming the row, never a
silently empty reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kexaone_align.errors import KexaoneError

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def gsm8k_answer(text: str) -> str:
    """The answer after the last ``####`` of a GSM8K solution; thousands commas dropped ("1,200" -> 1200)."""
    _, mark, tail = text.rpartition("####")
    if not mark:
        raise ValueError("no '#### <answer>' line")
    answer = tail.strip()
    if not answer:
        raise ValueError("nothing after '####'")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer


def boxed_answer(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces kept whole.

    Escaped braces (``\\{``, ``\\}``) inside count as text, as in LaTeX. MATH solutions box their final
    answer, sometimes after boxing intermediate results, hence the last one.
    """
    found: list[str] = []
    for match in _BOXED.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            i += 1
        if depth == 0:
            found.append(text[match.end() : i - 1].strip())
    if not found:
        raise ValueError("no closed \\boxed{...}")
    if not found[-1]:
        raise ValueError("the last \\boxed{} is empty")
    return found[-1]


def raw_answer(text: str) -> str:
    """The column's text as given (surrounding whitespace dropped)."""
    return text.strip()


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "raw": raw_answer,
    "gsm8k": gsm8k_answer,
    "boxed": boxed_answer,
}


def extract_answer(name: str, value: object, where: str) -> str:
    """Apply extractor ``name`` to one row's answer ``value``; errors name ``where`` and the problem."""
    if name not in EXTRACTORS:
        raise KexaoneError(f"unknown answer extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")
    if isinstance(value, int | float) and not isinstance(value, bool) and name == "raw":
        return str(value)
    if not isinstance(value, str):
        raise KexaoneError(f"{where}: the answer must be text for extractor {name!r}, got {value!r:.80}")
    try:
        return EXTRACTORS[name](value)
    except ValueError as exc:
        raise KexaoneError(f"{where}: answer extractor {name!r} found {exc} in {value[-120:]!r}") from None
