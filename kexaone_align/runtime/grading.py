"""Rule-verifier grading as Ray tasks over the cluster's CPUs, started while generation still runs.

``StreamingGrader.submit`` is called with each rollout worker's samples as they arrive
(``RolloutPool.collect(on_result=...)``); they are cut into chunks of ``chunk_size`` and graded by up
to ``num_workers`` grading actors (Ray actors started on first use and kept for the stage, so their
processes and math workers start once; a driver thread hands the next chunk to an actor as one
finishes), spread over the nodes, each sample within ``timeout_s``. By the time the last sample
arrives most of the batch is already graded: what is left (``grading/tail_s``) is the grading of the
last worker's samples.

``backend="local"`` is the previous behaviour, kept for comparison and for drivers without Ray: the
driver grades the whole batch with ``num_workers`` threads once ``wait`` is called.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any

from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)
BACKENDS = ("ray", "local")


def grade_chunk(samples: list[Any], router: Any, timeout_s: float | str | None) -> list[float]:
    """Rewards of one chunk (what each Ray task runs): one sample at a time, each within ``timeout_s``."""
    from kexaone_align.verifiers import score_batch

    return score_batch(samples, router, max_workers=1, timeout_s=timeout_s).rewards


class _ChunkGrader:
    """A grading worker that stays up for the whole stage (a Ray actor): its process, imports and math
    worker subprocess are started once, not once per task as with plain Ray tasks, whose idle worker
    processes Ray retires between steps."""

    def grade(self, samples: list[Any], router: Any, timeout_s: float | str | None) -> list[float]:
        return grade_chunk(samples, router, timeout_s)

    def ping(self) -> bool:
        return True


def _grading_actor(num_cpus: float) -> Any:
    import ray

    return ray.remote(num_cpus=num_cpus, max_restarts=2, max_task_retries=2)(_ChunkGrader).options(
        scheduling_strategy="SPREAD"
    )


class StreamingGrader:
    """Grades samples as they are submitted; ``wait`` returns every reward by key (see the module doc).

    A failed task (its worker died past Ray's retries) scores its samples 0 and is counted in
    ``grading/failed_tasks``, as a verifier error or timeout scores one sample 0.
    """

    def __init__(
        self,
        router: Any,
        *,
        backend: str = "ray",
        num_workers: int = 4,
        chunk_size: int = 8,
        timeout_s: float | str | None = "auto",
        cpus_per_task: float = 0.0,
    ) -> None:
        if backend not in BACKENDS:
            raise KexaoneError(f"grading.backend must be one of {list(BACKENDS)}, got {backend!r}")
        if num_workers < 1 or chunk_size < 1:
            raise KexaoneError(
                f"grading: num_workers and chunk_size must be >= 1, got {num_workers} and {chunk_size}"
            )
        bad_word = isinstance(timeout_s, str) and timeout_s != "auto"
        if bad_word or (isinstance(timeout_s, int | float) and timeout_s <= 0):
            raise KexaoneError(f"grading.timeout_s must be > 0 seconds, 'auto' or null, got {timeout_s!r}")
        self.router = router
        self.backend = backend
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        self.cpus_per_task = cpus_per_task
        self._router_ref: Any = None
        self._lock = threading.Condition()
        self._queue: deque[tuple[list[Hashable], list[Any]]] = deque()
        self._inflight: dict[Any, tuple[list[Hashable], Any]] = {}  # task -> (keys, actor)
        self._actors: list[Any] = []  # every grading actor started (at most num_workers)
        self._idle: deque[Any] = deque()
        self._rewards: dict[Hashable, float] = {}
        self._aliases: dict[Hashable, Hashable] = {}  # key -> the key of the same content, graded once
        self._failed = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_submit = 0.0

    # ------------------------------------------------------------------------------- streaming
    def submit(
        self, keys: Sequence[Hashable], samples: Sequence[Any], content: Sequence[Hashable] | None = None
    ) -> None:
        """Queue ``samples`` (``keys[i]`` names ``samples[i]``'s reward); Ray starts grading them now.

        ``content[i]``, when given, names what ``samples[i]`` is graded on (e.g. its prompt row and
        response text): samples of one call with equal content are graded once and every key gets that
        reward. Rule verifiers are functions of the sample, and a sharpened policy repeats itself: half
        of a tiny AGAPO step's 128 responses were duplicates of another in their group.
        """
        if len(keys) != len(samples):
            raise KexaoneError(f"grading: {len(keys)} keys for {len(samples)} samples")
        if content is not None and len(content) != len(keys):
            raise KexaoneError(f"grading: {len(keys)} keys for {len(content)} content entries")
        if content is not None:
            keys, samples = self._first_of_each(keys, samples, content)
        with self._lock:
            for start in range(0, len(samples), self.chunk_size):
                stop = start + self.chunk_size
                self._queue.append((list(keys[start:stop]), list(samples[start:stop])))
            self._last_submit = time.perf_counter()
            if self.backend == "ray":
                self._launch()
                self._ensure_thread()
                self._lock.notify_all()  # wake the harvest thread now, not at its next poll

    def wait(self) -> tuple[dict[Hashable, float], dict[str, float]]:
        """Every submitted reward by key (then the grader is empty again), and ``grading/*`` metrics:
        ``tail_s`` is the time from the last ``submit`` to the last reward."""
        if self.backend == "local":
            self._grade_locally()
        with self._lock:
            while self._queue or self._inflight:
                self._lock.wait(timeout=1.0)
            rewards, self._rewards = self._rewards, {}
            failed, self._failed = self._failed, 0
            aliases, self._aliases = self._aliases, {}
            tail = time.perf_counter() - self._last_submit if rewards else 0.0
        rewards.update({key: rewards[first] for key, first in aliases.items()})
        metrics = {"grading/tail_s": tail, "grading/failed_tasks": float(failed)}
        return rewards, metrics | {"grading/duplicates": float(len(aliases))}

    def grade(self, samples: Sequence[Any]) -> list[float]:
        """Blocking: rewards of ``samples`` in order (held-out evaluation)."""
        if not samples:
            return []
        self.submit(list(range(len(samples))), samples)
        rewards, _ = self.wait()
        return [rewards[i] for i in range(len(samples))]

    def close(self) -> None:
        """Stop the driver thread (pending work is abandoned)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._actors:
            import ray

            if ray.is_initialized():
                for actor in self._actors:
                    ray.kill(actor)
            self._actors, self._idle = [], deque()

    # ------------------------------------------------------------------------------- internals
    def _first_of_each(
        self, keys: Sequence[Hashable], samples: Sequence[Any], content: Sequence[Hashable]
    ) -> tuple[list[Hashable], list[Any]]:
        """The samples whose content is new to this call; the others become aliases of the first key."""
        first: dict[Hashable, Hashable] = {}
        kept_keys, kept = [], []
        with self._lock:
            for key, sample, what in zip(keys, samples, content, strict=True):
                if what in first:
                    self._aliases[key] = first[what]
                    continue
                first[what] = key
                kept_keys.append(key)
                kept.append(sample)
        return kept_keys, kept

    def _launch(self) -> None:
        """Start queued chunks on idle grading actors, at most ``num_workers`` at once (the lock is held)."""
        import ray

        if self._router_ref is None:
            self._router_ref = ray.put(self.router)
        while self._queue and len(self._inflight) < self.num_workers:
            if not self._idle:
                if len(self._actors) >= self.num_workers:
                    return
                actor = _grading_actor(self.cpus_per_task).remote()
                self._actors.append(actor)
                self._idle.append(actor)
            actor = self._idle.popleft()
            keys, samples = self._queue.popleft()
            self._inflight[actor.grade.remote(samples, self._router_ref, self.timeout_s)] = (keys, actor)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._harvest_loop, daemon=True, name="grading")
            self._thread.start()

    def _harvest_loop(self) -> None:
        import ray

        while True:
            with self._lock:
                if self._closed:
                    return
                refs = list(self._inflight)
                if not refs:
                    self._lock.wait(timeout=0.5)
                    continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            for ref in ready:
                try:
                    values = ray.get(ref)
                except Exception as exc:  # a task whose worker kept dying: its samples score 0
                    logger.warning("grading task failed: %s: %s", type(exc).__name__, exc)
                    values = None
                with self._lock:
                    keys, actor = self._inflight.pop(ref)
                    if values is None:  # its actor is beyond restarts: start a fresh one instead
                        self._failed += 1
                        values = [0.0] * len(keys)
                        self._actors.remove(actor)
                        ray.kill(actor)
                    else:
                        self._idle.append(actor)
                    self._rewards.update(zip(keys, values, strict=True))
                    self._launch()
                    self._lock.notify_all()

    def _grade_locally(self) -> None:
        from kexaone_align.verifiers import score_batch

        with self._lock:
            chunks = list(self._queue)
            self._queue.clear()
        keys = [k for ks, _ in chunks for k in ks]
        samples = [s for _, ss in chunks for s in ss]
        if samples:
            result = score_batch(samples, self.router, max_workers=self.num_workers, timeout_s=self.timeout_s)
            with self._lock:
                self._rewards.update(zip(keys, result.rewards, strict=True))
