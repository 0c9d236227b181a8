"""DeepSpeed's JIT-built C++ ops, loaded so that a build killed midway cannot hang every later run.

torch builds an extension while holding a lock file (``torch.utils.file_baton``) that only the
building process removes. A process killed mid-build (Ctrl-C during a learner's first setup, a job
timeout, a preempted node) leaves that file behind, and every later load of the op waits on it
forever without a word. DeepSpeed builds its CPU shared-memory allreduce op inside
``init_distributed``, so a fresh environment (a new venv means a rebuild) that met such a leftover
hung in learner setup: every learner test of one CI run did.

``load_op`` builds or loads the op itself first, holding an OS file lock that dies with its holder:
among our processes only the lock holder builds. A baton file that no process has open (Linux
``/proc``), or, where that cannot be seen, one older than ``stale_after_s``, is a leftover; it is
removed with a warning that names it. DeepSpeed's own later load then finds the op already loaded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STALE_AFTER_S = 900.0  # only used where /proc does not show who holds the baton


def baton_is_held(baton: Path) -> bool | None:
    """Whether some process has ``baton`` open (torch keeps it open while building); None when that
    cannot be known: no ``/proc`` (not Linux), or some process's open files are not ours to read
    (another user's; PID 1, a container's or VM's init that never builds extensions, is left out)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    target = os.path.realpath(baton)
    unreadable = False
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == target:
                    return True
        except PermissionError:  # it could be the builder
            unreadable = unreadable or fd_dir.parent.name != "1"
        except OSError:  # a process that exited while we looked
            continue
    return None if unreadable else False


def clear_stale_baton(baton: Path, stale_after_s: float = STALE_AFTER_S, poll_s: float = 1.0) -> bool:
    """Remove ``baton`` if it is a leftover; wait while a live build holds it. True if one was removed."""
    waiting_said = False
    while baton.exists():
        try:
            age = time.time() - baton.stat().st_mtime
        except FileNotFoundError:
            return False
        held = baton_is_held(baton)
        if held is False or (held is None and age >= stale_after_s):
            why = "no process holds it" if held is False else f"older than {stale_after_s:.0f} s"
            logger.warning(
                "removing %s: a torch extension build lock left by a process killed mid-build "
                "(%.0f s old, %s); the op is rebuilt",
                baton,
                age,
                why,
            )
            baton.unlink(missing_ok=True)
            return True
        if not waiting_said:
            waiting_said = True
            limit = "" if held else f" (or until it is {stale_after_s:.0f} s old: then it is left over)"
            logger.warning("waiting for another process's build of this op to finish: %s%s", baton, limit)
        time.sleep(poll_s)
    return False


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``path`` (released if this process dies); without the right to
    create it (a shared, read-only extensions directory) go on unlocked, as DeepSpeed alone would."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # closed below, after the lock is released
    except OSError as exc:
        logger.debug("no build lock at %s (%s); loading unlocked", path, exc)
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_op(builder_name: str, *, stale_after_s: float = STALE_AFTER_S) -> Any | None:
    """Build (first use) or load DeepSpeed's ``builder_name`` op as DeepSpeed would, safe against a
    leftover build lock; None where the accelerator has no such op or it is not compatible."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with _exclusive(build_dir / "kexaone.flock"):
        clear_stale_baton(build_dir / "lock", stale_after_s)
        started = time.perf_counter()
        module = builder.load(verbose=False)
    elapsed = time.perf_counter() - started
    if elapsed > 5.0:
        logger.info("DeepSpeed op %s built in %.0f s (cached in %s)", builder.name, elapsed, build_dir)
    return module
