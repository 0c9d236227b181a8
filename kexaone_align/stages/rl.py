"""Pieces the two sampling stages (AGAPO, GROUPER) share: a pool of rollout workers, prompt -> request
-> graded sample plumbing, the learner batch built from samples, staleness accounting and held-out
evaluation.

Nothing here knows an equation: advantages and losses come from ``kexaone_align.algorithms``. The loss
functions below are module-level so Ray can pickle them to the learner actors.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kexaone_align.algorithms.agapo import agapo_loss, importance_ratio_stats
from kexaone_align.algorithms.grouper import grouper_loss
from kexaone_align.data.chat_format import render_prompt
from kexaone_align.data.prompts import PromptCursor, PromptRow
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import pad_sequences
from kexaone_align.runtime.rollout.base import RolloutRequest, RolloutSample, SamplingConfig
from kexaone_align.runtime.weight_sync import WeightSync
from kexaone_align.verifiers import Sample

logger = logging.getLogger(__name__)

EVAL_TEMPERATURE = 1.0  # held-out evaluation samples like the paper's rollouts: T = 1.0, top-p 0.95
EVAL_TOP_P = 0.95


# ------------------------------------------------------------------------------------------ losses
def agapo_loss_fn(
    logprobs: Tensor, batch: dict[str, Tensor], is_cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Learner ``loss_fn`` for AGAPO: a mean over the micro-batch's responses (``loss_aggregation``
    must be ``"sequences"``); also reports the importance-ratio diagnostics."""
    mask = batch["loss_mask"]
    loss = agapo_loss(logprobs, batch["rollout_logprobs"], batch["advantages"], mask, is_cap)
    stats = importance_ratio_stats(logprobs, batch["rollout_logprobs"], mask, is_cap)
    return loss, {k: v for k, v in stats.items() if math.isfinite(v)}


def grouper_loss_fn(logprobs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Learner ``loss_fn`` for GROUPER: mean over the micro-batch's responses."""
    return grouper_loss(logprobs, batch["advantages"], batch["loss_mask"]), {}


# ------------------------------------------------------------------------------------------ prompts
def load_prompt_rows(recipe: Any) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, held-out) prompt rows of an RL stage: the offline generator, or ``train_files``/``eval_files``.

    Without ``eval_files``, the last ``data.eval_fraction`` of the (file-ordered) training rows is held out.
    """
    from kexaone_align.data.prompts import load_prompt_set

    data = recipe.data
    if data is None:
        raise KexaoneError(f"stage {recipe.stage!r} needs a data section")
    if data.generator:
        from kexaone_align.data.tiny_tasks import generate_rows

        opts = dict(data.generator_options)
        # The stage generator's own default (reasoning mode for RL prompts) unless the recipe sets one.
        frac = data.reasoning_fraction if "reasoning_fraction" in data.model_fields_set else None
        train = generate_rows(data.generator, recipe.stage, data.num_train, recipe.seed, "train",
                              reasoning_fraction=frac, **opts)  # fmt: skip
        held = generate_rows(data.generator, recipe.stage, data.num_eval, recipe.seed, "heldout",
                             reasoning_fraction=frac, **opts)  # fmt: skip
        return load_prompt_set(train), load_prompt_set(held)
    if not data.train_files:
        raise KexaoneError(f"data: give train_files or a generator for stage {recipe.stage!r}")
    train_rows = load_prompt_set(list(data.train_files))
    if data.eval_files:
        return train_rows, load_prompt_set(list(data.eval_files))
    n_held = max(1, int(len(train_rows) * data.eval_fraction))
    if n_held >= len(train_rows):
        raise KexaoneError(f"data: {len(train_rows)} prompt rows are too few to hold {n_held} out")
    return train_rows[:-n_held], train_rows[-n_held:]


# ---------------------------------------------------------------------------------------- requests
@dataclass
class Group:
    """One prompt's G samples after grading, in sample order."""

    row: PromptRow
    samples: list[RolloutSample]
    texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


def build_requests(
    tokenizer: Any, rows: Sequence[PromptRow], group_size: int, tag: str, enable_thinking: bool | None = None
) -> list[RolloutRequest]:
    """One request per prompt row (``group_size`` samples each); ``tag`` keeps request ids unique per call."""
    requests = []
    for i, row in enumerate(rows):
        thinking = row.enable_thinking if enable_thinking is None else enable_thinking
        ids = render_prompt(tokenizer, row.messages, thinking)
        requests.append(RolloutRequest(f"{tag}-{i}-{row.id}", ids, group_size, {"row": i}))
    return requests


def decode_response(tokenizer: Any, sample: RolloutSample) -> str:
    """Response text for a verifier: special tokens like ``</think>`` kept, the final end-of-turn dropped."""
    ids = list(sample.token_ids)
    if sample.finish_reason == "stop" and ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def group_samples(rows: Sequence[PromptRow], samples: Sequence[RolloutSample]) -> list[Group]:
    """Gather the flat sample list back into one group per row (order of ``rows``, then sample index)."""
    groups = [Group(row, []) for row in rows]
    for sample in samples:
        groups[int(sample.metadata["row"])].samples.append(sample)
    for g in groups:
        g.samples.sort(key=lambda s: s.sample_index)
    return groups


def verifier_samples(tokenizer: Any, groups: Sequence[Group]) -> list[Sample]:
    """One ``verifiers.Sample`` per response (groups in order), routed by the row's ``task``."""
    out = []
    for g in groups:
        g.texts = [decode_response(tokenizer, s) for s in g.samples]
        for text in g.texts:
            out.append(Sample(g.row.messages, text, g.row.reference, g.row.task, dict(g.row.metadata)))
    return out


def assign_rewards(groups: Sequence[Group], rewards: Sequence[float]) -> Tensor:
    """Store rewards on their groups and return them as ``[P, G]`` (every group must have G samples)."""
    sizes = {len(g.samples) for g in groups}
    if len(sizes) > 1:
        raise KexaoneError(f"groups have different sizes {sorted(sizes)}; every prompt needs G samples")
    pos = 0
    for g in groups:
        g.rewards = [float(r) for r in rewards[pos : pos + len(g.samples)]]
        pos += len(g.samples)
    return torch.tensor([g.rewards for g in groups], dtype=torch.float32)


def split_stale(
    groups: Sequence[Group], learner_version: int, max_staleness: int
) -> tuple[list[Group], int, float]:
    """Keep groups whose oldest sample is at most ``max_staleness`` versions behind the learner.

    Returns ``(kept groups, number of dropped samples, mean staleness of the kept samples)``.
    """
    kept, dropped, ages = [], 0, []
    for g in groups:
        age = max(learner_version - s.policy_version for s in g.samples)
        if age > max_staleness:
            dropped += len(g.samples)
        else:
            kept.append(g)
            ages.extend(learner_version - s.policy_version for s in g.samples)
    return kept, dropped, (sum(ages) / len(ages) if ages else 0.0)


def per_task_means(groups: Sequence[Group], prefix: str) -> dict[str, float]:
    """``{prefix/<task>: mean reward}`` over every sample of ``groups``."""
    sums: dict[str, list[float]] = {}
    for g in groups:
        sums.setdefault(g.row.task, []).extend(g.rewards)
    return {f"{prefix}/{task}": sum(v) / len(v) for task, v in sums.items() if v}


# ------------------------------------------------------------------------------------------ batches
def training_batch(
    samples: Sequence[RolloutSample], advantages: Sequence[float], pad_token_id: int
) -> dict[str, Tensor]:
    """Right-padded learner batch: prompt + response ids, loss on response tokens, rollout log-probs
    aligned with ``input_ids`` (the learner's column t scores token t), one advantage per row."""
    if len(samples) != len(advantages):
        raise KexaoneError(f"{len(samples)} samples but {len(advantages)} advantages")
    if not samples:
        raise KexaoneError("training_batch needs at least one sample")
    ids, masks, old = [], [], []
    for s in samples:
        n_prompt, n_resp = len(s.prompt_token_ids), len(s.token_ids)
        ids.append(list(s.prompt_token_ids) + list(s.token_ids))
        masks.append([0] * n_prompt + [1] * n_resp)
        old.append([0.0] * n_prompt + [float(x) for x in s.logprobs])
    loss_mask = pad_sequences(masks, 0).long()
    return {
        "input_ids": pad_sequences(ids, pad_token_id).long(),
        "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0).long(),
        "loss_mask": loss_mask,
        "rollout_logprobs": pad_sequences(old, 0.0).float(),
        "advantages": torch.tensor([float(a) for a in advantages], dtype=torch.float32),
    }


def response_stats(samples: Sequence[RolloutSample]) -> dict[str, float]:
    """Mean response length, truncated fraction, and the sampled-token entropy estimate (-mean log-prob)."""
    if not samples:
        return {}
    lengths = [len(s.token_ids) for s in samples]
    logps = [lp for s in samples for lp in s.logprobs]
    return {
        "response_length": sum(lengths) / len(lengths),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "entropy_estimate": -sum(logps) / len(logps) if logps else 0.0,
    }


# ------------------------------------------------------------------------------------ rollout pool
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
    ) -> None:
        if job_timeout_s is not None and job_timeout_s <= 0:
            raise KexaoneError(f"rollout.job_timeout_s must be > 0 (or null), got {job_timeout_s}")
        if num_workers < 1:
            raise KexaoneError(f"rollout.num_workers must be >= 1, got {num_workers}")
        if max_worker_restarts < 0:
            raise KexaoneError(f"rollout.max_worker_restarts must be >= 0, got {max_worker_restarts}")
        kwargs: dict[str, Any] = {"model_path": model_path, "dtype": dtype}
        if backend == "hf":
            kwargs["max_batch_size"] = max_batch_size
        self._actor_spec: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, **kwargs}
        self._backend = backend
        self.workers = [self._start_worker() for _ in range(num_workers)]
        self._wait_ready(self.workers)
        self.max_worker_restarts = max_worker_restarts
        self.job_timeout_s = job_timeout_s
        self.worker_restarts = 0
        self.version = 0  # the policy version the pool last pushed (workers start at 0: model_path)
        self._weights: list[Any] = []  # ObjectRefs of that push's buckets (only while restarts are allowed)
        self._jobs: dict[Any, RolloutJob] = {}  # submitted, not yet collected, by future
        self._sync: Any = None

    def _start_worker(self) -> Any:
        from kexaone_align.runtime.rollout.worker import remote_rollout_worker

        return remote_rollout_worker(self._backend, **self._actor_spec)

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

    def collect(self, futures: Sequence[Any]) -> tuple[list[RolloutSample], dict[str, float]]:
        """Wait for :meth:`submit`'s futures; returns the samples (in order) and the workers' throughput.

        A future whose worker died is re-issued, whole, to the worker's replacement (see the class doc).
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
            except RayActorError as exc:
                if not _died(exc, job.actor):  # e.g. an argument's producer died: not this worker
                    raise
                jobs[k] = self._reissue(job, exc)
                pending[jobs[k].ref] = k
        samples = [s for part in results for s in part or []]
        _check_complete(jobs, samples)
        waited = time.perf_counter() - started
        stats = []
        for w in self.workers:
            try:
                stats.append(ray.get(w.metrics.remote()))
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
        worker = self._start_worker()
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
        """Stream the learners' parameters to every worker as ``version`` (object store transport)."""
        from kexaone_align.runtime.weight_sync import sync_from_learners

        if self._sync is None:
            self._sync = _KeepingSync(self.workers, keep=self.max_worker_restarts > 0)
        metrics = sync_from_learners(learners.actors, self._sync, version, bucket_bytes)
        self.version = version
        self._weights = self._sync.kept
        dead, self._sync.dead = self._sync.dead, {}
        for index, cause in sorted(dead.items()):  # died during the push: replaced at the new version
            self._replace_worker(index, cause)
        return metrics.as_dict()

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
    """The pool's object-store ``WeightSync``, tolerant of rollout workers that die during a push.

    With ``keep``: the ObjectRefs of the last push's buckets are kept (``kept``) so a replacement worker
    can be loaded with the same weights without asking the learners again, and a worker that dies
    mid-push is recorded in ``dead`` (index -> error) while the push goes on to the others (the learners'
    bucket stream is always read to its end). Without ``keep`` a death raises, as in ``WeightSync``.
    """

    def __init__(self, targets: Sequence[Any], *, keep: bool) -> None:
        super().__init__(targets, transport="object_store")
        self.keep = keep
        self.kept: list[Any] = []
        self.dead: dict[int, BaseException] = {}

    def _push_object_store(self, version: int, buckets: Iterable[Any]) -> tuple[int, int, int]:
        import ray
        from ray.exceptions import RayActorError

        nbytes = ntensors = nbuckets = 0
        kept: list[Any] = []
        inflight: deque[list[tuple[int, Any]]] = deque()

        def alive() -> list[tuple[int, Any]]:
            return [(i, w) for i, w in enumerate(self.targets) if i not in self.dead]

        def settle(acks: list[tuple[int, Any]]) -> list[Any]:
            results = []
            for i, ack in acks:
                try:
                    results.append(ray.get(ack))
                except RayActorError as exc:  # a dead learner (the bucket's producer) is raised
                    if not self.keep or not _died(exc, self.targets[i]):
                        raise
                    self.dead.setdefault(i, exc)
            return results

        def count(results: list[Any]) -> None:
            nonlocal nbytes, ntensors
            if results:
                nbytes += int(results[0]["bytes"])
                ntensors += int(results[0]["tensors"])

        for bucket in buckets:
            ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
            if self.keep:
                kept.append(ref)
            inflight.append([(i, w.update_weights.remote(version, ref)) for i, w in alive()])
            nbuckets += 1
            del ref
            while len(inflight) >= self.max_inflight_buckets:
                count(settle(inflight.popleft()))
        while inflight:
            count(settle(inflight.popleft()))
        settle([(i, w.finish_update.remote(version)) for i, w in alive()])
        self.kept = kept
        return nbytes, ntensors, nbuckets


# -------------------------------------------------------------------------------------- evaluation
def evaluate(
    pool: RolloutPool,
    tokenizer: Any,
    rows: Sequence[PromptRow],
    grade: Any,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    seed: int,
    tag: str,
) -> dict[str, float]:
    """Held-out score by sampling (T=1.0, top-p 0.95): mean reward overall (``accuracy``) and per task.

    ``grade(samples) -> list[float]`` scores verifier samples (rule verifiers or the reward combiner).
    Calling it with the same ``tag`` and ``seed`` before and after training draws the same random
    numbers for each (prompt, sample), which takes sampling noise out of the before/after difference.
    """
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=EVAL_TEMPERATURE, top_p=EVAL_TOP_P, seed=seed
    )
    requests = build_requests(tokenizer, rows, samples_per_prompt, tag)
    groups = group_samples(rows, pool.generate(requests, sampling))
    rewards = grade(verifier_samples(tokenizer, groups))
    assign_rewards(groups, rewards)
    flat = [r for g in groups for r in g.rewards]
    out = {"accuracy": sum(flat) / len(flat) if flat else 0.0, "num_samples": float(len(flat))}
    out.update({k.split("/", 1)[1]: v for k, v in per_task_means(groups, "task").items()})
    lengths = response_stats([s for g in groups for s in g.samples])
    out["response_length"] = lengths.get("response_length", 0.0)
    return out


def rollout_pool_for(recipe: Any, model_path: Any) -> RolloutPool:
    """The recipe's rollout workers, serving ``model_path``."""
    roll = recipe.rollout
    return RolloutPool(
        str(model_path), roll.backend, roll.num_workers, dtype=recipe.model.dtype,
        max_batch_size=roll.batch_size or 64, num_cpus=recipe.cluster.cpus_per_actor,
        max_worker_restarts=roll.max_worker_restarts, job_timeout_s=roll.job_timeout_s,
    )  # fmt: skip


def restored_cursor(recipe: Any, train_rows: Sequence[PromptRow], state: dict[str, Any]) -> PromptCursor:
    """The training-prompt cursor, at the position a resumed checkpoint's trainer state recorded."""
    cursor = PromptCursor(train_rows, recipe.seed, shuffle=recipe.data.shuffle)
    if state.get("cursor"):
        cursor.load_state_dict(state["cursor"])
    return cursor
