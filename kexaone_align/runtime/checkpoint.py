"""Trainer-state checkpoints that are either complete or ignored.

A checkpoint directory is built under ``<dir>.tmp-<pid>``, every file is fsynced, a ``COMPLETE``
marker is written last, and only then is the directory renamed into place. A crash at any point
leaves either a ``.tmp-*`` directory or a directory without ``COMPLETE``; ``latest_complete_checkpoint``
skips both, so a resumed run never reads half a checkpoint.

Learner (DeepSpeed) state goes in the same directory: write it into the temporary path that
``atomic_checkpoint`` yields, next to the trainer state.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kexaone_align.errors import KexaoneError

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps (sorts numerically)."""
    return f"step_{step:08d}"


def fsync_path(path: Path) -> None:
    """fsync a file or directory (a directory entry is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and, when present, CUDA) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def save_trainer_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` plus the RNG states to ``directory/trainer_state.pt`` (temp file, fsync, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TRAINER_STATE_FILE
    tmp = directory / f".{TRAINER_STATE_FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save({"state": state, "rng": rng_state()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, target)
    fsync_path(directory)
    return target


def load_trainer_state(directory: str | Path, *, restore_rng: bool = True) -> dict[str, Any]:
    """Read what ``save_trainer_state`` wrote; by default also restore the RNG states."""
    path = Path(directory) / TRAINER_STATE_FILE
    if not path.is_file():
        raise KexaoneError(f"no trainer state at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload["state"]


def is_complete(directory: str | Path) -> bool:
    """True when the directory carries the ``COMPLETE`` marker (written last)."""
    return (Path(directory) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def atomic_checkpoint(final_dir: str | Path) -> Iterator[Path]:
    """Yield ``<final_dir>.tmp-<pid>`` to write into; on success fsync, mark ``COMPLETE``, rename into place.

    On an exception the temporary directory is removed and ``final_dir`` is left untouched. An
    existing ``final_dir`` is replaced only once the new one is complete.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    marker = tmp / COMPLETE_MARKER
    with open(marker, "w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_path(tmp)
    if final_dir.exists():
        old = final_dir.with_name(f"{final_dir.name}.old-{os.getpid()}")
        os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final_dir)
    fsync_path(final_dir.parent)


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``step_*`` checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``; temporary and unmarked directories are ignored."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return what was removed."""
    if keep_last < 1:
        raise KexaoneError(f"keep_last must be >= 1, got {keep_last}")
    found = complete_checkpoints(root)
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
