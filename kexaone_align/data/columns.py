"""Column mapping: rows of other shapes (GSM8K, MATH, chat ``messages``) into the toolkit's row format.

A recipe's ``data.columns`` section says which column holds the question, the chat, the answer to train
on and the answer to grade against, and which extractor turns that answer into a reference
(``kexaone_align.data.extract``). A ``preset`` fills those for a common shape; keys set next to it win.
With no preset and no column named, rows are read in the toolkit's own format unchanged
(``messages`` + ``task`` + ``reference`` for prompt sets, ``messages`` for SFT).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from kexaone_align.data.extract import extract_answer
from kexaone_align.errors import KexaoneError

PRESETS: dict[str, dict[str, str]] = {
    # GSM8K: question / answer, the worked answer ends "#### 42"
    "gsm8k": {
        "prompt": "question",
        "reference": "answer",
        "response": "answer",
        "reference_extractor": "gsm8k",
        "task": "math",
    },
    # MATH (Hendrycks): problem / solution with the final answer in \boxed{}
    "math": {
        "prompt": "problem",
        "reference": "solution",
        "response": "solution",
        "reference_extractor": "boxed",
        "task": "math",
    },
    # chat: a `messages` column (SFT trains on it; prompts end before its final assistant turn)
    "chat": {"messages": "messages"},
}


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a dataset row mean what (see ``data.columns`` in the recipe schema)."""

    preset: str = "none"
    prompt: str | None = None
    messages: str | None = None
    response: str | None = None
    reference: str | None = None
    reference_extractor: str = "raw"
    task: str | None = None
    task_column: str | None = None
    id: str | None = None
    system_prompt: str | None = None
    prompt_template: str | None = None
    chat_prompt: str = "history"

    @classmethod
    def from_section(cls, section: Any) -> ColumnMap:
        """Build from the recipe's ``data.columns`` section, the preset filling what the recipe left unset."""
        given = {  # None = not given: the preset's value, else the default
            "preset": section.preset,
            "prompt": section.prompt,
            "messages": section.messages,
            "response": section.response,
            "reference": section.reference,
            "reference_extractor": section.reference_extractor,
            "task": section.task,
            "task_column": section.task_column,
            "id": section.id,
            "system_prompt": section.system_prompt,
            "prompt_template": section.prompt_template,
            "chat_prompt": section.chat_prompt,
        }
        return cls.with_preset(**given)

    @classmethod
    def with_preset(cls, preset: str = "none", **keys: Any) -> ColumnMap:
        """A map from ``preset``'s columns overridden by ``keys`` (None values mean 'not given')."""
        if preset not in ("none", *PRESETS):
            known = ", ".join(["none", *PRESETS])
            raise KexaoneError(f"data.columns.preset: unknown preset {preset!r}; expected one of {known}")
        base = dict(PRESETS.get(preset, {}))
        base.update({k: v for k, v in keys.items() if v is not None})
        return replace(cls(preset=preset), **base)

    @property
    def native(self) -> bool:
        """True when rows are already in the toolkit's format (nothing to map)."""
        defaults = ColumnMap()
        return all(getattr(self, f.name) == getattr(defaults, f.name) for f in fields(self))


def suggest_preset(raw: Any) -> str:
    """A hint naming the preset whose columns a native-format row that failed to parse has, else ''."""
    if not isinstance(raw, Mapping) or "messages" in raw or "prompt" in raw:
        return ""
    for preset, cols in PRESETS.items():
        wanted = {c for k, c in cols.items() if k in ("prompt", "messages", "reference")}
        if wanted <= set(raw):
            return f" (its columns look {preset}-shaped: set data.columns.preset: {preset})"
    return ""


def _column(raw: Mapping[str, Any], name: str, key: str, where: str) -> Any:
    if name not in raw:
        shown = ", ".join(repr(k) for k in list(raw)[:20])
        raise KexaoneError(f"{where}: no column {name!r} (named by data.columns.{key}); the row has {shown}")
    return raw[name]


def _as_messages(value: Any, key: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        raise KexaoneError(
            f"{where}: the column named by data.columns.{key} must hold a list of chat messages, "
            f"got {value!r:.100}"
        )
    # Arrow fills keys other rows have with None; drop them so each message is as written.
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _user_turn(cm: ColumnMap, value: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        text = cm.prompt_template.replace("{prompt}", value) if cm.prompt_template else value
        return [{"role": "user", "content": text}]
    return _as_messages(value, "prompt", where)


def _with_system(cm: ColumnMap, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if cm.system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": cm.system_prompt}, *messages]
    return messages


def _used_columns(cm: ColumnMap) -> set[str]:
    return {c for c in (cm.prompt, cm.messages, cm.response, cm.reference, cm.task_column, cm.id) if c}


def _passthrough(raw: Mapping[str, Any], cm: ColumnMap) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(raw.get("enable_thinking"), bool):
        out["enable_thinking"] = raw["enable_thinking"]
    return out


def map_prompt_row(raw: Any, cm: ColumnMap, where: str) -> Any:
    """One dataset row as a prompt-set row: ``messages`` ending before the answer, ``task``, ``reference``."""
    if cm.native or not isinstance(raw, Mapping):
        return raw
    final: Any = None
    if cm.messages:
        chat = _as_messages(_column(raw, cm.messages, "messages", where), "messages", where)
        last = max((i for i, m in enumerate(chat) if m.get("role") == "assistant"), default=None)
        context, final = (chat, None) if last is None else (chat[:last], chat[last].get("content"))
        if cm.chat_prompt == "last_user":
            users = [m for m in context if m.get("role") == "user"]
            context = users[-1:]
        if not context:
            raise KexaoneError(f"{where}: the chat in column {cm.messages!r} has no turn before its answer")
    elif cm.prompt:
        context = _user_turn(cm, _column(raw, cm.prompt, "prompt", where), where)
    else:
        raise KexaoneError(f"{where}: data.columns names no prompt or messages column to build a prompt from")
    if cm.reference:
        answer = _column(raw, cm.reference, "reference", where)
    elif final is not None:
        answer = final
    else:
        answer = None
    reference = None if answer is None else extract_answer(cm.reference_extractor, answer, where)
    task = _column(raw, cm.task_column, "task_column", where) if cm.task_column else cm.task
    if not task:
        raise KexaoneError(f"{where}: no verifier task; set data.columns.task (e.g. math) or task_column")
    row: dict[str, Any] = {"messages": _with_system(cm, context), "task": task, "reference": reference}
    if cm.id:
        row["id"] = _column(raw, cm.id, "id", where)
    used = _used_columns(cm) | {"enable_thinking"}
    row["metadata"] = {k: v for k, v in raw.items() if k not in used}
    return {**row, **_passthrough(raw, cm)}


def map_chat_row(raw: Any, cm: ColumnMap, where: str) -> Any:
    """One dataset row as an SFT conversation (``messages`` ending with the assistant's answer)."""
    if cm.native or not isinstance(raw, Mapping):
        return raw
    if cm.messages:
        chat = _as_messages(_column(raw, cm.messages, "messages", where), "messages", where)
    elif cm.prompt:
        answer = _column(raw, cm.response or "", "response", where) if cm.response else None
        if answer is None:
            raise KexaoneError(f"{where}: SFT needs the answer to train on; set data.columns.response")
        if not isinstance(answer, str):
            raise KexaoneError(
                f"{where}: column {cm.response!r} (data.columns.response) must be text, got {answer!r:.80}"
            )
        chat = [*_user_turn(cm, _column(raw, cm.prompt, "prompt", where), where),
                {"role": "assistant", "content": answer}]  # fmt: skip
    else:
        raise KexaoneError(f"{where}: data.columns names no messages or prompt column to build the chat from")
    return {"messages": _with_system(cm, chat), **_passthrough(raw, cm)}
