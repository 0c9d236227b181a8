"""Prompt sets for the RL (AGAPO) and preference (GROUPER) stages, and a resumable cursor over them.

A prompt row is a conversation without the answer, the ``task`` that routes it to a verifier, and the
``reference`` that verifier grades against. A tool-use row also names an ``environment`` (a registered
tool environment, ``module:attr``, ``file.py:attr`` or a ``.json`` data file): its rollouts are multi-turn
episodes against that environment, which also scores them; ``tools`` are JSON schemas listed in the prompt
(an environment's own tools are used when the row gives none).

``PromptCursor`` walks the rows epoch by epoch in a seeded shuffled order; its position is a small
dict, saved with a checkpoint, so a resumed run continues with exactly the
prompts it would have seen without the interruption.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kexaone_align.data.columns import ColumnMap, map_prompt_row, suggest_preset
from kexaone_align.data.sources import SourceOptions, read_rows
from kexaone_align.errors import KexaoneError

ROLES = ("system", "user", "assistant", "tool")
_KNOWN_KEYS = {"id", "messages", "task", "reference", "enable_thinking", "metadata", "tools", "environment"}


@dataclass(frozen=True)
class PromptRow:
    """One prompt: what to send the policy, and what its answer is graded against."""

    id: str
    messages: list[dict[str, Any]]
    task: str
    reference: Any = None
    enable_thinking: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    environment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "messages": self.messages,
            "task": self.task,
            "reference": self.reference,
            "enable_thinking": self.enable_thinking,
            "metadata": self.metadata,
        }
        if self.tools is not None:
            out["tools"] = self.tools
        if self.environment is not None:
            out["environment"] = self.environment
        return out


def _bad(where: str, problem: str) -> KexaoneError:
    return KexaoneError(f"prompt set {where}: {problem}")


def check_messages(messages: Any, where: str, *, need_assistant: bool = False) -> None:
    """Raise ``KexaoneError`` naming ``where`` and the message unless ``messages`` is a valid chat list."""
    if not isinstance(messages, list) or not messages:
        raise _bad(where, f"'messages' must be a non-empty list of messages, got {messages!r:.120}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _bad(where, f"messages[{i}] must be an object with role and content, got {message!r:.120}")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(where, f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise _bad(where, f"messages[{i}].content must be a string, got {type(content).__name__}")
    if need_assistant and not any(m.get("role") == "assistant" for m in messages):
        raise _bad(where, "has no assistant turn to learn from")


def parse_prompt_row(raw: Any, where: str) -> PromptRow:
    """Validate one raw row (a dict from JSON) into a ``PromptRow``; errors name ``where`` and the field."""
    if not isinstance(raw, Mapping):
        raise _bad(where, f"must be a JSON object, got {type(raw).__name__}")
    if "messages" not in raw:
        if isinstance(raw.get("prompt"), str):
            raw = {**raw, "messages": [{"role": "user", "content": raw["prompt"]}]}
        elif isinstance(raw.get("prompt"), list):
            raw = {**raw, "messages": raw["prompt"]}
        else:
            raise _bad(where, "missing field 'messages' (or a 'prompt' string or message list)")
    check_messages(raw["messages"], where)
    if raw["messages"][-1].get("role") == "assistant":
        raise _bad(where, "the last message is an assistant turn; a prompt must end before the answer")
    task = raw.get("task")
    if not isinstance(task, str) or not task:
        raise _bad(where, f"field 'task' must be a non-empty string naming a verifier, got {task!r}")
    thinking = raw.get("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise _bad(where, f"field 'enable_thinking' must be true or false, got {thinking!r}")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise _bad(where, f"field 'metadata' must be an object, got {type(metadata).__name__}")
    tools = raw.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise _bad(where, f"field 'tools' must be a list of tool schemas (objects), got {tools!r:.120}")
    environment = raw.get("environment")
    if environment is not None and not (isinstance(environment, str) and environment.strip()):
        raise _bad(
            where,
            f"field 'environment' must be a non-empty string naming a tool environment, got {environment!r}",
        )
    extra = {k: v for k, v in raw.items() if k not in _KNOWN_KEYS and k != "prompt"}
    row_id = raw.get("id")
    if row_id is None:
        row_id = where
    elif not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise _bad(where, f"field 'id' must be a string or integer, got {row_id!r}")
    return PromptRow(
        id=str(row_id),
        messages=[dict(m) for m in raw["messages"]],
        task=task,
        reference=raw.get("reference"),
        enable_thinking=thinking,
        metadata={**dict(metadata), **extra},
        tools=[dict(t) for t in tools] if tools is not None else None,
        environment=environment,
    )


def load_prompt_set(
    path_or_rows: str | Path | Sequence[str | Path] | Iterable[Mapping[str, Any]],
    *,
    columns: ColumnMap | None = None,
    options: SourceOptions | None = None,
) -> list[PromptRow]:
    """Load and validate a prompt set from files, saved or cached datasets, or in-memory rows.

    Sources are those of ``data.sources.read_rows`` (``.jsonl``/``.json``/``.parquet``/``.csv`` files,
    ``save_to_disk`` folders, dataset names from the local cache); ``options`` gives the split,
    configuration and cache. A list of sources (a recipe's ``train_files``) is read in order; ids must be
    unique across all of them. Rows are in the toolkit's format (``messages`` or ``prompt``, ``task``,
    ``reference``; other fields kept in ``metadata``) unless ``columns`` maps another shape onto it.
    """
    cm = columns or ColumnMap()
    rows: list[PromptRow] = []
    seen: dict[str, str] = {}
    for where, raw in read_rows(path_or_rows, "prompt set", options):
        try:
            row = parse_prompt_row(map_prompt_row(raw, cm, where), where)
        except KexaoneError as exc:
            hint = suggest_preset(raw) if cm.native else ""
            raise KexaoneError(f"{exc}{hint}") from None
        if row.id in seen:
            raise _bad(where, f"duplicate id {row.id!r} (first used at {seen[row.id]})")
        seen[row.id] = where
        rows.append(row)
    if not rows:
        raise KexaoneError(f"prompt set {path_or_rows!s:.200} is empty")
    return rows


class PromptCursor:
    """Endless, seeded, resumable iteration over ``rows``: each epoch is a fresh shuffle.

    The order of epoch ``e`` depends only on ``(seed, e, len(rows))``, so ``state_dict()`` (epoch and
    offset) is enough to resume; loading a state saved for a different set size is refused.
    """

    def __init__(self, rows: Sequence[PromptRow], seed: int = 0, *, shuffle: bool = True) -> None:
        if not rows:
            raise KexaoneError("PromptCursor needs at least one prompt row")
        self.rows = list(rows)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"prompt-cursor-{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> list[PromptRow]:
        """The next ``batch_size`` rows, crossing into a new (reshuffled) epoch when one runs out."""
        if batch_size < 1:
            raise KexaoneError(f"PromptCursor.next_batch: batch_size must be >= 1, got {batch_size}")
        return [next(self) for _ in range(batch_size)]

    def __iter__(self) -> PromptCursor:
        return self

    def __next__(self) -> PromptRow:
        if self.offset >= len(self._order):
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order(self.epoch)
        row = self.rows[self._order[self.offset]]
        self.offset += 1
        return row

    def state_dict(self) -> dict[str, int | bool]:
        """JSON-serialisable position: where the next row comes from."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "num_rows": len(self.rows),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``; the prompt set must have the same size."""
        missing = {"seed", "epoch", "offset", "num_rows"} - set(state)
        if missing:
            raise KexaoneError(f"PromptCursor state is missing {sorted(missing)}")
        if state["num_rows"] != len(self.rows):
            raise KexaoneError(
                f"PromptCursor state was saved for {state['num_rows']} prompts, but this set has "
                f"{len(self.rows)}; resuming would change the data order"
            )
        if not 0 <= state["offset"] <= state["num_rows"] or state["epoch"] < 0:
            raise KexaoneError(f"PromptCursor state has an impossible position: {dict(state)}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._epoch_order(self.epoch)
