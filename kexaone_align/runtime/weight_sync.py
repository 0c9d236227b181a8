"""Versioned weight pushes from the learners to every rollout worker, one bucket at a time.

The learners gather their ZeRO-3 shards bucket by bucket, so no process ever holds more than a bucket
or two of the full model. Every rank must join each gather, but only learner rank 0 sends: the other
ranks walk the same gathers in one plain remote call (``Learner.join_state_dict_gathers``) and return
a count, so no tensor of theirs ever reaches the driver or the object store. Under ZeRO-2 rank 0 holds
every weight and the other ranks return at once (no collective to join).

Transports:

* ``local``: in-process backends (tests, single-process CPU runs); tensors are copied directly.
* ``object_store``: Ray's object store. Learner rank 0 yields each bucket from a streaming generator
  (``state_dict_stream``, at most two buckets ahead); each bucket is stored once and every worker
  fetches it. The driver holds ``ObjectRef``s only. At most ``max_inflight_buckets`` are in flight.
* ``collective``: learner rank 0 drives the whole push by itself in one call
  (``Learner.broadcast_weights``): for each bucket it broadcasts a header, the bucket's metadata and
  one flat byte buffer (:func:`broadcast_buckets`) over a side process group that holds rank 0 and
  every rollout worker (every tensor-parallel rank of a vLLM engine), then an end marker. Each worker
  runs one call, ``receive_weights(version)``, that loops over :func:`receive_buckets` until the end
  marker. Weights never pass through the driver. The group is gloo when the learners are on CPU and
  nccl when they are on CUDA (``Learner.weight_sync_endpoint`` decides); it is formed once and kept,
  and formed again when a rollout worker or the sending learner changes. gloo is tested on CPU;
  nccl is the same code on CUDA tensors and is unverified here.
* ``gloo`` / ``nccl``: the same wire protocol, but the process that calls :meth:`WeightSync.push`
  is the sender (benchmarks, :class:`CheckpointWeightSource`).

Every push is versioned: the sender refuses a version that is not newer than its last push, and each
backend refuses it again (a collective receiver drains the refused push so the sender never blocks),
so a stale learner can never overwrite newer rollout weights. Each push returns :class:`SyncMetrics`
(seconds, bytes, buckets, GB/s) for the metrics stream.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.weight_wire import (
    BroadcastSender,
    Bucket,
    broadcast_buckets,
    bucket_nbytes,
    bucketize,
    free_port,
    open_sync_group,
    sync_endpoint,
)

logger = logging.getLogger(__name__)

Transport = Literal["local", "object_store", "collective", "gloo", "nccl"]
# what a recipe may choose (rollout.weight_sync_transport)
LEARNER_TRANSPORTS = ("object_store", "collective")
# How long a failed push waits for the learners' other ranks to finish their gathers before giving up.
_SETTLE_TIMEOUT_S = 120.0


@dataclass
class SyncMetrics:
    """What one versioned push cost; ``as_dict`` gives the keys that go to the metrics sinks."""

    version: int
    transport: str
    seconds: float
    num_bytes: int
    num_tensors: int
    num_buckets: int
    num_workers: int

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "weight_sync/version": float(self.version),
            "weight_sync/seconds": self.seconds,
            "weight_sync/gb": self.num_bytes / 1e9,
            "weight_sync/gb_per_s": self.gb_per_s,
            "weight_sync/tensors": float(self.num_tensors),
            "weight_sync/buckets": float(self.num_buckets),
        }


# -- the pusher ---------------------------------------------------------------------------------------
class WeightSync:
    """Pushes versioned weights to rollout targets over one transport, and remembers the last version.

    ``targets`` are in-process backends (``local``) or ``RolloutWorker`` Ray actor handles (other
    transports). :meth:`push` sends buckets the calling process has (``local``, ``object_store``, or
    ``gloo``/``nccl`` with the caller as rank 0 of the side group). :meth:`push_from_learners` sends
    a learner group's weights (``object_store`` or ``collective``), with learner rank 0 as the source.

    ``keep``: remember the last push's buckets in the object store (``kept``), for replacing a
    rollout worker at the same version. With ``collective`` the copy is put by learner rank 0.
    """

    def __init__(
        self,
        targets: Sequence[Any],
        *,
        transport: Transport = "object_store",
        max_inflight_buckets: int = 2,
        host: str | None = None,
        device: str | None = None,
        keep: bool = False,
    ) -> None:
        if not targets:
            raise KexaoneError("weight sync needs at least one rollout target")
        if transport not in ("local", "object_store", "collective", "gloo", "nccl"):
            raise KexaoneError(
                f"unknown weight-sync transport {transport!r}; expected one of "
                "'local', 'object_store', 'collective', 'gloo', 'nccl'"
            )
        self.targets = list(targets)
        self.transport = transport
        self.max_inflight_buckets = max(1, max_inflight_buckets)
        self.last_version: int | None = None
        self.keep = keep
        self.kept: list[Any] = []
        self._group: Any = None
        self._group_key: tuple[Any, ...] | None = None  # (sender, workers) the learner-side group joined
        self._host = host
        self._device = device or ("cuda" if transport == "nccl" else "cpu")

    def _claim(self, version: int) -> None:
        if self.last_version is not None and version <= self.last_version:
            raise KexaoneError(
                f"stale weight sync: version {version} is not newer than the last pushed version "
                f"{self.last_version}"
            )

    def _metrics(self, version: int, start: float, counts: tuple[int, int, int]) -> SyncMetrics:
        self.last_version = version
        nbytes, ntensors, nbuckets = counts
        return SyncMetrics(
            version=version,
            transport=self.transport,
            seconds=time.perf_counter() - start,
            num_bytes=nbytes,
            num_tensors=ntensors,
            num_buckets=nbuckets,
            num_workers=len(self.targets),
        )

    def push(self, version: int, buckets: Iterable[Any]) -> SyncMetrics:
        """Send every bucket to every target, then publish ``version`` on all of them."""
        if self.transport == "collective":
            raise KexaoneError("the collective transport sends from learner rank 0: use push_from_learners")
        self._claim(version)
        start = time.perf_counter()
        if self.transport == "local":
            counts = self._push_local(version, buckets)
        elif self.transport == "object_store":
            counts = self._push_object_store(version, buckets)
        else:
            counts = self._push_collective(version, buckets)
        return self._metrics(version, start, counts)

    def push_from_learners(self, learners: Sequence[Any], version: int, bucket_bytes: int) -> SyncMetrics:
        """Push the learner group's weights as ``version``: rank 0 sends, every other rank joins the
        ZeRO-3 gathers in one call (see the module docstring for who calls what)."""
        if not learners:
            raise KexaoneError("a weight push from learners needs at least one learner")
        if self.transport not in LEARNER_TRANSPORTS:
            raise KexaoneError(
                f"weight sync from learners uses 'object_store' or 'collective', not {self.transport!r}"
            )
        if bucket_bytes < 1:
            raise KexaoneError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self._claim(version)
        start = time.perf_counter()
        if self.transport == "object_store":
            counts = self._object_store_from_learners(learners, version, bucket_bytes)
        else:
            counts = self._collective_from_learners(learners, version, bucket_bytes)
        return self._metrics(version, start, counts)

    # -- local and object store -------------------------------------------------------------------
    def _push_local(self, version: int, buckets: Iterable[Bucket]) -> tuple[int, int, int]:
        nbytes = ntensors = nbuckets = 0
        for bucket in buckets:
            for target in self.targets:
                target.update_weights(version, bucket)
            nbytes += bucket_nbytes(bucket)
            ntensors += len(bucket)
            nbuckets += 1
        for target in self.targets:
            target.finish_update(version)
        return nbytes, ntensors, nbuckets

    def _live_targets(self) -> list[tuple[int, Any]]:
        """(index, worker) of the targets a push goes to (the rollout pool's subclass leaves out the dead)."""
        return list(enumerate(self.targets))

    def _settle(self, acks: list[tuple[int, Any]]) -> list[Any]:
        """Wait for the workers' acknowledgements of one bucket (or of the finish); a failure raises."""
        import ray

        return ray.get([ack for _, ack in acks])

    def _push_object_store(self, version: int, buckets: Iterable[Any]) -> tuple[int, int, int]:
        import ray

        nbytes = ntensors = nbuckets = 0
        kept: list[Any] = []
        inflight: deque[list[tuple[int, Any]]] = deque()

        def count(results: list[Any]) -> None:
            nonlocal nbytes, ntensors
            if results:  # every worker acknowledges the same bucket: count it once
                nbytes += int(results[0]["bytes"])
                ntensors += int(results[0]["tensors"])

        for bucket in buckets:
            ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
            if self.keep:
                kept.append(ref)
            inflight.append([(i, w.update_weights.remote(version, ref)) for i, w in self._live_targets()])
            nbuckets += 1
            del ref
            while len(inflight) >= self.max_inflight_buckets:
                count(self._settle(inflight.popleft()))
        while inflight:
            count(self._settle(inflight.popleft()))
        self._settle([(i, w.finish_update.remote(version)) for i, w in self._live_targets()])
        self.kept = kept
        return nbytes, ntensors, nbuckets

    def _object_store_from_learners(
        self, learners: Sequence[Any], version: int, bucket_bytes: int
    ) -> tuple[int, int, int]:
        """Rank 0 streams buckets into the object store (two ahead at most); ranks > 0 only gather."""
        # Backpressure: rank 0 may run at most two buckets ahead of the workers consuming them. The
        # other ranks' gathers simply wait in the collective for rank 0, which the driver keeps moving.
        stream = (
            learners[0].state_dict_stream.options(_generator_backpressure_num_objects=2).remote(bucket_bytes)
        )
        gathers = [learner.join_state_dict_gathers.remote(bucket_bytes) for learner in learners[1:]]
        try:
            counts = self._push_object_store(version, stream)
        except BaseException:
            _drain_stream(stream)  # rank 0 must finish its gathers, or ranks > 0 wait in them forever
            _settle_quietly(gathers)
            raise
        _check_gathers(_get(gathers), counts[2])
        return counts

    # -- collective -------------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        """The side group with this process as rank 0 (``gloo``/``nccl`` transports)."""
        if self._group is not None:
            return
        import ray

        host = self._host or ray.util.get_node_ip_address()
        port = free_port()
        ranks = _get([w.sync_ranks.remote(self.transport) for w in self.targets])
        world_size = 1 + sum(ranks)
        joins, offset = [], 1
        for worker, n in zip(self.targets, ranks, strict=True):
            joins.append(worker.join_weight_sync_group.remote(host, port, offset, world_size, self.transport))
            offset += n
        self._group = open_sync_group(host, port, 0, world_size, self.transport)
        _get(joins)

    def _push_collective(self, version: int, buckets: Iterable[Any]) -> tuple[int, int, int]:
        import ray

        self._ensure_group()
        receives = [w.receive_weights.remote(version) for w in self.targets]
        fetched = (ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in buckets)
        try:
            counts = broadcast_buckets(self._group, fetched, self._device, version=version)
        except BaseException:
            _settle_quietly(receives)
            self._group = None  # possibly broken: form a new one next time
            raise
        _check_received(_get(receives), counts[2])
        return counts

    def _ensure_learner_group(self, sender: Any) -> None:
        """Form (once, or again when a member changed) the side group: learner rank 0 is its rank 0."""
        key = (_actor_key(sender), *(_actor_key(w) for w in self.targets))
        if self._group_key == key:
            return
        self._group_key = None
        endpoint = _get(sender.weight_sync_endpoint.remote())
        host, port, backend = endpoint["host"], int(endpoint["port"]), endpoint["backend"]
        # each worker says how many ranks it takes, and refuses a backend it cannot receive on (an
        # nccl group with a CPU worker) before anyone starts waiting in the rendezvous
        ranks = _get([w.sync_ranks.remote(backend) for w in self.targets])
        world_size = 1 + sum(ranks)
        joins, offset = [sender.join_weight_sync_group.remote(host, port, world_size, backend)], 1
        for worker, n in zip(self.targets, ranks, strict=True):
            joins.append(worker.join_weight_sync_group.remote(host, port, offset, world_size, backend))
            offset += n
        _get(joins)
        self._group_key = key

    def _collective_from_learners(
        self, learners: Sequence[Any], version: int, bucket_bytes: int
    ) -> tuple[int, int, int]:
        """Learner rank 0 broadcasts every bucket in one call; each worker receives in one call."""
        sender = learners[0]
        self._ensure_learner_group(sender)
        receives = [w.receive_weights.remote(version) for w in self.targets]
        send = sender.broadcast_weights.remote(version, bucket_bytes, self.keep)
        gathers = [learner.join_state_dict_gathers.remote(bucket_bytes) for learner in learners[1:]]
        try:
            sent = _get(send)
        except BaseException:
            _settle_quietly(receives)
            _settle_quietly(gathers)
            self._group_key = None  # the group may be broken (a dead member): form it again next time
            raise
        try:
            received = _get(receives)
        except BaseException:
            _settle_quietly(gathers)
            self._group_key = None
            raise
        _check_received(received, int(sent["buckets"]))
        _check_gathers(_get(gathers), int(sent["buckets"]))
        self.kept = list(sent.get("kept") or [])
        return int(sent["bytes"]), int(sent["tensors"]), int(sent["buckets"])


def _get(refs: Any) -> Any:
    import ray

    return ray.get(refs)


def _actor_key(handle: Any) -> Any:
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else id(handle)


def _drain_stream(stream: Any) -> None:
    """Read a learner's bucket stream to its end, dropping the buckets (errors are the caller's)."""
    try:
        for ref in stream:
            del ref
    except Exception:  # the stream itself failed: the caller raises its own error
        pass


def _settle_quietly(refs: Sequence[Any]) -> None:
    """Wait (bounded) for remote calls of a failed push to end, ignoring their errors."""
    import ray

    if not refs:
        return
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=_SETTLE_TIMEOUT_S)
    for ref in done:
        try:
            ray.get(ref)
        except Exception:
            pass
    if pending:
        logger.warning("weight sync: %d call(s) of a failed push did not finish in %.0fs",
                       len(pending), _SETTLE_TIMEOUT_S)  # fmt: skip


def _check_received(results: Sequence[Any], num_buckets: int) -> None:
    for index, result in enumerate(results):
        got = result.get("buckets") if isinstance(result, dict) else None
        if got is not None and int(got) != num_buckets:
            raise KexaoneError(
                f"rollout worker {index} received {got} bucket(s) of the {num_buckets} that were sent"
            )


def _check_gathers(joined: Sequence[int], num_buckets: int) -> None:
    """Ranks > 0 joined every gather (ZeRO-3) or none (ZeRO-2: nothing is partitioned)."""
    for rank, count in enumerate(joined, start=1):
        if int(count) not in (0, num_buckets):
            raise KexaoneError(
                f"learner rank {rank} joined {count} state-dict gather(s) but rank 0 sent {num_buckets} "
                "bucket(s): the ranks disagree on the bucket plan"
            )


def sync_from_learners(
    learners: Sequence[Any],
    sync: WeightSync | Sequence[Any],
    version: int,
    bucket_bytes: int,
    transport: Literal["object_store", "collective"] | None = None,
) -> SyncMetrics:
    """Push the learners' weights to the rollout workers as ``version``.

    ``sync`` is a :class:`WeightSync` (kept between pushes: it holds the last version and, for the
    collective transport, the side group) or the worker handles themselves for a one-off push over
    ``transport`` (default ``object_store``). Learner rank 0 is the only rank that sends data.
    """
    if not isinstance(sync, WeightSync):
        sync = WeightSync(list(sync), transport=transport or "object_store")
    elif transport is not None and transport != sync.transport:
        raise KexaoneError(f"sync_from_learners: transport {transport!r} but the WeightSync uses "
                           f"{sync.transport!r}")  # fmt: skip
    return sync.push_from_learners(learners, version, bucket_bytes)


class CheckpointWeightSource:
    """A learner stand-in (one rank) that serves a saved checkpoint's weights the way learners do.

    Useful to (re)load rollout workers from a checkpoint and in tests: ``state_dict_stream`` yields
    full tensors in buckets like the learner's, the ``weight_sync_endpoint`` / ``join_weight_sync_group``
    / ``broadcast_weights`` trio is the learner's side of the collective transport, and :meth:`push_to`
    drives a ``gloo``/``nccl`` push with this process as the sender.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu") -> None:
        from kexaone_align.models.loading import load_policy

        self.device = device
        self.model = load_policy(model_path, dtype=dtype, device=device).eval()
        self._syncs: dict[str, WeightSync] = {}
        self._sender = BroadcastSender()

    def state_dict_stream(self, bucket_bytes: int) -> Iterator[Bucket]:
        yield from bucketize(self.model.state_dict().items(), bucket_bytes)

    def join_state_dict_gathers(self, bucket_bytes: int, start: int = 0) -> int:
        """Nothing is sharded here: there is no gather to join."""
        return 0

    def weight_sync_endpoint(self) -> dict[str, Any]:
        return sync_endpoint("nccl" if torch.device(self.device).type == "cuda" else "gloo")

    def join_weight_sync_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        self._sender.join(host, port, world_size, backend, self.device)

    def broadcast_weights(self, version: int, bucket_bytes: int, keep: bool = False) -> dict[str, Any]:
        return self._sender.send(version, self.state_dict_stream(bucket_bytes), keep=keep)

    def push_to(
        self, workers: Sequence[Any], version: int, bucket_bytes: int, transport: Transport
    ) -> SyncMetrics:
        """Push this process's weights to ``workers``; the side group is kept for later pushes."""
        if transport not in self._syncs:
            self._syncs[transport] = WeightSync(workers, transport=transport, device=self.device)
        return self._syncs[transport].push(version, self.state_dict_stream(bucket_bytes))

    @torch.no_grad()
    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(token_ids, device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits.float().cpu()
