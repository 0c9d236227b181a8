"""Token-budget micro-batching and padding helpers for the learner.

A batch is a dict of ``[N, T]`` tensors (``input_ids``, ``attention_mask``, ``loss_mask``, plus any
per-token or per-sequence extras a loss needs). Sequences are *right*-padded or left-padded; a
micro-batch is trimmed to the columns that hold a real token in at least one of its rows, so its
padded size is ``rows * width``. The budget bounds that padded size, which is what costs compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kexaone_align.errors import KexaoneError

REQUIRED_KEYS = ("input_ids", "attention_mask", "loss_mask")


def split_by_token_budget(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group consecutive sequences so each group's ``len(group) * max(length)`` stays within ``budget``.

    Order-stable (indices come out in input order); a sequence longer than ``budget`` gets a
    micro-batch of its own rather than being cut.
    """
    if budget < 1:
        raise KexaoneError(f"micro-batch token budget must be >= 1, got {budget}")
    groups: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for index, length in enumerate(lengths):
        if length < 0:
            raise KexaoneError(f"sequence {index} has negative length {length}")
        new_max = max(current_max, length)
        if current and (len(current) + 1) * new_max > budget:
            groups.append(current)
            current, new_max = [], length
        current.append(index)
        current_max = new_max
    if current:
        groups.append(current)
    return groups


def pad_sequences(
    seqs: Sequence[Sequence[int] | Tensor], pad_value: int | float = 0, *, left: bool = False
) -> Tensor:
    """Stack variable-length 1-D sequences into ``[N, max_len]``, padding on the right (or left)."""
    tensors = [torch.as_tensor(s) for s in seqs]
    if not tensors:
        raise KexaoneError("pad_sequences needs at least one sequence")
    width = max(t.numel() for t in tensors)
    out = torch.full((len(tensors), width), pad_value, dtype=tensors[0].dtype)
    for row, t in enumerate(tensors):
        if left:
            out[row, width - t.numel() :] = t
        else:
            out[row, : t.numel()] = t
    return out


def collate(
    input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], *, pad_token_id: int = 0
) -> dict[str, Tensor]:
    """Right-padded training batch from token lists and their per-token loss masks."""
    if len(input_ids) != len(loss_masks):
        raise KexaoneError(f"{len(input_ids)} sequences but {len(loss_masks)} loss masks")
    for i, (ids, mask) in enumerate(zip(input_ids, loss_masks, strict=True)):
        if len(ids) != len(mask):
            raise KexaoneError(f"sequence {i}: {len(ids)} tokens but a loss mask of {len(mask)}")
    return {
        "input_ids": pad_sequences(input_ids, pad_token_id).long(),
        "attention_mask": pad_sequences([[1] * len(s) for s in input_ids], 0).long(),
        "loss_mask": pad_sequences(loss_masks, 0).long(),
    }


def validate_batch(batch: dict[str, Tensor]) -> int:
    """Check the keys and shapes the learner relies on; return the number of rows."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KexaoneError(f"training batch lacks {', '.join(missing)} (needs {', '.join(REQUIRED_KEYS)})")
    shape = tuple(batch["input_ids"].shape)
    if len(shape) != 2:
        raise KexaoneError(f"input_ids must be [N, T], got shape {shape}")
    for key in REQUIRED_KEYS[1:]:
        if tuple(batch[key].shape) != shape:
            raise KexaoneError(f"{key} has shape {tuple(batch[key].shape)} but input_ids has {shape}")
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] != shape[0]:
            raise KexaoneError(f"batch[{key!r}] has {value.shape[0]} rows but input_ids has {shape[0]}")
    return shape[0]


@dataclass(frozen=True)
class MicroBatch:
    """Rows of a batch and the column span ``[start, stop)`` that holds their real tokens."""

    rows: tuple[int, ...]
    start: int
    stop: int


def plan_micro_batches(attention_mask: Tensor, budget: int) -> list[MicroBatch]:
    """Token-budget micro-batches of a padded batch, each trimmed to the columns its rows use."""
    lengths = attention_mask.sum(dim=1).tolist()
    plan = []
    for group in split_by_token_budget(lengths, budget):
        used = attention_mask[group].bool().any(dim=0).nonzero().flatten()
        start, stop = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, attention_mask.shape[1])
        plan.append(MicroBatch(tuple(group), start, stop))
    return plan


def take(batch: dict[str, Tensor], micro: MicroBatch) -> dict[str, Tensor]:
    """The micro-batch's rows; per-token tensors (``[N, T, ...]``) are cut to its column span."""
    width = batch["input_ids"].shape[1]
    index = torch.as_tensor(micro.rows, dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 1:
            value = value[index]
            if value.dim() >= 2 and value.shape[1] == width:
                value = value[:, micro.start : micro.stop]
        out[key] = value
    return out


def micro_batches(batch: dict[str, Tensor], budget: int) -> list[dict[str, Tensor]]:
    """Split a batch into trimmed micro-batches of at most ``budget`` padded tokens each."""
    return [take(batch, m) for m in plan_micro_batches(batch["attention_mask"], budget)]


def select_rows(batch: dict[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
    """The sub-batch of ``rows`` (all columns kept)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return {k: (v[index] if isinstance(v, Tensor) and v.dim() >= 1 else v) for k, v in batch.items()}


def shard_rows(num_rows: int, num_shards: int) -> list[list[int]]:
    """Contiguous, near-equal row ranges, one per data-parallel rank (some may be empty)."""
    if num_shards < 1:
        raise KexaoneError(f"number of shards must be >= 1, got {num_shards}")
    base, extra = divmod(num_rows, num_shards)
    out, start = [], 0
    for rank in range(num_shards):
        size = base + (1 if rank < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def balanced_shard_rows(lengths: Sequence[int], num_shards: int) -> list[list[int]]:
    """Rows to ranks by tokens: longest first, each to the least-loaded rank (ties: lowest rank).

    Every rank then holds about ``sum(lengths) / num_shards`` tokens, where contiguous slices of a
    long-tailed batch can leave one rank with most of them. Deterministic; each rank's rows come out
    in input order.
    """
    if num_shards < 1:
        raise KexaoneError(f"number of shards must be >= 1, got {num_shards}")
    loads = [0] * num_shards
    out: list[list[int]] = [[] for _ in range(num_shards)]
    for index in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        rank = min(range(num_shards), key=lambda r: (loads[r], len(out[r]), r))
        out[rank].append(index)
        loads[rank] += int(lengths[index])
    return [sorted(rows) for rows in out]


def shard_plan(batch: dict[str, Tensor], num_shards: int, *, balance: bool = False) -> list[list[int]]:
    """Each data-parallel rank's rows: token-balanced (``balance``) or contiguous slices."""
    num_rows = validate_batch(batch)
    if balance:
        return balanced_shard_rows(batch["attention_mask"].sum(dim=1).tolist(), num_shards)
    return shard_rows(num_rows, num_shards)


def trim_columns(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch cut to the columns that hold a real token in some row (what a rank ships and pads)."""
    mask = batch["attention_mask"]
    if mask.numel() == 0:
        return batch
    used = mask.bool().any(dim=0).nonzero().flatten()
    if used.numel() == 0:
        return batch
    return take(batch, MicroBatch(tuple(range(mask.shape[0])), int(used[0]), int(used[-1]) + 1))


def shard_batch(
    batch: dict[str, Tensor], num_shards: int, *, balance: bool = False
) -> list[dict[str, Tensor]]:
    """Split a batch's rows across ``num_shards`` data-parallel learners (see ``shard_plan``)."""
    return [trim_columns(select_rows(batch, rows)) for rows in shard_plan(batch, num_shards, balance=balance)]
