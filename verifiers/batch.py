"""Batch scoring with bounded concurrency, a per-sample time limit and multi-task routing.

A verifier that raises, hangs or returns garbage costs its own sample (reward 0, the reason in
``details``, logged and counted) and never the caller. Python threads cannot be killed, so a sample
that overruns is abandoned on a daemon thread: it no longer holds a concurrency slot or blocks exit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kexaone_align.verifiers.api import Sample, Verifier, VerifyResult, registered_names
from kexaone_align.verifiers.loading import resolve_verifier

from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)


class TaskRouter:
    """Picks the verifier for a sample by ``sample.task``, so one batch can mix tasks.

    ``mapping`` maps task names to verifier references (registered name, ``module:attr``,
    ``path.py:attr``) or verifier objects; with no mapping a task is routed to the verifier registered
    under the same name. ``default`` grades tasks the mapping does not name; without it such samples
    get reward 0 and are counted as unrouted.
    """

    name = "router"

    def __init__(self, mapping: Mapping[str, Any] | None = None, default: Any = None) -> None:
        self.mapping = dict(mapping) if mapping is not None else None
        self.default = default
        self._cache: dict[str, Verifier | None] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Ray ships routers to actors by pickling; locks and built verifiers are rebuilt there.
        return {"mapping": self.mapping, "default": self.default}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["mapping"], state["default"])  # type: ignore[misc]

    def _build(self, task: str) -> Verifier | None:
        if self.mapping is not None:
            ref = self.mapping.get(task, self.default)
        elif task in registered_names():
            ref = task
        else:
            ref = self.default
        return None if ref is None else resolve_verifier(ref)

    def route(self, sample: Sample) -> Verifier | None:
        """The verifier for this sample's task, or None when no verifier handles it."""
        task = sample.task
        with self._lock:
            if task in self._cache:
                return self._cache[task]
        verifier = self._build(str(task))
        with self._lock:
            self._cache.setdefault(task, verifier)
            return self._cache[task]

    def time_limit_s(self, sample: Sample) -> float | None:
        """The routed verifier's own time limit for ``sample`` (None when it does not declare one)."""
        return time_limit_of(self.route(sample), sample)

    def verify(self, sample: Sample) -> VerifyResult:
        verifier = self.route(sample)
        if verifier is None:
            return VerifyResult(0.0, {"reason": f"no verifier for task {sample.task!r}", "unrouted": True})
        return verifier.verify(sample)


@dataclass
class TaskStats:
    """Per-task counters for a scored batch."""

    count: int = 0
    reward_sum: float = 0.0
    errors: int = 0
    timeouts: int = 0
    unrouted: int = 0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.count if self.count else 0.0


@dataclass
class BatchResult:
    """One ``VerifyResult`` per input sample, in input order, plus failure counters."""

    results: list[VerifyResult]
    errors: int = 0
    timeouts: int = 0
    unrouted: int = 0
    elapsed_s: float = 0.0
    per_task: dict[str, TaskStats] = field(default_factory=dict)

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]


DEFAULT_TIMEOUT_S = 60.0
_GRACE_S = 5.0


def time_limit_of(verifier: Any, sample: Sample) -> float | None:
    """``verifier.time_limit_s(sample)`` if the verifier declares its limits, else None."""
    limit_fn = getattr(verifier, "time_limit_s", None)
    if verifier is None or not callable(limit_fn):
        return None
    try:
        limit = limit_fn(sample)
    except Exception:  # a bad reference: verify() will report it
        return None
    return float(limit) if isinstance(limit, int | float) and limit > 0 else None


def _run_one(verifier: Verifier | TaskRouter, sample: Sample) -> VerifyResult:
    out: Any = verifier.verify(sample)
    if isinstance(out, VerifyResult):
        return out
    if isinstance(out, int | float) and not isinstance(out, bool):
        return VerifyResult(float(out), {})
    raise TypeError(f"verifier returned {type(out).__name__}, expected VerifyResult")


def _failure(kind: str, reason: str, sample: Sample, name: str) -> VerifyResult:
    return VerifyResult(0.0, {"reason": reason, kind: True, "verifier": name, "task": sample.task})


def score_batch(
    samples: Sequence[Sample],
    router_or_verifier: Verifier | TaskRouter | str,
    *,
    max_workers: int = 8,
    timeout_s: float | str | None = "auto",
) -> BatchResult:
    """Grade ``samples`` with at most ``max_workers`` running at once, each within its time limit.

    ``timeout_s="auto"`` (the default) gives each sample its verifier's own worst case plus a 5 s
    grace, for verifiers that declare one (``time_limit_s(sample)``, e.g. the code verifier: per-run
    limit x runs), so a verdict the verifier would reach within its limits is never thrown away, and
    60 s for the others; a number is one limit for every sample; None waits for ever.
    Results keep input order. A raised exception, a bad return value or an overrun gives that sample
    reward 0 with ``details['reason']`` and ``details['error'|'timeout']``; verifiers may also report
    their own ``timeout``/``error`` in details, which is counted the same way.
    """
    if max_workers < 1:
        raise KexaoneError(f"max_workers must be at least 1, got {max_workers}")
    if isinstance(timeout_s, str) and timeout_s != "auto":
        raise KexaoneError(f"timeout_s must be a number of seconds, None or 'auto', got {timeout_s!r}")
    if isinstance(timeout_s, int | float) and timeout_s <= 0:
        raise KexaoneError(f"timeout_s must be positive, got {timeout_s}")
    grader = router_or_verifier
    if isinstance(grader, str):
        grader = resolve_verifier(grader)
    gname = getattr(grader, "name", type(grader).__name__)
    start = time.monotonic()
    results: list[VerifyResult | None] = [None] * len(samples)
    done: queue.Queue[tuple[int, VerifyResult]] = queue.Queue()
    running: dict[int, float] = {}  # index -> deadline
    limits: dict[int, float | None] = {}

    def limit_for(i: int) -> float | None:
        if timeout_s != "auto":
            return timeout_s  # type: ignore[return-value]
        own = time_limit_of(grader, samples[i])
        return DEFAULT_TIMEOUT_S if own is None else own + _GRACE_S

    def work(i: int, sample: Sample) -> None:
        try:
            res = _run_one(grader, sample)
        except Exception as exc:
            logger.warning(
                "verifier %s failed on sample %d (task %r): %s: %s",
                gname,
                i,
                sample.task,
                type(exc).__name__,
                exc,
            )
            res = _failure("error", f"verifier raised {type(exc).__name__}: {exc}", sample, gname)
        done.put((i, res))

    pending = list(range(len(samples)))
    pending.reverse()
    while pending or running:
        while pending and len(running) < max_workers:
            i = pending.pop()
            limits[i] = limit_for(i)
            running[i] = time.monotonic() + limits[i] if limits[i] is not None else float("inf")  # type: ignore[operator]
            threading.Thread(target=work, args=(i, samples[i]), daemon=True, name=f"verify-{i}").start()
        wait = min(running.values()) - time.monotonic()
        try:
            i, res = done.get(timeout=None if wait == float("inf") else max(wait, 0.0))
            if i in running:  # late answers from abandoned samples are dropped
                del running[i]
                results[i] = res
        except queue.Empty:
            pass
        now = time.monotonic()
        for i, deadline in list(running.items()):
            if deadline <= now:
                del running[i]
                logger.warning(
                    "verifier %s timed out on sample %d (task %r) after %ss",
                    gname,
                    i,
                    samples[i].task,
                    limits[i],
                )
                results[i] = _failure(
                    "timeout", f"verifier timed out after {limits[i]:g}s", samples[i], gname
                )
    final = [r for r in results if r is not None]
    return _summarise(samples, final, time.monotonic() - start)


def _summarise(samples: Sequence[Sample], results: list[VerifyResult], elapsed: float) -> BatchResult:
    out = BatchResult(results=results, elapsed_s=elapsed)
    for sample, res in zip(samples, results, strict=True):
        stats = out.per_task.setdefault(str(sample.task), TaskStats())
        stats.count += 1
        stats.reward_sum += res.reward
        stats.errors += bool(res.details.get("error"))
        stats.timeouts += bool(res.details.get("timeout"))
        stats.unrouted += bool(res.details.get("unrouted"))
    out.errors = sum(s.errors for s in out.per_task.values())
    out.timeouts = sum(s.timeouts for s in out.per_task.values())
    out.unrouted = sum(s.unrouted for s in out.per_task.values())
    return out
