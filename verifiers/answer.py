"""Shared answer extraction: what part of a response is graded, and what its final answer is.

Reasoning mode: only the text after the last ``</think>`` counts; a ``<think>`` that never closes means
the model never answered, so there is nothing to grade. Every verifier goes through ``strip_reasoning``
so the rule is the same for math, instruction following, format and choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Anything longer than this is cut to its tail before regex work, so huge responses stay cheap.
MAX_ANSWER_CHARS = 20_000

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is\s*:?|:|=)\s*([^\n]{1,400})",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Stripped:
    """The gradable part of a response. ``answer`` is None when reasoning never closed."""

    answer: str | None
    reasoning: str | None
    reason: str = ""


def strip_reasoning(response: str, *, reasoning: bool | None = None) -> Stripped:
    """Return the text after the last ``</think>``; an unclosed ``<think>`` gives no answer.

    ``reasoning=True`` says the chat template opened the think block in the prompt, so a response
    with no ``</think>`` at all is unfinished reasoning; ``None`` infers the mode from the tags.
    """
    if not isinstance(response, str):
        return Stripped(None, None, f"response is {type(response).__name__}, not text")
    close = response.rfind(THINK_CLOSE)
    if close >= 0:
        answer = response[close + len(THINK_CLOSE) :]
        if THINK_OPEN in answer:  # a new reasoning block opened after the last close and never closed
            return Stripped(None, response, "reasoning block <think> never closed")
        return Stripped(answer.strip(), response[:close])
    if THINK_OPEN in response:
        return Stripped(None, response, "reasoning block <think> never closed")
    if reasoning:
        return Stripped(None, response, "reasoning mode but no </think> in the response")
    return Stripped(response.strip(), None)


def matching_braces(text: str) -> dict[int, int]:
    """Position of each unescaped ``{`` -> its closing ``}``, in one linear pass (no quadratic rescans)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch not in "{}" or (i > 0 and text[i - 1] == "\\"):
            continue
        if ch == "{":
            stack.append(i)
        elif stack:
            pairs[stack.pop()] = i
    return pairs


def boxed_answers(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order (unclosed ones are skipped)."""
    found = []
    pairs: dict[int, int] | None = None
    for m in _BOXED_RE.finditer(text):
        if pairs is None:
            pairs = matching_braces(text)
        close = pairs.get(m.end() - 1)
        if close is not None:
            found.append(text[m.end() : close].strip())
    return found


def _clean_phrase(phrase: str) -> str:
    phrase = phrase.strip()
    for a, b in (("**", "**"), ("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if phrase.startswith(a) and phrase.endswith(b) and len(phrase) > len(a) + len(b):
            phrase = phrase[len(a) : -len(b)].strip()
    return phrase.rstrip(" .;,").strip()


def answer_phrases(text: str) -> list[str]:
    """Phrases after "the answer is" / "Answer:" / "final answer:" (one per occurrence)."""
    out = []
    for m in _ANSWER_IS_RE.finditer(text):
        phrase = m.group(1)
        # Keep the first sentence of the phrase: "3. Then ..." -> "3"
        cut = re.search(r"\.\s+[A-Z]|\.$", phrase)
        if cut:
            phrase = phrase[: cut.start()]
        phrase = _clean_phrase(phrase)
        if phrase:
            out.append(phrase)
    return out


def last_line(text: str) -> str:
    """Last non-empty line, the weakest final-answer signal."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def final_answers(text: str) -> tuple[list[str], str]:
    """Candidate final answers and where they came from: ``boxed``, ``answer_is`` or ``last_line``.

    Several candidates mean the response stated several final answers; the caller decides whether
    they agree.
    """
    text = text[-MAX_ANSWER_CHARS:]
    boxed = boxed_answers(text)
    if boxed:
        return boxed, "boxed"
    phrases = answer_phrases(text)
    if phrases:
        return phrases, "answer_is"
    line = last_line(text)
    return ([line] if line else []), "last_line"


def unique(items: list[str]) -> list[str]:
    """Order-preserving de-duplication after whitespace normalisation."""
    seen: dict[str, str] = {}
    for item in items:
        key = " ".join(item.split())
        seen.setdefault(key, item)
    return list(seen.values())
