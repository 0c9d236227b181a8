"""What leaves a learner as weights: the state dict in buckets, the collective push to rollout workers,
and the Hugging Face export, all streaming (under ZeRO-3 one bucket is gathered at a time).

A mixin of ``runtime.learner.Learner`` (kept apart so the learner module stays about training); it uses
the learner's ``policy``, ``rank``, ``_sender``, ``last_export`` and ``_require_engine``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kexaone_align.errors import KexaoneError


def param_numel(param: Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return int(getattr(param, "ds_numel", param.numel()))


class LearnerWeightsMixin:
    """State-dict streaming, collective weight push and HF export of a ``Learner``."""

    policy: Any
    rank: int
    _sender: Any
    last_export: dict[str, Any]

    # ------------------------------------------------------------------------------ weights out
    def _state_entries(self) -> list[tuple[str, Tensor]]:
        """HF state-dict names with their (possibly ZeRO-3-partitioned) tensors, state-dict order."""
        return list(self.policy.state_dict(keep_vars=True).items())

    def _bucket_plan(self, bucket_bytes: int) -> list[list[int]]:
        if bucket_bytes < 1:
            raise KexaoneError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        plan: list[list[int]] = []
        current: list[int] = []
        used = 0
        for index, (_, tensor) in enumerate(self._state_entries()):
            size = param_numel(tensor) * tensor.element_size()
            if current and used + size > bucket_bytes:
                plan.append(current)
                current, used = [], 0
            current.append(index)
            used += size
        if current:
            plan.append(current)
        return plan

    def state_dict_num_buckets(self, bucket_bytes: int) -> int:
        """How many buckets ``state_dict_bucket`` serves at this bucket size."""
        self._require_engine()
        return len(self._bucket_plan(bucket_bytes))

    def _gather(self, tensors: list[Tensor]) -> Any:
        """Context in which ZeRO-3-partitioned ``tensors`` are whole (every rank must enter it together)."""
        partitioned = list({id(t): t for t in tensors if hasattr(t, "ds_id")}.values())
        if not partitioned:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        return GatheredParameters(partitioned, modifier_rank=None)

    def _gathered_buckets(
        self, bucket_bytes: int, *, start: int = 0, to_cpu: bool = True
    ) -> Iterator[list[tuple[str, Tensor]]]:
        """Buckets ``start..`` of full tensors, each gathered on demand (one bucket gathered at a time).

        ``to_cpu=False`` yields views of the gathered parameters, valid only until the next item is
        asked for: the caller must copy them out first (the collective sender flattens them at once).
        """
        plan = self._bucket_plan(bucket_bytes)
        entries = self._state_entries()
        for index in range(start, len(plan)):
            chosen = [entries[i] for i in plan[index]]
            with self._gather([t for _, t in chosen]):
                if to_cpu:
                    yield [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in chosen]
                else:
                    yield [(name, tensor.detach()) for name, tensor in chosen]

    def state_dict_bucket(self, index: int, bucket_bytes: int) -> list[tuple[str, Tensor]]:
        """Bucket ``index`` of full (unsharded) CPU tensors; under ZeRO-3 all ranks must call it together.

        Only this bucket's parameters are gathered, so peak extra memory is one bucket (a tensor
        larger than ``bucket_bytes`` gets a bucket of its own).
        """
        self._require_engine()
        plan = self._bucket_plan(bucket_bytes)
        if not 0 <= index < len(plan):
            raise KexaoneError(f"state-dict bucket {index} out of range (0..{len(plan) - 1})")
        entries = self._state_entries()
        chosen = [entries[i] for i in plan[index]]
        with self._gather([t for _, t in chosen]):
            return [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in chosen]

    def state_dict_stream(self, bucket_bytes: int = 1 << 28) -> Iterator[list[tuple[str, Tensor]]]:
        """Yield the full policy state dict bucket by bucket, as CPU tensors.

        Rank 0's side of the object-store weight push (a Ray streaming generator); under ZeRO-3 the
        other ranks must run :meth:`join_state_dict_gathers` at the same time.
        """
        self._require_engine()
        yield from self._gathered_buckets(bucket_bytes)

    def join_state_dict_gathers(self, bucket_bytes: int, start: int = 0) -> int:
        """Take part in the ZeRO-3 gather of buckets ``start..`` without copying or returning anything.

        What every rank but the sending one runs during a weight push or a streamed state dict: the
        gathers are collective, but only one rank needs the data. Returns the number of gathers joined;
        0 without ZeRO-3 partitioning (ZeRO-2: rank 0 has every weight and there is no collective).
        """
        self._require_engine()
        if not any(hasattr(t, "ds_id") for _, t in self._state_entries()):
            return 0
        joined = 0
        for _ in self._gathered_buckets(bucket_bytes, start=start, to_cpu=False):
            joined += 1
        return joined

    # ------------------------------------------------------------------- collective weight push
    def weight_sync_endpoint(self) -> dict[str, Any]:
        """Where this rank would host the weight-sync side group: node address, a free port, and the
        backend its tensors need (nccl on CUDA, gloo on CPU)."""
        from kexaone_align.runtime.weight_wire import sync_endpoint

        engine = self._require_engine()
        return sync_endpoint("nccl" if torch.device(engine.device).type == "cuda" else "gloo")

    def join_weight_sync_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Open the side group to the rollout workers as its rank 0 (learner rank 0 only); kept until
        the next call, which replaces it (a rollout worker was replaced)."""
        from kexaone_align.runtime.weight_wire import BroadcastSender

        engine = self._require_engine()
        if self.rank != 0:
            raise KexaoneError(f"only learner rank 0 sends weights; rank {self.rank} cannot join as sender")
        if self._sender is None:
            self._sender = BroadcastSender()
        device = engine.device if backend == "nccl" else "cpu"
        self._sender.join(host, port, world_size, backend, device)

    def broadcast_weights(self, version: int, bucket_bytes: int, keep: bool = False) -> dict[str, Any]:
        """Learner rank 0's whole collective push in one call: gather each bucket (with the other ranks
        running :meth:`join_state_dict_gathers`), broadcast it, then the end marker.

        The gathered parameters are flattened straight into the broadcast buffer (no CPU copy on the
        nccl path). ``keep`` also puts a CPU copy of each bucket into Ray's object store for replacing a
        rollout worker later. Returns ``{bytes, tensors, buckets, kept}``.
        """
        self._require_engine()
        if self.rank != 0 or self._sender is None:
            raise KexaoneError(
                "broadcast_weights needs learner rank 0 after join_weight_sync_group "
                f"(this is rank {self.rank}, group joined: {self._sender is not None})"
            )
        return self._sender.send(version, self._gathered_buckets(bucket_bytes, to_cpu=False), keep=keep)

    def export_hf(
        self,
        directory: str | Path,
        tokenizer_path: str | Path | None = None,
        max_shard_bytes: int = 5 * 10**9,
        bucket_bytes: int = 1 << 28,
    ) -> str | None:
        """Write the policy in Hugging Face format, streaming (rank 0 writes; under ZeRO-3 all ranks call).

        Shards of at most ``max_shard_bytes`` are written as the gathered buckets arrive
        (``runtime.export``), so rank 0 never holds more than about one shard plus one bucket, instead
        of the whole state dict ``save_pretrained`` would need. ``last_export`` records what was written.
        """
        from kexaone_align.runtime import export

        self._require_engine()
        entries = self._state_entries()
        sharded = any(hasattr(t, "ds_id") for _, t in entries)
        if self.rank != 0 and not sharded:
            return None  # ZeRO-2: rank 0 has every weight, no collective to join
        # every rank plans (cheap: meta tensors), so a model that cannot be streamed fails on all ranks
        # alike instead of leaving the others waiting in a ZeRO-3 gather
        plan = export.plan_export(self.policy, entries, max_shard_bytes)
        del entries
        bucket_bytes = max(1, min(bucket_bytes, max_shard_bytes))

        def buckets() -> Iterator[list[tuple[str, Tensor]]]:
            for index in range(self.state_dict_num_buckets(bucket_bytes)):
                yield self.state_dict_bucket(index, bucket_bytes)

        if self.rank != 0:
            self.join_state_dict_gathers(bucket_bytes)  # join every gather; rank 0 writes
            return None
        directory = Path(directory)
        writer = export.stream_export(self.policy, plan, buckets(), directory)
        dtype = next((p.dtype for p in self.policy.parameters() if p.is_floating_point()), torch.float32)
        export.write_model_files(self.policy, directory, dtype)
        if tokenizer_path is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_path)).save_pretrained(directory)
        self.last_export = {
            "files": plan.files,
            "total_size": plan.total_size,
            "peak_held_bytes": writer.peak_held_bytes,
            "max_shard_bytes": max_shard_bytes,
            "bucket_bytes": bucket_bytes,
        }
        return str(directory)
