"""A saved checkpoint as a weight source for ``RolloutPool.push_weights``, in place of the learners.

GROUPER samples its groups from pi_init, the stage's starting checkpoint. A held-out evaluation loads
the current policy into the rollout workers, and the learners cannot give pi_init back, so before more
groups are sampled the checkpoint is read again by a short-lived Ray actor that streams it in buckets
exactly as a learner does (``push_weights`` reads ``.actors`` and calls ``state_dict_stream`` on each).
The workers receive the same tensors, converted to their dtype the same way, that they loaded at start.

The actor holds one full copy of the model in host memory while it lives (at 236B in bf16, about
470 GB), so it is started for one push and killed after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CheckpointStreamer:
    """Ray actor body: ``state_dict_stream`` of a checkpoint, with the learner actor's signature."""

    def __init__(self, model_path: str, dtype: str) -> None:
        from kexaone_align.runtime.weight_sync import CheckpointWeightSource

        self.source = CheckpointWeightSource(model_path, dtype=dtype)

    def state_dict_stream(self, bucket_bytes: int) -> Iterator[Any]:
        yield from self.source.state_dict_stream(bucket_bytes)

    # the collective transport: this process is the sender, as learner rank 0 is
    def weight_sync_endpoint(self) -> dict[str, Any]:
        from kexaone_align.runtime.weight_wire import sync_endpoint

        return sync_endpoint("gloo")

    def join_weight_sync_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        from kexaone_align.runtime.weight_wire import BroadcastSender

        if getattr(self, "_sender", None) is None:
            self._sender = BroadcastSender()
        self._sender.join(host, port, world_size, backend, "cpu")

    def broadcast_weights(self, version: int, bucket_bytes: int, keep: bool = False) -> dict[str, Any]:
        return self._sender.send(version, self.source.state_dict_stream(bucket_bytes), keep=keep)


@dataclass
class CheckpointWeights:
    """What ``push_weights`` needs of a learner group: ``actors`` that stream weights."""

    actors: list[Any] = field(default_factory=list)


@contextlib.contextmanager
def checkpoint_weights(model_path: str | Path, dtype: str) -> Iterator[CheckpointWeights]:
    """A one-actor weight source serving ``model_path`` in ``dtype``; the actor is killed on exit.

    It asks Ray for no CPU, so it never waits behind the stage's own actors for a slot.
    """
    import ray

    actor = ray.remote(num_cpus=0)(CheckpointStreamer).remote(str(model_path), dtype)
    try:
        yield CheckpointWeights([actor])
    finally:
        ray.kill(actor)
