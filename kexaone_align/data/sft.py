"""SFT chat datasets: load conversations from anywhere, check them, tokenize with assistant-only loss.

A row is ``{"messages": [{"role", "content"}, ...]}`` (TRL's conversational ``prompt``/``completion``
pair is accepted and joined), optionally with ``enable_thinking`` (reasoning mode, default True as in
K-EXAONE) and ``tools``. Rows are checked before they become Arrow tables, so a bad row is reported by
file, line and field instead of as a schema error deep inside ``datasets``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets

from kexaone_align.data.columns import ColumnMap, map_chat_row, suggest_preset
from kexaone_align.data.prompts import check_messages
from kexaone_align.data.sources import SourceOptions, read_rows
from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

TokenizeFn = Callable[..., tuple[list[int], list[int]]]


def normalize_chat_row(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate one conversation row; returns it with ``messages`` (joined from prompt/completion)."""
    if not isinstance(row, Mapping):
        raise KexaoneError(f"chat dataset {where}: must be an object, got {type(row).__name__}")
    out = dict(row)
    if "messages" not in out:
        prompt, completion = out.get("prompt"), out.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            out["messages"] = [*prompt, *completion]
            del out["prompt"], out["completion"]
        else:
            raise KexaoneError(
                f"chat dataset {where}: missing field 'messages' (or conversational 'prompt' + 'completion')"
            )
    try:
        check_messages(out["messages"], where, need_assistant=True)
    except KexaoneError as exc:
        raise KexaoneError(str(exc).replace("prompt set ", "chat dataset ", 1)) from None
    out["messages"] = [_clean_message(m) for m in out["messages"]]
    thinking = out.get("enable_thinking")
    if thinking is None:  # K-EXAONE's default is reasoning mode
        out["enable_thinking"] = True
    elif not isinstance(thinking, bool):
        raise KexaoneError(
            f"chat dataset {where}: field 'enable_thinking' must be true or false, got {thinking!r}"
        )
    return out


def _clean_message(message: Mapping[str, Any]) -> dict[str, Any]:
    # Arrow fills keys that other rows have with None; drop them so templates see the original message.
    return {k: v for k, v in message.items() if v is not None}


def _from_rows(rows: Iterable[tuple[str, Any]], cm: ColumnMap) -> datasets.Dataset:
    checked = []
    for where, row in rows:
        try:
            checked.append(normalize_chat_row(map_chat_row(row, cm, where), where))
        except KexaoneError as exc:
            hint = suggest_preset(row) if cm.native else ""
            raise KexaoneError(f"{exc}{hint}") from None
    if not checked:
        raise KexaoneError("chat dataset is empty")
    try:
        return datasets.Dataset.from_list(checked)
    except Exception as exc:  # Arrow schema conflicts between rows (e.g. a field int here, text there)
        raise KexaoneError(f"chat dataset rows do not share one schema: {exc}") from None


def load_chat_dataset(
    source: str | Path | Sequence[str | Path] | Sequence[Mapping[str, Any]],
    *,
    split: str | None = None,
    columns: ColumnMap | None = None,
    options: SourceOptions | None = None,
) -> datasets.Dataset:
    """Load conversations from files, ``save_to_disk`` folders, cached dataset names, or rows.

    Sources are those of ``data.sources.read_rows``; a list of them (a recipe's ``train_files``) is read
    in order and concatenated. ``split`` (or ``options.split``) picks a split where a source has several.
    ``columns`` maps other shapes (``prompt`` + ``response`` columns, a chat column) onto conversations.
    Every row is validated (roles system/user/assistant/tool, string contents, at least one assistant
    turn); errors name the row.
    """
    opts = options or SourceOptions()
    if split is not None:
        opts = replace(opts, split=split)
    return _from_rows(read_rows(source, "chat dataset", opts), columns or ColumnMap())


class TokenizedRows(list):
    """``[(input_ids, loss_mask), ...]`` plus what tokenization had to do to fit ``max_seq_len``.

    ``truncated``: indices of input rows cut to ``max_seq_len``; ``dropped``: indices of rows left with
    no trained (assistant) token after the cut, which are not in the list; ``kept``: the input index of
    each entry of the list.
    """

    def __init__(self) -> None:
        super().__init__()
        self.truncated: list[int] = []
        self.dropped: list[int] = []
        self.kept: list[int] = []


def _default_tokenize() -> TokenizeFn:
    from kexaone_align.data.chat_format import tokenize_conversation

    return tokenize_conversation


def tokenize_sft_rows(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_len: int,
    *,
    tokenize_fn: TokenizeFn | None = None,
) -> TokenizedRows:
    """Tokenize chat rows to ``(input_ids, loss_mask)`` with loss on assistant tokens only.

    Rows longer than ``max_seq_len`` are cut at the end (the prompt and the start of the answer stay);
    rows with no trained token left are dropped. Both are counted on the result and logged as a warning.
    ``tokenize_fn`` defaults to ``chat_format.tokenize_conversation``.
    """
    if max_seq_len < 2:
        raise KexaoneError(f"tokenize_sft_rows: max_seq_len must be >= 2, got {max_seq_len}")
    tokenize = tokenize_fn or _default_tokenize()
    out = TokenizedRows()
    for i, raw in enumerate(rows):
        row = normalize_chat_row(raw, f"row {i}")
        extra = {"tools": row["tools"]} if row.get("tools") else {}
        ids, mask = tokenize(tokenizer, row["messages"], row["enable_thinking"], **extra)
        ids, mask = list(ids), list(mask)
        if len(ids) > max_seq_len:
            out.truncated.append(i)
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            out.dropped.append(i)
            continue
        out.append((ids, mask))
        out.kept.append(i)
    total = len(out.kept) + len(out.dropped)
    if out.truncated:
        logger.warning(
            "tokenize_sft_rows: %d of %d rows were longer than max_seq_len=%d and were truncated "
            "(%d dropped: no assistant token left); first truncated rows: %s",
            len(out.truncated),
            total,
            max_seq_len,
            len(out.dropped),
            out.truncated[:5],
        )
    elif out.dropped:
        logger.warning(
            "tokenize_sft_rows: %d of %d rows have no assistant token; dropped", len(out.dropped), total
        )
    return out


def train_eval_split(
    ds: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded random split into (train, eval); ``eval_fraction == 0`` gives an empty eval set."""
    if not 0.0 <= eval_fraction < 1.0:
        raise KexaoneError(f"train_eval_split: eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return ds, ds.select([])
    n_eval = max(1, round(len(ds) * eval_fraction))
    if n_eval >= len(ds):
        raise KexaoneError(
            f"train_eval_split: {len(ds)} rows are too few for eval_fraction={eval_fraction} "
            "(nothing would be left to train on)"
        )
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
