"""A small pool of math-verify worker processes, safe to call from any thread or Ray actor.

math-verify bounds its own time with ``signal.alarm``, which only works on the main thread, and a
pathological answer such as ``9^{9^{9^{9}}}`` can make sympy run (and allocate) for ever. Each request
therefore goes to a reused child process; a request that overruns its limit gets the child killed and
replaced, and the caller gets ``WorkerTimeout``. The limit counts the CPU time the worker spends on
the request (read from ``/proc``), so a busy machine slows a comparison down without failing it; a
wall-clock backstop of ``WALL_FACTOR`` times the limit catches a worker that is stuck without using
CPU (wall time alone where ``/proc`` is unreadable). Worker start-up time never counts against a
request's limit, and neither does math-verify's lazy warm-up: each worker parses and verifies a
few representative answers (a factored polynomial against its expansion, a ``\\boxed`` fraction,
intervals, sets, ...) before it reports ready, so a request's time limit measures its own comparison.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(__file__).with_name("_math_worker.py")


WALL_FACTOR = 10.0
_POLL_S = 0.05
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


class WorkerTimeout(Exception):
    """The request ran past its deadline; the worker was killed."""


class WorkerError(Exception):
    """The worker died or answered something unreadable."""


_SPAWNER: ThreadPoolExecutor | None = None
_SPAWNER_LOCK = threading.Lock()


def _popen_worker() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-P", "-u", str(_WORKER_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def _spawn() -> subprocess.Popen:
    """Start a worker from one long-lived thread.

    The worker asks the kernel to kill it when its parent goes (PR_SET_PDEATHSIG), and Linux ties that
    to the *thread* that forked it; spawning from short-lived caller threads would kill the worker as
    soon as that thread ended.
    """
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="math-worker-spawner")
        spawner = _SPAWNER
    return spawner.submit(_popen_worker).result()


class _Worker:
    def __init__(self, startup_timeout_s: float) -> None:
        self.proc = _spawn()
        self._buf = b""
        try:
            hello = self._read_line(time.monotonic() + startup_timeout_s)
        except BaseException:
            self.kill()
            raise
        try:
            self.hello: dict[str, Any] = json.loads(hello)
        except ValueError:
            self.hello = {}
        if not isinstance(self.hello, dict) or not self.hello.get("ready"):
            self.kill()
            raise WorkerError(f"math worker sent {hello[:200]!r} instead of a ready message")

    def _cpu_s(self) -> float | None:
        """CPU seconds the worker has used so far, or None where /proc cannot tell."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) * _TICK_S
        except (OSError, IndexError, ValueError):
            return None

    def _read_line(self, deadline: float, cpu_limit: float | None = None) -> str:
        """One protocol line; ``WorkerTimeout`` past the wall ``deadline`` or the worker's ``cpu_limit``."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout
            wait = remaining if cpu_limit is None else min(remaining, _POLL_S)
            ready, _, _ = select.select([fd], [], [], wait)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerError(f"math worker exited (status {self.proc.poll()})")
                self._buf += chunk
            elif cpu_limit is not None:
                used = self._cpu_s()
                if used is not None and used >= cpu_limit:
                    raise WorkerTimeout
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode("utf-8")

    def request(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        start_cpu = self._cpu_s()
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode("utf-8"))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"math worker is gone: {exc}") from exc
        if start_cpu is None:
            return json.loads(self._read_line(time.monotonic() + timeout_s))
        deadline = time.monotonic() + timeout_s * WALL_FACTOR
        return json.loads(self._read_line(deadline, cpu_limit=start_cpu + timeout_s))

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except Exception:
                pass


class MathWorkerPool:
    """Up to ``max_workers`` live workers; callers beyond that wait for a free one."""

    def __init__(self, max_workers: int | None = None, startup_timeout_s: float = 120.0) -> None:
        self.max_workers = max_workers or min(8, max(4, os.cpu_count() or 4))
        self.startup_timeout_s = startup_timeout_s
        self._idle: list[_Worker] = []
        self._live = 0
        self._cond = threading.Condition()
        self.stats = {"requests": 0, "timeouts": 0, "crashes": 0, "started": 0, "warm_failures": 0}

    def _acquire(self) -> _Worker:
        with self._cond:
            while not self._idle and self._live >= self.max_workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
            self.stats["started"] += 1
        try:
            worker = _Worker(self.startup_timeout_s)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise
        if worker.hello.get("warmed") != worker.hello.get("warm_total"):
            # Still usable, but its first requests pay for the warm-up inside their deadline.
            logger.warning("math worker warm-up incomplete: %s", worker.hello)
            with self._cond:
                self.stats["warm_failures"] += 1
        return worker

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self._cond:
            if healthy:
                self._idle.append(worker)
            else:
                self._live -= 1
            self._cond.notify()

    def call(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Run one request; raise ``WorkerTimeout`` past ``timeout_s`` CPU seconds of work (module doc)."""
        worker = self._acquire()
        healthy = False
        try:
            out = worker.request(payload, timeout_s)
            healthy = True
            return out
        except WorkerTimeout:
            with self._cond:
                self.stats["timeouts"] += 1
            raise
        except (WorkerError, ValueError) as exc:
            with self._cond:
                self.stats["crashes"] += 1
            raise WorkerError(str(exc)) from exc
        finally:
            with self._cond:
                self.stats["requests"] += 1
            self._release(worker, healthy)

    def close(self) -> None:
        """Stop idle workers (busy ones are stopped when their caller releases them)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for worker in idle:
            worker.kill()


_DEFAULT: MathWorkerPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> MathWorkerPool:
    """The process-wide pool shared by every math verifier instance."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            size = int(os.environ.get("KEXAONE_MATH_WORKERS", "0")) or None
            _DEFAULT = MathWorkerPool(max_workers=size)
        return _DEFAULT


def _forget_after_fork() -> None:
    # A forked child must not talk to its parent's workers.
    global _DEFAULT, _DEFAULT_LOCK, _SPAWNER, _SPAWNER_LOCK
    _DEFAULT = None
    _DEFAULT_LOCK = threading.Lock()
    _SPAWNER = None
    _SPAWNER_LOCK = threading.Lock()


def _close_default() -> None:
    if _DEFAULT is not None:
        _DEFAULT.close()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_close_default)
