"""Where a recipe's data comes from: files, folders, ``save_to_disk`` datasets, and dataset names.

``read_rows`` turns one entry of ``data.train_files`` / ``data.eval_files`` (or a list of them, or rows
already in memory) into ``(where, row)`` pairs; ``where`` ("gsm8k.jsonl line 3", "saved row 7") is what
every later error names. What an entry is:

* a file: ``.jsonl``, ``.json`` (a list of rows), ``.parquet`` or ``.csv``;
* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (the recipe's ``split``
  picks one of a ``DatasetDict``); a folder of such data files (read in name order); or a folder laid out
  like a Hugging Face dataset repository (e.g. a downloaded snapshot), read by ``datasets.load_dataset``
  with the recipe's ``dataset_config`` and ``split``;
* anything else is a dataset name (``openai/gsm8k``) resolved from the local ``datasets`` cache, i.e.
  what ``datasets.load_dataset(name, dataset_config)`` saved there when it last ran with network access.
  With ``offline`` (the default) the hub is never contacted: ``datasets`` is put in offline mode for the
  call, and a name that is not cached is an error saying how to get it there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kexaone_align.errors import KexaoneError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class SourceOptions:
    """How to open sources that hold several splits or configurations, and where names are cached."""

    split: str = "train"
    config_name: str | None = None
    cache_dir: str | None = None
    offline: bool = True


def read_rows(source: Any, what: str, options: SourceOptions | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, raw row)`` per row of ``source``; ``what`` ("prompt set", "chat dataset") starts errors."""
    opts = options or SourceOptions()
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, Path)) for s in source):
        if not source:
            raise KexaoneError(f"{what}: the list of files is empty")
        for one in source:
            yield from read_rows(one, what, opts)
        return
    if not isinstance(source, (str, Path)):
        for i, raw in enumerate(source):
            yield f"row {i}", raw
        return
    path = Path(source).expanduser()
    if path.is_file():
        yield from _read_file(path, what)
    elif path.is_dir():
        yield from _read_dir(path, what, opts)
    elif isinstance(source, Path) or looks_like_path(str(source)):
        raise KexaoneError(f"{what} {str(path)!r} does not exist (not a file or folder)")
    else:
        yield from _read_named(str(source), what, opts)


def looks_like_path(text: str) -> bool:
    """Whether a data entry is meant as a local path (so a missing one is not taken for a dataset name)."""
    suffixes = (*DATA_SUFFIXES, ".arrow")
    return text.startswith((".", "/", "~")) or text.endswith(suffixes) or text.count("/") > 1


def _bad(what: str, where: str, problem: str) -> KexaoneError:
    return KexaoneError(f"{what} {where}: {problem}")


def _read_file(path: Path, what: str) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path.name} line {lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _bad(what, where, f"is not valid JSON ({exc.msg})") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise _bad(what, path.name, f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _bad(what, str(path), f"cannot be read ({exc})") from None
        if not isinstance(data, list):
            raise _bad(what, path.name, "a .json file must hold a list of rows")
        for i, raw in enumerate(data):
            yield f"{path.name} row {i}", raw
    elif suffix in (".parquet", ".csv"):
        import datasets

        reader = datasets.Dataset.from_parquet if suffix == ".parquet" else datasets.Dataset.from_csv
        try:
            ds = reader(str(path))
        except Exception as exc:  # pyarrow / pandas raise many types for a damaged or foreign file
            problem = f"cannot be read as {suffix[1:]} ({type(exc).__name__}: {_first(exc)})"
            raise _bad(what, str(path), problem) from None
        for i, raw in enumerate(ds):
            yield f"{path.name} row {i}", raw
    else:
        raise _bad(what, path.name, f"unsupported file type {path.suffix!r} (use {', '.join(DATA_SUFFIXES)})")


def _pick_split(loaded: Any, split: str, what: str, where: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            has = ", ".join(loaded)
            raise _bad(what, where, f"no split {split!r} (has {has}); set data.split / data.eval_split")
        return loaded[split]
    return loaded


def _read_dir(path: Path, what: str, opts: SourceOptions) -> Iterator[tuple[str, Any]]:
    import datasets

    if any((path / marker).exists() for marker in _SAVED_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            problem = f"is not a readable save_to_disk dataset ({type(exc).__name__}: {_first(exc)})"
            raise _bad(what, str(path), problem) from None
        ds = _pick_split(loaded, opts.split, what, str(path))
        for i, raw in enumerate(ds):
            yield f"{path.name} row {i}", raw
        return
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if files:
        for file in files:
            yield from _read_file(file, what)
        return
    if not any(p.is_dir() for p in path.iterdir()):
        kinds = "/".join(DATA_SUFFIXES)
        raise _bad(what, str(path), f"folder has no save_to_disk dataset and no {kinds} files")
    # A folder laid out like a hub dataset repository (data/train-*.parquet, config subfolders, README).
    try:
        ds = datasets.load_dataset(str(path), opts.config_name, split=opts.split)
    except Exception as exc:
        problem = f"cannot be read as a dataset folder ({type(exc).__name__}: {_first(exc)})"
        raise _bad(what, str(path), problem) from None
    for i, raw in enumerate(ds):
        yield f"{path.name} row {i}", raw


@contextmanager
def hub_offline(enabled: bool) -> Iterator[None]:
    """Put ``datasets`` in offline mode (HF_HUB_OFFLINE) for the duration, when ``enabled``."""
    import datasets.config

    if not enabled:
        yield
        return
    old = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = old


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _read_named(name: str, what: str, opts: SourceOptions) -> Iterator[tuple[str, Any]]:
    import datasets

    cache = opts.cache_dir or str(datasets.config.HF_DATASETS_CACHE)
    config = f", {opts.config_name!r}" if opts.config_name else ""
    try:
        with hub_offline(opts.offline):
            ds = datasets.load_dataset(name, opts.config_name, split=opts.split, cache_dir=opts.cache_dir)
    except Exception as exc:
        reason = _first(exc)
        if "split" in reason.lower() and "unknown" in reason.lower():
            raise _bad(what, repr(name), f"{reason}; set data.split / data.eval_split") from None
        if opts.offline:
            raise _bad(
                what,
                repr(name),
                f"not a local file or folder, and not found in the local Hugging Face datasets cache "
                f"({cache}; {type(exc).__name__}: {reason}). Dataset names are resolved offline: run "
                f"datasets.load_dataset({name!r}{config}) once on a machine with network access and the "
                "same HF_DATASETS_CACHE (or point data.hf_cache_dir at that cache), or save the dataset "
                "with save_to_disk and give the folder",
            ) from None
        raise _bad(
            what,
            repr(name),
            f"not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {reason})",
        ) from None
    for i, raw in enumerate(ds):
        yield f"{name} row {i}", raw


@dataclass(frozen=True)
class RecipeSources:
    """What a stage reads, from a recipe's ``data`` section: training and held-out sources with options."""

    train: list[str]
    train_options: SourceOptions
    held: list[str] | None  # None: hold out data.eval_fraction of the training rows instead
    held_options: SourceOptions


def recipe_sources(data: Any) -> RecipeSources:
    """Sources of a recipe's ``data`` section: held-out rows come from ``eval_files`` (at ``eval_split``,
    else ``split``), else from ``train_files`` at ``eval_split`` when that is set."""
    base = SourceOptions(
        split=data.split,
        config_name=data.dataset_config,
        cache_dir=data.hf_cache_dir,
        offline=data.hf_offline,
    )
    held_split = data.eval_split or data.split
    held = list(data.eval_files) or (list(data.train_files) if data.eval_split else None)
    if held is not None and not data.eval_files and data.eval_split == data.split:
        raise KexaoneError(
            f"data.eval_split: {data.eval_split!r} is also data.split; held-out rows would be training rows"
        )
    return RecipeSources(list(data.train_files), base, held, replace(base, split=held_split))
