"""Streaming Hugging Face export: safetensors shards written while the state-dict buckets arrive.

``save_pretrained(state_dict=...)`` needs the whole state dict in memory on one rank; for the 236B
policy that is ~470 GB in bf16. Here the exporter plans the shards from names, shapes and dtypes alone
(no data), then takes the learner's gathered buckets one at a time, turns each tensor into its on-disk
form and writes a shard the moment its last tensor has arrived. What it holds at any time is at most
one shard being filled (bounded by ``max_shard_bytes``, or one tensor when a single tensor is larger)
plus the bucket in hand.

The files are what ``save_pretrained`` writes: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
shards with ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": ...}``),
in the checkpoint's *original* layout. transformers fuses some weights when it loads (ExaoneMoe's
per-expert ``experts.{i}.gate_proj``/``up_proj`` become one ``experts.gate_up_proj``); the export
reverses that per tensor with transformers' own ``revert_weight_conversion``, so vLLM and
``from_pretrained`` both read it. Tied weights (``lm_head`` sharing the embedding) are written once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kexaone_align.errors import KexaoneError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's default "5GB"
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _tied_targets(policy: nn.Module) -> set[str]:
    """Names transformers re-ties on load (e.g. ``lm_head.weight``): never the copy to keep."""
    keys = getattr(policy, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, dict | list | tuple | set) else set()


def to_checkpoint_tensors(policy: nn.Module, name: str, tensor: Tensor) -> dict[str, Tensor]:
    """The on-disk tensors one model tensor becomes (transformers' reverse weight conversion).

    Outputs are contiguous and own their memory: a fused tensor's split views would otherwise share one
    storage, which safetensors refuses and which would keep the fused tensor alive.
    """
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(policy, {name: tensor})
    if tensor.device.type == "meta":
        return dict(out)
    return {k: v if v is tensor else v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


@dataclass
class ExportPlan:
    """Which model tensors are written, what they become on disk, and which shard each lands in."""

    keep: list[str]  # model state-dict names to stream through the converter (aliases dropped)
    outputs: dict[str, list[str]]  # model name -> on-disk names, in write order
    shards: list[list[str]]  # on-disk names per shard, in write order
    sizes: dict[str, int]  # on-disk name -> bytes
    files: list[str] = field(default_factory=list)

    @property
    def total_size(self) -> int:
        return sum(self.sizes.values())


def plan_export(
    policy: nn.Module, entries: list[tuple[str, Tensor]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> ExportPlan:
    """Plan the export from ``entries`` (state-dict names and possibly ZeRO-3-partitioned tensors).

    Runs the reverse weight conversion on meta tensors of the full shapes, so nothing is gathered. Raises
    ``KexaoneError`` if the model's conversion merges several model tensors into one file tensor (then
    it cannot be done tensor by tensor).
    """
    if max_shard_bytes < 1:
        raise KexaoneError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    tied = _tied_targets(policy)
    ignored = set(getattr(policy, "_keys_to_ignore_on_save", None) or ())
    by_identity: dict[int, list[str]] = {}
    for name, tensor in entries:
        by_identity.setdefault(id(tensor), []).append(name)
    dropped: set[str] = set(ignored)
    for names in by_identity.values():
        if len(names) > 1:  # one parameter under several names: write it once, under a kept name
            keeper = next((n for n in names if n not in tied), names[0])
            dropped.update(n for n in names if n != keeper)
    keep = [name for name, _ in entries if name not in dropped]
    metas = {
        name: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")
        for name, t in entries
        if name in keep
    }
    outputs: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name in keep:
        converted = to_checkpoint_tensors(policy, name, metas[name])
        outputs[name] = list(converted)
        for out_name, out in converted.items():
            if out_name in sizes:
                raise KexaoneError(f"streaming export: two model tensors both become {out_name!r} on disk")
            sizes[out_name] = _nbytes(out)
    from transformers.core_model_loading import revert_weight_conversion

    whole = revert_weight_conversion(policy, metas)
    if set(whole) != set(sizes):
        merged = sorted(set(whole) ^ set(sizes))[:5]
        raise KexaoneError(
            "streaming export: this model's weight conversion combines several tensors into one file "
            f"tensor, so it cannot be written tensor by tensor (e.g. {merged})"
        )
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in keep:
        for out_name in outputs[name]:
            size = sizes[out_name]
            if current and used + size > max_shard_bytes:
                shards.append(current)
                current, used = [], 0
            current.append(out_name)
            used += size
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        files = [SAFE_WEIGHTS_NAME]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return ExportPlan(keep=keep, outputs=outputs, shards=shards, sizes=sizes, files=files)


class ShardWriter:
    """Takes on-disk tensors in plan order and writes each shard as soon as it is complete.

    ``held_bytes`` is what it holds now, ``peak_held_bytes`` the most it ever held (for the memory bound).
    """

    def __init__(self, directory: str | Path, plan: ExportPlan) -> None:
        self.directory = Path(directory)
        self.plan = plan
        self._shard_of = {n: i for i, names in enumerate(plan.shards) for n in names}
        self._pending: dict[int, dict[str, Tensor]] = {}
        self._written: set[int] = set()
        self.held_bytes = 0
        self.peak_held_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.iterdir():  # a previous export's shards must not mix with these
            if old.is_file() and _WEIGHT_FILE.match(old.name):
                old.unlink()

    def add(self, name: str, tensor: Tensor) -> None:
        """Hold ``tensor`` until its shard is complete, then write that shard and let go of it."""
        if name not in self._shard_of:
            raise KexaoneError(f"streaming export: unexpected tensor {name!r} (not in the export plan)")
        index = self._shard_of[name]
        pending = self._pending.setdefault(index, {})
        if index in self._written or name in pending:
            raise KexaoneError(f"streaming export: tensor {name!r} arrived twice")
        if _nbytes(tensor) != self.plan.sizes[name]:
            expected = self.plan.sizes[name]
            raise KexaoneError(
                f"streaming export: {name!r} has {_nbytes(tensor)} bytes, the plan said {expected}"
            )
        pending[name] = tensor
        self.held_bytes += _nbytes(tensor)
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if len(pending) == len(self.plan.shards[index]):
            self._write(index)

    def _write(self, index: int) -> None:
        from safetensors.torch import save_file

        tensors = self._pending.pop(index)
        ordered = {n: tensors[n] for n in self.plan.shards[index]}
        save_file(ordered, str(self.directory / self.plan.files[index]), metadata={"format": "pt"})
        self.held_bytes -= sum(_nbytes(t) for t in ordered.values())
        self._written.add(index)

    def finish(self) -> dict[str, Any]:
        """Check every shard was written; write the index (when sharded). Returns the index dict."""
        missing = [self.plan.files[i] for i in range(len(self.plan.shards)) if i not in self._written]
        if missing:
            raise KexaoneError(f"streaming export: shards never completed: {missing}")
        index = {
            "metadata": {"total_size": self.plan.total_size},
            "weight_map": {n: self.plan.files[i] for i, names in enumerate(self.plan.shards) for n in names},
        }
        if len(self.plan.files) > 1:
            (self.directory / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return index


def write_model_files(policy: nn.Module, directory: str | Path, dtype: torch.dtype) -> None:
    """``config.json`` (with ``architectures`` and ``dtype``, as ``save_pretrained`` sets them) and
    ``generation_config.json``."""
    config = policy.config
    config.architectures = [type(policy).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    can_generate = getattr(policy, "can_generate", None)
    if callable(can_generate) and can_generate() and getattr(policy, "generation_config", None) is not None:
        policy.generation_config.save_pretrained(directory)


def stream_export(
    policy: nn.Module,
    plan: ExportPlan,
    buckets: Iterable[list[tuple[str, Tensor]]],
    directory: str | Path,
) -> ShardWriter:
    """Write the planned shards from an iterable of ``(name, full tensor)`` buckets (rank 0's side)."""
    writer = ShardWriter(directory, plan)
    wanted = set(plan.keep)
    for bucket in buckets:
        while bucket:
            name, tensor = bucket.pop(0)  # drop our reference as soon as it is converted
            if name in wanted:
                for out_name, out in to_checkpoint_tensors(policy, name, tensor).items():
                    writer.add(out_name, out)
            del tensor
    writer.finish()
    return writer
