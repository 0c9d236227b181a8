"""SFT chat datasets: load conversations from anywhere, check them, tokenize with assistant-only loss.

A row is ``{"messages": [{"role", "content"}, ...]}`` (TRL's conversational ``prompt``/``completion``
pair is accepted and joined), optionally with ``enable_thinking`` (reasoning mode, default True as in
K-EXAONE) and ``tools``. Rows are checked before they become Arrow tables, so a bad row is reported by
file, line and field instead of as a schema error deep inside ``datasets``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from kexaone_align.data.prompts import check_messages
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


def _read_json_rows(path: Path) -> list[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path.name} line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise KexaoneError(
                        f"chat dataset {path.name} line {lineno}: invalid JSON ({exc.msg})"
                    ) from None
        return rows
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise KexaoneError(
            f"chat dataset {path.name}: invalid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    if not isinstance(data, list):
        raise KexaoneError(f"chat dataset {path.name}: a .json file must hold a list of rows")
    return [(f"{path.name} row {i}", row) for i, row in enumerate(data)]


def _from_rows(rows: Iterable[tuple[str, Any]]) -> datasets.Dataset:
    checked = [normalize_chat_row(row, where) for where, row in rows]
    if not checked:
        raise KexaoneError("chat dataset is empty")
    try:
        return datasets.Dataset.from_list(checked)
    except Exception as exc:  # Arrow schema conflicts between rows (e.g. a field int here, text there)
        raise KexaoneError(f"chat dataset rows do not share one schema: {exc}") from None


def _validated(ds: datasets.Dataset, name: str) -> datasets.Dataset:
    for i, row in enumerate(ds):
        normalize_chat_row(row, f"{name} row {i}")
    return ds


def _is_path_list(source: Any) -> bool:
    return isinstance(source, (list, tuple)) and all(isinstance(s, (str, Path)) for s in source)


def load_chat_dataset(
    source: str | Path | Sequence[str | Path] | Sequence[Mapping[str, Any]], *, split: str = "train"
) -> datasets.Dataset:
    """Load conversations from a JSONL/JSON/Parquet file, a ``save_to_disk`` folder, rows, or a hub name.

    A list of such sources (a recipe's ``train_files``) is loaded in order and concatenated.

    Every row is validated (roles system/user/assistant/tool, string contents, at least one assistant
    turn); errors name the row. A hub name needs network access; offline, the error says so.
    """
    if _is_path_list(source):
        if not source:
            raise KexaoneError("chat dataset: the list of files is empty")
        return datasets.concatenate_datasets([load_chat_dataset(s, split=split) for s in source])
    if not isinstance(source, (str, Path)):
        return _from_rows((f"row {i}", row) for i, row in enumerate(source))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return _from_rows(_read_json_rows(path))
        if path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
            return _from_rows((f"{path.name} row {i}", row) for i, row in enumerate(ds))
        raise KexaoneError(
            f"chat dataset {path.name}: unsupported file type {path.suffix!r} (jsonl/json/parquet)"
        )
    if path.is_dir():
        return _load_dir(path, split)
    if str(source).startswith((".", "/", "~")) or path.suffix in (".jsonl", ".json", ".parquet"):
        raise KexaoneError(f"chat dataset {str(source)!r} does not exist")
    return _load_hub(str(source), split)


def _load_dir(path: Path, split: str) -> datasets.Dataset:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KexaoneError(f"chat dataset {path}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        return _validated(loaded, path.name)
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
    if not files:
        raise KexaoneError(
            f"chat dataset {path}: folder has no save_to_disk dataset and no jsonl/json/parquet files"
        )
    parts = [load_chat_dataset(p) for p in files]
    return datasets.concatenate_datasets(parts)


def _load_hub(name: str, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise KexaoneError(
            f"chat dataset {name!r}: not a local file or folder, and loading it from the Hugging Face hub "
            f"failed ({type(exc).__name__}: {str(exc)[:200]}). Without network access, download it "
            "elsewhere and pass a local JSONL/Parquet file or save_to_disk folder."
        ) from None
    return _validated(ds, name)


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
