"""The stage's rollout workers as one pool: requests split across Ray actors, weights pushed to all, and
dead or hung workers replaced without losing or duplicating a sample.

The pool is plumbing shared by every sampling stage (AGAPO, GROUPER); what each worker asks Ray for
comes from :mod:`kexaone_align.runtime.rollout.resources`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import RolloutRequest, RolloutSample, SamplingConfig
from kexaone_align.runtime.rollout.resources import RolloutPlan, actor_options, create_rollout_group
from kexaone_align.runtime.weight_sync import LEARNER_TRANSPORTS, WeightSync

logger = logging.getLogger(__name__)


@dataclass
class RolloutJob:
    """One worker's share of a :meth:`RolloutPool.submit`: kept so it can be re-issued if the worker dies."""

    index: int  # position of the worker in the pool
    actor: Any  # the actor it was sent to (a replaced worker's jobs are recognised by this)
    requests: list[RolloutRequest]
    sampling: SamplingConfig
    ref: Any  # Ray future of ``generate``
    submitted: float = field(default_factory=time.monotonic)  # for rollout.job_timeout_s


class RolloutPool:
    """The stage's rollout workers (Ray actors): requests are split across them, weights pushed to all.

    Fault tolerance: a worker that dies (``ray.exceptions.RayActorError``) while it holds a job is
    replaced by a new actor with the same resources, loaded with the weights the pool last pushed (so
    it serves the same policy version), and exactly that worker's requests are re-issued to it; the
    other workers' results are kept. Request ids make the check that nothing is lost or duplicated
    cheap, and :meth:`collect` enforces it. After ``max_worker_restarts`` replacements the next death
    is a ``KexaoneError``. ``rollout/worker_restarts`` in :meth:`collect`'s metrics counts them.
    A worker that holds a job longer than ``job_timeout_s`` is taken as hung and treated the same way
    (killed first, so its late result can never arrive twice).

    Weights (:meth:`push_weights`) travel over ``weight_sync_transport`` (``rollout.weight_sync_transport``).
    Either way the last push is kept in the object store while restarts are allowed (with
    ``collective`` the copy is put there by learner rank 0), so a replacement is loaded with exactly
    the pool's current version before it gets any request; a worker is never served from at another
    version than its peers. With ``collective`` a replacement also makes the next push form the side
    group again, with the new worker in it.
    """

    def __init__(
        self,
        model_path: str,
        backend: str,
        num_workers: int,
        *,
        dtype: str = "float32",
        max_batch_size: int = 64,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_worker_restarts: int = 3,
        job_timeout_s: float | None = None,
        plan: RolloutPlan | None = None,
        placement_group: Any = None,
        weight_sync_transport: str = "object_store",
    ) -> None:
        """Start the workers: from a recipe's :class:`RolloutPlan` (``rollout_pool_for``), or for tests
        from the plain arguments (CPU actors). ``placement_group`` is the learners' group, which a
        colocated plan's workers share; a disaggregated plan creates its own."""
        if job_timeout_s is not None and job_timeout_s <= 0:
            raise KexaoneError(f"rollout.job_timeout_s must be > 0 (or null), got {job_timeout_s}")
        if num_workers < 1:
            raise KexaoneError(f"rollout.num_workers must be >= 1, got {num_workers}")
        if max_worker_restarts < 0:
            raise KexaoneError(f"rollout.max_worker_restarts must be >= 0, got {max_worker_restarts}")
        if weight_sync_transport not in LEARNER_TRANSPORTS:
            raise KexaoneError(
                f"rollout.weight_sync_transport must be one of {list(LEARNER_TRANSPORTS)}, "
                f"got {weight_sync_transport!r}"
            )
        if plan is None:
            engine: dict[str, Any] = {"dtype": dtype}
            if backend == "hf":
                engine["max_batch_size"] = max_batch_size
            plan = RolloutPlan(backend, num_workers, "cpu", num_cpus, num_gpus, 1, [], [], None, engine)
        if plan.num_workers != num_workers or plan.backend != backend:
            raise KexaoneError("RolloutPool: the plan's backend and num_workers differ from the arguments")
        self.plan = plan
        self._model_path = model_path
        self._backend = backend
        self._owned_group = None
        self._group = placement_group
        if plan.layout == "colocated" and placement_group is None:
            raise KexaoneError("a colocated rollout plan needs the learners' placement group")
        if plan.bundles:  # disaggregated: the engines' own placement group
            self._group = self._owned_group = create_rollout_group(plan)
        self.workers: list[Any] = []
        self._weights: list[Any] = []
        self._jobs: dict[Any, RolloutJob] = {}
        try:
            self.workers = [self._start_worker(i) for i in range(num_workers)]
            self._wait_ready(self.workers)
        except BaseException:  # an engine that cannot load: leave no actor or placement group behind
            self.shutdown()
            raise
        self.max_worker_restarts = max_worker_restarts
        self.job_timeout_s = job_timeout_s
        self.worker_restarts = 0
        self.version = 0  # the policy version the pool last pushed (workers start at 0: model_path)
        self._weights: list[Any] = []  # ObjectRefs of that push's buckets (only while restarts are allowed)
        self._jobs: dict[Any, RolloutJob] = {}  # submitted, not yet collected, by future
        self.weight_sync_transport = weight_sync_transport
        self._sync: Any = None

    def _start_worker(self, index: int) -> Any:
        from kexaone_align.runtime.rollout.worker import remote_rollout_worker

        options = actor_options(self.plan, index, self._group)
        return remote_rollout_worker(
            self._backend, model_path=self._model_path, **options, **self.plan.engine
        )

    @staticmethod
    def _wait_ready(workers: Sequence[Any]) -> None:
        """Block until the workers have loaded their model: a load error surfaces here, and
        ``job_timeout_s`` never counts start-up (a large engine can take many minutes to load)."""
        import ray

        ray.get([w.ping.remote() for w in workers])

    def submit(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[Any]:
        """Launch generation (Ray futures, one per worker with work); collect with :meth:`collect`.

        The pool remembers which requests each future carries until it is collected.
        """
        from kexaone_align.runtime import faults

        n = len(self.workers)
        jobs = []
        for i, worker in enumerate(self.workers):
            shard = list(requests[i::n])
            if shard:
                jobs.append(RolloutJob(i, worker, shard, sampling, worker.generate.remote(shard, sampling)))
        self._jobs.update({job.ref: job for job in jobs})
        faults.fire("rollout.submitted", pool=self, jobs=jobs)
        return [job.ref for job in jobs]

    def collect(
        self, futures: Sequence[Any], on_result: Callable[[list[RolloutSample]], None] | None = None
    ) -> tuple[list[RolloutSample], dict[str, float]]:
        """Wait for :meth:`submit`'s futures; returns the samples (in order) and the workers' throughput.

        A future whose worker died is re-issued, whole, to the worker's replacement (see the class doc).
        ``on_result`` is called with each worker's samples as they arrive (grading starts there).
        """
        import ray
        from ray.exceptions import RayActorError

        started = time.perf_counter()
        unknown = [ref for ref in futures if ref not in self._jobs]
        if unknown:
            raise KexaoneError(
                f"collect: {len(unknown)} future(s) were not submitted to this pool (or collected)"
            )
        jobs = [self._jobs.pop(ref) for ref in futures]
        results: list[list[RolloutSample] | None] = [None] * len(jobs)
        pending = {job.ref: k for k, job in enumerate(jobs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self._wait_budget(jobs, pending))
            if not ready:  # the oldest job overran rollout.job_timeout_s: its worker is hung
                k = min(pending.values(), key=lambda i: jobs[i].submitted)
                del pending[jobs[k].ref]
                hung = TimeoutError(f"no result after rollout.job_timeout_s={self.job_timeout_s:g}s")
                jobs[k] = self._reissue(jobs[k], hung)
                pending[jobs[k].ref] = k
                continue
            k = pending.pop(ready[0])
            job = jobs[k]
            try:
                results[k] = ray.get(job.ref)
                if on_result is not None:
                    on_result(results[k])
            except RayActorError as exc:
                if not _died(exc, job.actor):  # e.g. an argument's producer died: not this worker
                    raise
                jobs[k] = self._reissue(job, exc)
                pending[jobs[k].ref] = k
        samples = [s for part in results for s in part or []]
        _check_complete(jobs, samples)
        waited = time.perf_counter() - started
        stats = []
        asked = [w.metrics.remote() for w in self.workers]
        # a worker hung after its work was done must not hang the stage: job_timeout_s bounds this too
        answered, _ = ray.wait(asked, num_returns=len(asked), timeout=self.job_timeout_s)
        for ref in answered:
            try:
                stats.append(ray.get(ref))
            except RayActorError:  # died after its work was done: replaced when next needed
                pass
        tokens = sum(m.get("rollout/generated_tokens", 0.0) for m in stats)
        seconds = max((m.get("rollout/seconds", 0.0) for m in stats), default=0.0)
        return samples, {
            "rollout/tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "rollout/seconds": seconds,
            "rollout/wait_s": waited,
            "rollout/worker_restarts": float(self.worker_restarts),
        }

    def _wait_budget(self, jobs: Sequence[RolloutJob], pending: dict[Any, int]) -> float | None:
        """Seconds until the oldest pending job overruns ``job_timeout_s`` (None: no limit)."""
        if self.job_timeout_s is None:
            return None
        oldest = min(jobs[k].submitted for k in pending.values())
        return max(0.0, oldest + self.job_timeout_s - time.monotonic())

    def _reissue(self, job: RolloutJob, cause: BaseException) -> RolloutJob:
        """Replace ``job``'s worker (unless an earlier job already did) and send it the same requests."""
        if self.workers[job.index] is job.actor:
            self._replace_worker(job.index, cause)
        actor = self.workers[job.index]
        return RolloutJob(job.index, actor, job.requests, job.sampling,
                          actor.generate.remote(job.requests, job.sampling))  # fmt: skip

    def _replace_worker(self, index: int, cause: BaseException) -> None:
        """Start a new actor in place of dead worker ``index``, at the pool's current policy version."""
        import ray

        what = f"hung ({cause})" if isinstance(cause, TimeoutError) else f"died ({type(cause).__name__})"
        if self.worker_restarts >= self.max_worker_restarts:
            raise KexaoneError(
                f"rollout worker {index} {what} and the pool already replaced {self.worker_restarts} "
                f"worker(s), the limit rollout.max_worker_restarts={self.max_worker_restarts}"
            ) from cause
        logger.warning(
            "rollout worker %d %s; starting a replacement at policy version %d (restart %d of %d)",
            index, what, self.version, self.worker_restarts + 1, self.max_worker_restarts,
        )  # fmt: skip
        ray.kill(self.workers[index])  # make sure it is gone (a no-op when it is already dead)
        worker = self._start_worker(index)
        self._wait_ready([worker])
        if self.version > 0:
            if not self._weights:
                raise KexaoneError(
                    f"rollout worker {index} died and the weights of version {self.version} were not kept"
                ) from cause
            WeightSync([worker], transport="object_store").push(self.version, self._weights)
        self.workers[index] = worker
        if self._sync is not None:
            self._sync.targets[index] = worker
        self.worker_restarts += 1

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[RolloutSample]:
        """Synchronous :meth:`submit` + :meth:`collect`."""
        return self.collect(self.submit(requests, sampling))[0]

    def push_weights(self, learners: Any, version: int, bucket_bytes: int) -> dict[str, float]:
        """Send the learner group's parameters to every worker as ``version``; returns the sync metrics.

        ``object_store``: a worker that dies during the push is replaced afterwards, at the new version.
        ``collective``: dead workers are replaced before the push (a dead member would leave the others
        waiting in the group's rendezvous); if the push fails and a worker turns out to have died in it,
        the dead are replaced (at the previous version) and the push is retried once, at the same
        version, over a new group: the learners still hold exactly that version, and the survivors
        accept it again because they never published it.
        """
        from kexaone_align.runtime.weight_sync import sync_from_learners

        if self._sync is None:
            self._sync = _KeepingSync(
                self.workers, transport=self.weight_sync_transport, keep=self.max_worker_restarts > 0
            )
        collective = self._sync.transport == "collective"
        if collective:
            self._replace_dead_workers()
        try:
            metrics = sync_from_learners(learners.actors, self._sync, version, bucket_bytes)
        except Exception as exc:
            if not (collective and self._replace_dead_workers()):
                raise
            logger.warning("weight push of version %d failed (%s); retrying once with the replaced "
                           "worker(s)", version, type(exc).__name__)  # fmt: skip
            metrics = sync_from_learners(learners.actors, self._sync, version, bucket_bytes)
        self.version = version
        self._weights = self._sync.kept
        dead, self._sync.dead = self._sync.dead, {}
        for index, cause in sorted(dead.items()):  # died during the push: replaced at the new version
            self._replace_worker(index, cause)
        return metrics.as_dict()

    def _replace_dead_workers(self) -> int:
        """Replace every worker that no longer answers because its actor died; returns how many."""
        import ray
        from ray.exceptions import RayActorError

        pings = [(i, w, w.ping.remote()) for i, w in enumerate(self.workers)]
        replaced = 0
        for index, worker, ping in pings:
            try:
                ray.get(ping)
            except RayActorError as exc:
                if not _died(exc, worker):
                    raise
                self._replace_worker(index, exc)
                replaced += 1
        return replaced

    def versions(self) -> list[int]:
        import ray

        return [p["policy_version"] for p in ray.get([w.ping.remote() for w in self.workers])]

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        self._weights = []
        self._jobs = {}
        if self._owned_group is not None:
            from ray.util import remove_placement_group

            remove_placement_group(self._owned_group)
            self._owned_group = None

    def release_memory(self) -> None:
        """Colocated vLLM engines: free their GPU memory for the learners' step (no-op otherwise)."""
        if self.plan.sleep_while_training:
            import ray

            ray.get([w.release_memory.remote() for w in self.workers])

    def resume(self) -> None:
        """Undo :meth:`release_memory` before the next generation."""
        if self.plan.sleep_while_training:
            import ray

            ray.get([w.resume.remote() for w in self.workers])


def _died(exc: BaseException, actor: Any) -> bool:
    """Whether ``exc`` reports the death of ``actor`` itself, not of another actor its task depended on
    (that arrives wrapped in a ``RayTaskError``)."""
    from ray.exceptions import RayActorError, RayTaskError

    if not isinstance(exc, RayActorError) or isinstance(exc, RayTaskError):
        return False
    dead_id = getattr(exc, "actor_id", None)
    return dead_id is None or dead_id == actor._actor_id.hex()


def _check_complete(jobs: Sequence[RolloutJob], samples: Sequence[RolloutSample]) -> None:
    """Every (request id, sample index) asked for came back exactly once, and nothing else."""
    want = {(r.request_id, i) for job in jobs for r in job.requests for i in range(r.num_samples)}
    got = [(s.request_id, s.sample_index) for s in samples]
    if len(got) != len(set(got)) or set(got) != want:
        missing, extra = len(want - set(got)), len(set(got) - want)
        raise KexaoneError(
            f"rollout results do not match the requests: {missing} sample(s) missing, {extra} unexpected, "
            f"{len(got) - len(set(got))} duplicated"
        )


class _KeepingSync(WeightSync):
    """The pool's ``WeightSync``, tolerant of rollout workers that die during an object-store push.

    With ``keep``: the ObjectRefs of the last push's buckets are kept (``kept``; for ``collective`` they
    are copies put by learner rank 0) so a replacement worker can be loaded with the same weights
    without asking the learners again. In an object-store push a worker that dies mid-push is recorded
    in ``dead`` (index -> error) while the push goes on to the others (the learners' bucket stream is
    always read to its end). Without ``keep`` a death raises, as in ``WeightSync``. A death in a
    collective push breaks the group for everyone, so :meth:`RolloutPool.push_weights` handles it.
    """

    def __init__(self, targets: Sequence[Any], *, transport: str, keep: bool) -> None:
        super().__init__(targets, transport=transport, keep=keep)  # type: ignore[arg-type]
        self.dead: dict[int, BaseException] = {}

    def _live_targets(self) -> list[tuple[int, Any]]:
        return [(i, w) for i, w in enumerate(self.targets) if i not in self.dead]

    def _settle(self, acks: list[tuple[int, Any]]) -> list[Any]:
        import ray
        from ray.exceptions import RayActorError

        results = []
        for i, ack in acks:
            try:
                results.append(ray.get(ack))
            except RayActorError as exc:  # a dead learner (the bucket's producer) is raised
                if not self.keep or not _died(exc, self.targets[i]):
                    raise
                self.dead.setdefault(i, exc)
        return results
