"""Trajectory compression of tool episodes: past N tool calls, the history becomes one JSON record.

The record is ``{"task": ..., "facts": [...], "open_questions": [...], "tool_calls": n}``. Its producer is
either the policy itself (the rollout backend is asked, in a fixed user turn after the last tool results,
to write the record as JSON) or a judge backend (any ``reward_models`` backend: ``complete(messages)``).
A producer's text that is not such a record (no JSON object, missing or non-string fields, a backend
error or timeout) never stops the episode: a deterministic record is built from the tool calls and their
results instead, and the episode counts a fallback.

The context the policy continues from is the prompt, an empty assistant turn, the record as a user turn
(:data:`RECORD_INTRO` + the JSON) and a fresh assistant header, exactly as the chat template renders those
messages, so it extends the prompt token for token (see ``episodes.py`` for what is trained).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from kexaone_align.errors import KexaoneError

PRODUCERS = ("policy", "judge")
MAX_ITEMS = 24  # facts / open questions kept in one record
MAX_ITEM_CHARS = 400
INSTRUCTION = (
    "Stop calling tools for now. Summarise the work on this task so far as one JSON object with the keys "
    '"facts" (a list of strings: what the tool results established) and "open_questions" (a list of '
    "strings: what is still unknown or left to do). Write only the JSON object."
)
RECORD_INTRO = (
    "Your earlier turns on this task were compressed into the record below (facts found, open questions). "
    "Continue from it; the tools are still available.\n"
)
_FENCE_RE = re.compile(r"^```(?:json)?\s*|\s*```$")

_JUDGES: dict[str, Any] = {}
_JUDGE_LOCK = threading.Lock()


@dataclass(frozen=True)
class CompressionSpec:
    """How an episode compresses: after ``after_calls`` tool calls (since the last record), by ``producer``
    (``policy`` or ``judge``), with at most ``max_tokens`` tokens of producer output. ``judge`` is the
    judge backend's settings (``backend`` ``openai`` / ``local``, ``model``, ``base_url``, ``timeout_s``)."""

    after_calls: int
    producer: str = "policy"
    max_tokens: int = 256
    judge: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.after_calls, int) or self.after_calls < 1:
            raise KexaoneError(f"compression after_calls must be an integer >= 1, got {self.after_calls!r}")
        if self.producer not in PRODUCERS:
            raise KexaoneError(
                f"compression producer must be one of {list(PRODUCERS)}, got {self.producer!r}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise KexaoneError(f"compression max_tokens must be an integer >= 1, got {self.max_tokens!r}")


def task_text(row: Any) -> str:
    """The task a record is about: the row's last user message."""
    users = [m for m in row.messages if m.get("role") == "user"]
    content = users[-1]["content"] if users else ""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ITEM_CHARS else text[:MAX_ITEM_CHARS] + "..."


def parse_record(text: str, task: str, tool_calls: int) -> dict[str, Any] | None:
    """The record in a producer's ``text`` (a JSON object, optionally fenced, with string lists ``facts``
    and ``open_questions``), normalised; None when there is no such object."""
    body = _FENCE_RE.sub("", (text or "").strip())
    obj: Any = None
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        start, end = body.find("{"), body.rfind("}")
        if 0 <= start < end:
            try:
                obj = json.loads(body[start : end + 1])
            except (json.JSONDecodeError, ValueError):
                return None
    if not isinstance(obj, dict):
        return None
    lists = {}
    for key in ("facts", "open_questions"):
        value = obj.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None
        lists[key] = [_clip(v) for v in value][:MAX_ITEMS]
    return {"task": task, **lists, "tool_calls": tool_calls}


def fallback_record(
    task: str, history: list[dict[str, Any]], previous: dict[str, Any] | None, tool_calls: int
) -> dict[str, Any]:
    """The deterministic record: the previous record's items, each successful call and its result as a
    fact, each failed call as an open question (the latest ``MAX_ITEMS`` of each)."""
    facts = list(previous["facts"]) if previous else []
    questions = list(previous["open_questions"]) if previous else []
    for h in history:
        call = f"{h['name']}({json.dumps(h['arguments'], sort_keys=True, ensure_ascii=False)})"
        if h["error"]:
            questions.append(_clip(f"{call} failed: {h['result']}"))
        else:
            facts.append(_clip(f"{call} returned {h['result']}"))
    return {"task": task, "facts": facts[-MAX_ITEMS:], "open_questions": questions[-MAX_ITEMS:],
            "tool_calls": tool_calls}  # fmt: skip


def record_message(record: dict[str, Any]) -> str:
    """The user turn that carries ``record`` in the compressed context."""
    return RECORD_INTRO + json.dumps(record, ensure_ascii=False)


def judge_messages(task: str, history: list[dict[str, Any]], previous: dict[str, Any] | None) -> list:
    """What a judge backend is sent: the instruction, the task, the previous record and the new calls."""
    lines = [f"Task: {task}"]
    if previous:
        lines.append("Record so far: " + json.dumps(previous, ensure_ascii=False))
    lines.append("Tool calls since then:")
    for i, h in enumerate(history, 1):
        args = json.dumps(h["arguments"], sort_keys=True, ensure_ascii=False)
        lines.append(f"{i}. {h['name']}({args}) -> {h['result']}")
    return [
        {"role": "system", "content": "You compress an agent's tool-use history. " + INSTRUCTION},
        {"role": "user", "content": "\n".join(lines)},
    ]


def judge_backend(settings: dict[str, Any]) -> Any:
    """The judge backend ``settings`` describe, built once per process (a worker loads a local judge once)."""
    key = json.dumps(settings, sort_keys=True)
    with _JUDGE_LOCK:
        if key not in _JUDGES:
            from kexaone_align.reward_models.backends import backend_from_settings

            _JUDGES[key] = backend_from_settings(settings)
        return _JUDGES[key]


def judge_texts(backend: Any, batch: list[list], max_tokens: int, timeout_s: float) -> list[str | None]:
    """One completion per chat from a judge backend, None where it failed or ran past ``timeout_s``."""
    from kexaone_align.reward_models.backends.base import complete_each
    from kexaone_align.reward_models.judge import call_with_timeout

    if not batch:
        return []

    def run() -> list[Any]:
        if getattr(backend, "batched", False) and callable(getattr(backend, "complete_batch", None)):
            return backend.complete_batch(batch, max_tokens=max_tokens, temperature=0.0)
        return complete_each(backend, batch, max_tokens=max_tokens, temperature=0.0)

    try:
        texts = call_with_timeout(run, timeout_s * len(batch))
    except Exception:
        return [None] * len(batch)
    if len(texts) != len(batch):
        return [None] * len(batch)
    return [t if isinstance(t, str) else None for t in texts]
