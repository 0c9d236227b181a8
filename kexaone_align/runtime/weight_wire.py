"""The wire format of a weight push: buckets of named tensors, and the collective protocol over a side
process group (learner rank 0 and every rollout worker) that carries them.

Each message starts with an int64 header ``[kind, version, payload bytes]``; a bucket is its JSON
metadata (name, dtype, shape, byte offset and length of each tensor) and then one flat, 16-byte-aligned
byte buffer; a push ends with an end marker, or an abort marker that names why (the receivers then drop
what they staged). A receiver that refuses a version drains the push so the sender never blocks.
Orchestration (who sends, to whom, which version) is :mod:`kexaone_align.runtime.weight_sync`.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

Bucket = list[tuple[str, torch.Tensor]]
# (name, dtype name, shape, byte offset, byte length) for each tensor of a broadcast bucket
TensorMeta = tuple[str, str, tuple[int, ...], int, int]
_ALIGN = 16
# Header of every message of the collective protocol: int64 [kind, version, payload bytes].
_BUCKET, _END, _ABORT = 0, 1, 2


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
    """A TCP port on this host that was free a moment ago (a rendezvous or side-group store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def open_sync_group(
    host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 300.0
) -> Any:
    """Join the weight-sync side group; independent of any default ``torch.distributed`` group."""
    import torch.distributed as dist

    if backend not in ("gloo", "nccl"):
        raise KexaoneError(f"unknown collective backend {backend!r}; expected 'gloo' or 'nccl'")
    if backend == "nccl" and not torch.cuda.is_available():
        raise KexaoneError(
            "the nccl weight-sync group needs CUDA in every member; use 'gloo' (or the object_store "
            "transport) on CPU"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    return dist.ProcessGroupNCCL(store, rank, world_size)


def broadcast_(group: Any, tensor: torch.Tensor, root: int = 0) -> None:
    """In-place broadcast over a side group from ``root``."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()


def receive_bucket(group: Any, metas: Sequence[TensorMeta], device: torch.device | str) -> Bucket:
    """Receive one flat bucket buffer whose metadata is known: allocate, receive, return named views."""
    flat = torch.empty(buffer_size(metas), dtype=torch.uint8, device=device)
    broadcast_(group, flat, root=0)
    return unflatten_bucket(flat, metas)


# -- the collective wire protocol ---------------------------------------------------------------------
# Per bucket: header [_BUCKET, version, n] ; n bytes of JSON metadata ; the flat buffer. Then a header
# [_END, version, 0]. A sender that fails sends [_ABORT, version, n] and n bytes of UTF-8 reason.
# JSON, not pickle: a receiver never runs code that came over the wire.
def _send_header(group: Any, kind: int, version: int, nbytes: int, device: torch.device) -> None:
    broadcast_(group, torch.tensor([kind, version, nbytes], dtype=torch.int64, device=device))


def _send_bytes(group: Any, payload: bytes, device: torch.device) -> None:
    if payload:
        broadcast_(group, torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device))


def _recv_header(group: Any, device: torch.device) -> tuple[int, int, int]:
    header = torch.empty(3, dtype=torch.int64, device=device)
    broadcast_(group, header)
    kind, version, nbytes = (int(x) for x in header.tolist())
    return kind, version, nbytes


def _recv_bytes(group: Any, nbytes: int, device: torch.device) -> bytes:
    if nbytes == 0:
        return b""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    broadcast_(group, buf)
    return bytes(buf.cpu().numpy())


def _encode_metas(metas: Sequence[TensorMeta]) -> bytes:
    return json.dumps([list(m) for m in metas]).encode()


def _decode_metas(payload: bytes) -> list[TensorMeta]:
    return [(str(n), str(d), tuple(int(s) for s in shape), int(o), int(b))
            for n, d, shape, o, b in json.loads(payload)]  # fmt: skip


def broadcast_buckets(
    group: Any, buckets: Iterable[Bucket], device: torch.device | str, *, version: int = 0
) -> tuple[int, int, int]:
    """Sender (rank 0) half of a collective push: every bucket, then the end marker.

    Returns ``(bytes, tensors, buckets)``. ``buckets`` is always read to its end, even after a send
    failed, because on a learner each item is a ZeRO-3 gather that the other learner ranks join: stopping
    early would leave them waiting. When the push cannot complete the receivers get an abort message
    (best effort: a broken group may not deliver it) and the first error is raised.
    """
    device = torch.device(device)
    nbytes = ntensors = nbuckets = 0
    error: BaseException | None = None
    items = iter(buckets)
    while True:
        try:
            bucket = next(items)
        except StopIteration:
            break
        except BaseException as exc:  # the producer failed: nothing left to read
            _abort(group, version, exc if error is None else error, device)
            if error is not None:
                raise error from exc
            raise
        nbuckets += 1
        nbytes += bucket_nbytes(bucket)
        ntensors += len(bucket)
        if error is not None:
            continue  # keep walking the producer so its collective gathers complete
        try:
            flat, metas = flatten_bucket(bucket, device=device)
            payload = _encode_metas(metas)
            _send_header(group, _BUCKET, version, len(payload), device)
            _send_bytes(group, payload, device)
            broadcast_(group, flat)
            del flat
        except BaseException as exc:
            error = exc
    if error is not None:
        _abort(group, version, error, device)
        raise error
    _send_header(group, _END, version, 0, device)
    return nbytes, ntensors, nbuckets


def _abort(group: Any, version: int, cause: BaseException, device: torch.device) -> None:
    reason = f"{type(cause).__name__}: {cause}".encode()[:4096]
    try:
        _send_header(group, _ABORT, version, len(reason), device)
        _send_bytes(group, reason, device)
    except Exception:  # the group itself is broken: receivers will time out instead
        logger.warning("weight sync: could not tell the receivers that push %d was aborted", version)


def receive_buckets(
    group: Any, device: torch.device | str, *, version: int | None = None
) -> Iterator[Bucket]:
    """Receiver half of a collective push: yields each bucket (views into a fresh flat buffer) until the
    end marker; raises ``KexaoneError`` if the sender aborted or sent another ``version`` than expected.

    Closing the iterator early (``close()``, or an exception thrown into it) receives and discards the
    rest of the push, so the sender and the other receivers never block. An exception raised in the
    consumer's loop body does not close a generator by itself: use :func:`receive_into`, which loads
    every bucket and still drains after a failed load.
    """
    device = torch.device(device)
    while True:
        kind, sent, nbytes = _recv_header(group, device)
        if kind == _END:
            if version is not None and sent != version:
                raise KexaoneError(f"weight sync: the sender pushed version {sent}, expected {version}")
            return
        if kind == _ABORT:
            reason = _recv_bytes(group, nbytes, device).decode(errors="replace")
            raise KexaoneError(f"weight sync: the sender aborted the push of version {sent}: {reason}")
        if kind != _BUCKET:
            raise KexaoneError(f"weight sync: unknown message kind {kind} (sender and receiver disagree)")
        metas = _decode_metas(_recv_bytes(group, nbytes, device))
        bucket = receive_bucket(group, metas, device)
        if version is not None and sent != version:
            _drain(group, device)
            raise KexaoneError(f"weight sync: the sender pushed version {sent}, expected {version}")
        try:
            yield bucket
        except BaseException:  # closed or thrown into: the rest of the push must still be received
            _drain(group, device)
            raise


def _drain(group: Any, device: torch.device) -> None:
    """Receive and drop messages up to the end (or abort) marker."""
    while True:
        kind, _, nbytes = _recv_header(group, device)
        if kind != _BUCKET:
            _recv_bytes(group, nbytes, device)
            return
        metas = _decode_metas(_recv_bytes(group, nbytes, device))
        receive_bucket(group, metas, device)


def receive_into(
    group: Any, device: torch.device | str, version: int, load: Callable[[Bucket], Any]
) -> dict[str, int]:
    """Receive a whole collective push and ``load`` each bucket; returns ``{buckets, tensors, bytes}``.

    If ``load`` raises (a stale version refused by the backend, a bad tensor), the remaining buckets
    are still received and dropped, and the first error is raised after the end marker: the sender
    and the other receivers finish the push instead of waiting forever.
    """
    counts = {"buckets": 0, "tensors": 0, "bytes": 0}
    error: BaseException | None = None
    for bucket in receive_buckets(group, device, version=version):
        counts["buckets"] += 1
        counts["tensors"] += len(bucket)
        counts["bytes"] += bucket_nbytes(bucket)
        if error is None:
            try:
                load(bucket)
            except Exception as exc:
                error = exc
    if error is not None:
        raise error
    return counts


class BroadcastSender:
    """The sending end of the collective transport, held by learner rank 0 (or a stand-in).

    Keeps the side group between pushes and the last version it sent over that group; a new group
    (:meth:`join`) starts a new version history, the driver's :class:`WeightSync` checks across groups.
    """

    def __init__(self) -> None:
        self.group: Any = None
        self.device = torch.device("cpu")
        self.last_version: int | None = None

    def join(self, host: str, port: int, world_size: int, backend: str, device: torch.device | str) -> None:
        """Open the side group as its rank 0 (blocks until every receiver has joined)."""
        self.group = None
        self.group = open_sync_group(host, port, 0, world_size, backend)
        self.device = torch.device(device)
        self.last_version = None

    def send(self, version: int, buckets: Iterable[Bucket], *, keep: bool = False) -> dict[str, Any]:
        """Broadcast ``buckets`` as ``version``; returns ``{bytes, tensors, buckets, kept}``.

        ``keep``: also put a compact CPU copy of each bucket into Ray's object store (owned by this
        process) and return the refs in ``kept``, so a rollout worker that is replaced later can be
        loaded at this version without asking the learners again. A refused push still reads
        ``buckets`` to its end (the other learner ranks are in the same gathers).
        """
        if self.group is None or (self.last_version is not None and version <= self.last_version):
            for _ in buckets:  # let the other learner ranks finish their gathers
                pass
            if self.group is None:
                raise KexaoneError("broadcast_weights called before join_weight_sync_group")
            problem = KexaoneError(
                f"stale weight sync: version {version} is not newer than the last broadcast version "
                f"{self.last_version}"
            )
            _abort(self.group, version, problem, self.device)
            raise problem
        kept: list[Any] = []
        source = _kept_copies(buckets, kept) if keep else buckets
        nbytes, ntensors, nbuckets = broadcast_buckets(self.group, source, self.device, version=version)
        self.last_version = version
        return {"bytes": nbytes, "tensors": ntensors, "buckets": nbuckets, "kept": kept}


def _kept_copies(buckets: Iterable[Bucket], kept: list[Any]) -> Iterator[Bucket]:
    import ray

    for bucket in buckets:
        kept.append(ray.put([(name, t.detach().to("cpu", copy=True)) for name, t in bucket]))
        yield bucket


def sync_endpoint(backend: str) -> dict[str, Any]:
    """Where the sender's side-group store will listen: this node's address, a free port, the backend."""
    try:
        import ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:  # pragma: no cover
        host = "127.0.0.1"
    return {"host": host, "port": free_port(), "backend": backend}
