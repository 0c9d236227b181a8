"""Packed learner micro-batches: no padding token is computed, and every loss sees its usual rows.

A learner batch arrives as one sequence per row, padded (``stages.rl.training_batch``, ``collate``).
With packing, each micro-batch concatenates several sequences into rows of the width of its longest
sequence (``len(rows) * width`` within the token budget), so the forward computes real tokens only,
plus the short tail of each packed row. The packed rows carry ``sequence_ids``, the convention of
``data.packing``: the learner then restarts positions at every sequence and keeps attention inside it
(``data.packing.packed_forward_kwargs``), and the loss mask is 0 on every sequence's first token, so no
prediction crosses a boundary.

The loss never sees the packed layout. ``Micro.unpack`` gathers the packed log-probs back into the
micro-batch's padded ``[sequences, width]`` view (a differentiable index), and the loss function gets
that view, as without packing. Per-response means (AGAPO's ``1/|o_i|``, GROUPER's mean log-prob), the
per-sequence advantages and the learner's global loss weights are therefore exactly what they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kexaone_align.data.packing import PAD_SEQUENCE_ID
from kexaone_align.runtime.batching import MicroBatch, plan_micro_batches, take


@dataclass
class Micro:
    """One micro-batch: what the model runs on (``forward``) and what the loss sees (``view``).

    Without packing the two are the same padded rows. With packing, ``forward`` holds packed rows and
    ``flat_index``/``valid`` (``[sequences, view width]``) say where each view token sits in the
    flattened packed rows.
    """

    view: dict[str, Tensor]
    forward: dict[str, Tensor]
    plan: MicroBatch
    flat_index: Tensor | None = None
    valid: Tensor | None = None

    def unpack(self, logprobs: Tensor) -> Tensor:
        """Per-token values of the forward rows (``[rows, width]``) laid out as the view (0 elsewhere)."""
        if self.flat_index is None or self.valid is None:
            return logprobs
        gathered = logprobs.reshape(-1)[self.flat_index]
        return torch.where(self.valid, gathered, torch.zeros_like(gathered))

    @property
    def computed_tokens(self) -> int:
        """Token positions the forward runs on, padding included."""
        return int(self.forward["input_ids"].numel())


def plan_packed(lengths: Sequence[int], budget: int) -> list[list[list[int]]]:
    """Sequences (by index) into micro-batches of packed rows: ``micro -> row -> sequence indices``.

    Longest first: a micro-batch takes the longest sequence left, whose length is its row width, and
    then up to ``budget // width`` rows (at least one) filled first-fit with the next longest sequences
    that still fit. Every micro-batch but the last is then close to the budget, and a sequence longer
    than the budget gets a micro-batch of its own (as without packing). Deterministic: ties keep
    input order.
    """
    remaining = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    micros: list[list[list[int]]] = []
    while remaining:
        width = max(1, int(lengths[remaining[0]]))
        max_rows = max(1, budget // width)
        rows: list[list[int]] = []
        free: list[int] = []
        left: list[int] = []
        for i in remaining:
            size = int(lengths[i])
            slot = next((b for b, room in enumerate(free) if room >= size), None)
            if slot is None and len(rows) < max_rows:
                rows.append([])
                free.append(width)
                slot = len(rows) - 1
            if slot is None:
                left.append(i)
                continue
            rows[slot].append(i)
            free[slot] -= size
        micros.append(rows)
        remaining = left
    return micros


def padded_micros(batch: dict[str, Tensor], budget: int) -> list[Micro]:
    """Today's micro-batches: consecutive rows, padded to the longest (``batching.plan_micro_batches``)."""
    out = []
    for plan in plan_micro_batches(batch["attention_mask"], budget):
        view = take(batch, plan)
        out.append(Micro(view=view, forward=view, plan=plan))
    return out


def packed_micros(batch: dict[str, Tensor], budget: int, *, pad_token_id: int = 0) -> list[Micro]:
    """Micro-batches of packed rows (see the module docstring), each with its padded view for the loss."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    out = []
    for rows in plan_packed(lengths, budget):
        members = sorted(i for row in rows for i in row)
        used = mask[members].any(dim=0).nonzero().flatten()
        start, stop = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 1)
        plan = MicroBatch(tuple(members), start, stop)
        out.append(_pack(batch, plan, rows, lengths, pad_token_id))
    return out


def _pack(
    batch: dict[str, Tensor], plan: MicroBatch, rows: list[list[int]], lengths: list[int], pad_token_id: int
) -> Micro:
    view = take(batch, plan)
    device = view["input_ids"].device
    width = max(1, max(sum(lengths[i] for i in row) for row in rows))
    valid = view["attention_mask"].bool()
    flat_index = torch.zeros(valid.shape, dtype=torch.long, device=device)
    seq_base = torch.zeros(valid.shape[0], dtype=torch.long, device=device)
    position = {i: k for k, i in enumerate(plan.rows)}
    local = view.get("sequence_ids")
    span = int(local.max()) + 1 if local is not None and local.numel() else 1
    for r, row in enumerate(rows):
        offset = r * width
        for i in row:
            k = position[i]
            cols = valid[k].nonzero().flatten()
            flat_index[k, cols] = offset + torch.arange(cols.numel(), device=device)
            seq_base[k] = k * span
            offset += cols.numel()
    take_at = flat_index[valid]
    ids = torch.full((len(rows) * width,), pad_token_id, dtype=view["input_ids"].dtype, device=device)
    ids[take_at] = view["input_ids"][valid]
    # a packed row's sample ids: the view row (times the span of any ids the row already carries)
    seq_view = seq_base[:, None] + (local.clamp(min=0) if local is not None else 0)
    seq = torch.full((len(rows) * width,), PAD_SEQUENCE_ID, dtype=torch.long, device=device)
    seq[take_at] = seq_view.expand_as(valid)[valid]
    targets = torch.zeros(len(rows) * width, dtype=view["loss_mask"].dtype, device=device)
    targets[take_at] = view["loss_mask"][valid]
    ids, seq, targets = (t.view(len(rows), width) for t in (ids, seq, targets))
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
    targets = targets.masked_fill(starts, 0)  # a sequence's first token has no predecessor in it
    forward = {
        "input_ids": ids,
        "attention_mask": (seq >= 0).long(),
        "loss_mask": targets,
        "sequence_ids": seq,
    }
    return Micro(view=view, forward=forward, plan=plan, flat_index=flat_index, valid=valid)


def make_micros(
    batch: dict[str, Tensor], budget: int, *, packing: bool, pad_token_id: int = 0
) -> list[Micro]:
    """The micro-batches of one rank's batch, packed or padded."""
    if packing:
        return packed_micros(batch, budget, pad_token_id=pad_token_id)
    return padded_micros(batch, budget)
