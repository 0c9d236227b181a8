"""Versioned weight pushes from the learners to every rollout worker, one bucket at a time.

The learner gathers its ZeRO-3 shards bucket by bucket (``state_dict_stream(bucket_bytes)`` yields
lists of ``(name, full_tensor)``), so no process ever holds more than a bucket or two of the full
model. Three transports move a bucket:

* ``local``: in-process backends (tests, single-process CPU runs); tensors are copied directly.
* ``object_store``: Ray's object store on CPU. Each bucket is stored once (``ray.put``, or it is
  already an ``ObjectRef`` yielded by a learner's streaming generator) and every worker fetches it.
  At most ``max_inflight_buckets`` buckets are in flight.
* ``gloo`` / ``nccl``: a side process group (its own ``TCPStore``, independent of the learners'
  default DeepSpeed group) where rank 0 is the sender and the rollout workers (or every
  tensor-parallel rank of a vLLM engine) receive a flat byte buffer per bucket by broadcast.
  ``gloo`` is tested on CPU; ``nccl`` is the same code on GPU tensors and is unverified here.

Every push is versioned: the sender refuses a version that is not newer than its last push, and each
backend refuses it again, so a stale learner can never overwrite newer rollout weights. Each push
returns :class:`SyncMetrics` (seconds, bytes, GB/s) for the metrics stream.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kexaone_align.errors import KexaoneError

Bucket = list[tuple[str, torch.Tensor]]
Transport = Literal["local", "object_store", "gloo", "nccl"]
# (name, dtype name, shape, byte offset, byte length) for each tensor of a broadcast bucket
TensorMeta = tuple[str, str, tuple[int, ...], int, int]
_ALIGN = 16


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


def bucket_nbytes(bucket: Bucket) -> int:
    """Bytes of tensor data in a bucket."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


def bucketize(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs into buckets of about ``bucket_bytes`` (a larger tensor is alone)."""
    if bucket_bytes <= 0:
        raise KexaoneError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += nbytes
    if bucket:
        yield bucket


# -- flat buffers for collective transports ---------------------------------------------------------
def flatten_bucket(
    bucket: Bucket, device: torch.device | str | None = None
) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Pack a bucket into one uint8 buffer (16-byte aligned segments) plus the metadata to unpack it."""
    metas: list[TensorMeta] = []
    offset = 0
    for name, t in bucket:
        nbytes = t.numel() * t.element_size()
        metas.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    dev = (
        torch.device(device)
        if device is not None
        else (bucket[0][1].device if bucket else torch.device("cpu"))
    )
    flat = torch.zeros(offset, dtype=torch.uint8, device=dev)
    for (_, t), (_, _, _, off, nbytes) in zip(bucket, metas, strict=True):
        if nbytes:
            flat[off : off + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, metas


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> Bucket:
    """Views into ``flat`` with the original names, dtypes and shapes (no copy)."""
    out: Bucket = []
    for name, dtype, shape, off, nbytes in metas:
        out.append((name, flat[off : off + nbytes].view(getattr(torch, dtype)).view(shape)))
    return out


def buffer_size(metas: Sequence[TensorMeta]) -> int:
    """Length of the flat buffer a bucket with these metadata needs."""
    if not metas:
        return 0
    _, _, _, off, nbytes = metas[-1]
    return off + -(-nbytes // _ALIGN) * _ALIGN


def free_port() -> int:
    """An unused TCP port on this host for the side group's store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def open_sync_group(
    host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0
) -> Any:
    """Join the weight-sync side group; independent of any default ``torch.distributed`` group."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise KexaoneError(
                "the nccl weight-sync transport needs CUDA; use 'object_store' or 'gloo' on CPU"
            )
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise KexaoneError(f"unknown collective backend {backend!r}; expected 'gloo' or 'nccl'")


def broadcast_(group: Any, tensor: torch.Tensor, root: int = 0) -> None:
    """In-place broadcast over a side group from ``root``."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()


def receive_bucket(group: Any, metas: Sequence[TensorMeta], device: torch.device | str) -> Bucket:
    """Receiver side of one bucket broadcast: allocate, receive, and return named views."""
    flat = torch.empty(buffer_size(metas), dtype=torch.uint8, device=device)
    broadcast_(group, flat, root=0)
    return unflatten_bucket(flat, metas)


# -- the pusher ---------------------------------------------------------------------------------------
class WeightSync:
    """Pushes versioned weights to rollout targets over one transport.

    ``targets`` are in-process backends (``local``) or ``RolloutWorker`` Ray actor handles (other
    transports). For ``gloo``/``nccl`` the process that calls :meth:`push` is rank 0 of the side
    group, so on a cluster it should be the learner rank that gathers the full tensors.
    """

    def __init__(
        self,
        targets: Sequence[Any],
        *,
        transport: Transport = "object_store",
        max_inflight_buckets: int = 2,
        host: str | None = None,
        device: str | None = None,
    ) -> None:
        if not targets:
            raise KexaoneError("weight sync needs at least one rollout target")
        if transport not in ("local", "object_store", "gloo", "nccl"):
            raise KexaoneError(f"unknown weight-sync transport {transport!r}")
        self.targets = list(targets)
        self.transport = transport
        self.max_inflight_buckets = max(1, max_inflight_buckets)
        self.last_version: int | None = None
        self._group: Any = None
        self._host = host
        self._device = device or ("cuda" if transport == "nccl" else "cpu")

    def push(self, version: int, buckets: Iterable[Any]) -> SyncMetrics:
        """Send every bucket to every target, then publish ``version`` on all of them."""
        if self.last_version is not None and version <= self.last_version:
            raise KexaoneError(
                f"stale weight sync: version {version} is not newer than the last pushed version "
                f"{self.last_version}"
            )
        start = time.perf_counter()
        if self.transport == "local":
            nbytes, ntensors, nbuckets = self._push_local(version, buckets)
        elif self.transport == "object_store":
            nbytes, ntensors, nbuckets = self._push_object_store(version, buckets)
        else:
            nbytes, ntensors, nbuckets = self._push_collective(version, buckets)
        self.last_version = version
        return SyncMetrics(
            version=version,
            transport=self.transport,
            seconds=time.perf_counter() - start,
            num_bytes=nbytes,
            num_tensors=ntensors,
            num_buckets=nbuckets,
            num_workers=len(self.targets),
        )

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

    def _push_object_store(self, version: int, buckets: Iterable[Any]) -> tuple[int, int, int]:
        import ray

        nbytes = ntensors = nbuckets = 0
        inflight: deque[list[Any]] = deque()

        def settle(acks: list[Any]) -> None:
            nonlocal nbytes, ntensors
            results = ray.get(acks)
            nbytes += int(results[0]["bytes"])
            ntensors += int(results[0]["tensors"])

        for bucket in buckets:
            ref = bucket if isinstance(bucket, ray.ObjectRef) else ray.put(bucket)
            inflight.append([w.update_weights.remote(version, ref) for w in self.targets])
            nbuckets += 1
            del ref
            while len(inflight) >= self.max_inflight_buckets:
                settle(inflight.popleft())
        while inflight:
            settle(inflight.popleft())
        ray.get([w.finish_update.remote(version) for w in self.targets])
        return nbytes, ntensors, nbuckets

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        import ray

        host = self._host or ray.util.get_node_ip_address()
        port = free_port()
        ranks = ray.get([w.sync_ranks.remote() for w in self.targets])
        world_size = 1 + sum(ranks)
        joins, offset = [], 1
        for worker, n in zip(self.targets, ranks, strict=True):
            joins.append(worker.join_weight_sync_group.remote(host, port, offset, world_size, self.transport))
            offset += n
        self._group = open_sync_group(host, port, 0, world_size, self.transport)
        ray.get(joins)

    def _push_collective(self, version: int, buckets: Iterable[Any]) -> tuple[int, int, int]:
        import ray

        self._ensure_group()
        nbytes = ntensors = nbuckets = 0
        for bucket in buckets:
            if isinstance(bucket, ray.ObjectRef):
                bucket = ray.get(bucket)
            flat, metas = flatten_bucket(bucket, device=self._device)
            acks = [w.receive_bucket.remote(version, metas) for w in self.targets]
            broadcast_(self._group, flat, root=0)
            ray.get(acks)
            nbytes += bucket_nbytes(bucket)
            ntensors += len(bucket)
            nbuckets += 1
            del flat, bucket
        ray.get([w.finish_update.remote(version) for w in self.targets])
        return nbytes, ntensors, nbuckets


class CheckpointWeightSource:
    """A learner stand-in that streams a saved checkpoint's weights the way learners do.

    Useful to (re)load rollout workers from a checkpoint (resume, GROUPER's initial policy) and in
    tests: ``state_dict_stream`` yields full tensors in buckets like the learner actor's, and
    :meth:`push_to` shows how a learner drives a collective (gloo/nccl) push from its own process.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu") -> None:
        from kexaone_align.models.loading import load_policy

        self.device = device
        self.model = load_policy(model_path, dtype=dtype, device=device).eval()
        self._syncs: dict[str, WeightSync] = {}

    def state_dict_stream(self, bucket_bytes: int) -> Iterator[Bucket]:
        yield from bucketize(self.model.state_dict().items(), bucket_bytes)

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


def sync_from_learners(
    learners: Sequence[Any], sync: WeightSync, version: int, bucket_bytes: int
) -> SyncMetrics:
    """Drive ``state_dict_stream`` on every learner rank (the ZeRO-3 gather is collective) and push
    the buckets that rank 0 yields; other ranks are expected to yield nothing."""
    if not learners:
        raise KexaoneError("sync_from_learners needs at least one learner")
    # Backpressure: a learner may run at most two buckets ahead of the workers consuming them.
    streams = [
        learner.state_dict_stream.options(_generator_backpressure_num_objects=2).remote(bucket_bytes)
        for learner in learners
    ]
    metrics = sync.push(version, iter(streams[0]))
    import ray

    for stream in streams[1:]:
        for ref in stream:
            ray.get(ref)
    return metrics
