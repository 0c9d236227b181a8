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

**Shared prefixes** (``share_prefixes``): the G responses of one prompt repeat that prompt G times.
Rows whose tokens before their first trained token are identical form one *unit*: the prefix once,
then each row's remainder as a branch. Positions continue after the prefix in every branch, a branch
token attends to the prefix and, causally, to its own branch (``data.packing.tree_attention_masks``,
sliding windows by position), and each branch's first token is predicted from the prefix's last
hidden state (``parent_index``), so every view token gets the log-prob it would get alone. A group is
split into units, each with its own copy of the prefix, at the width an estimate of attention's cost
favours (``shared_prefix_units``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kexaone_align.data.packing import PAD_SEQUENCE_ID
from kexaone_align.runtime.batching import (
    MicroBatch,
    balanced_shard_rows,
    plan_micro_batches,
    shard_plan,
    take,
)

TREE_KEYS = ("position_ids", "branch_ids", "parent_index")  # forward keys of shared-prefix micro-batches
DEFAULT_COST_WIDTH = 1024  # attention_cost_width of a model with no config at hand (the driver's rank plan)


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


def packed_micros(
    batch: dict[str, Tensor],
    budget: int,
    *,
    pad_token_id: int = 0,
    share_prefixes: bool = False,
    cost_width: int = DEFAULT_COST_WIDTH,
) -> list[Micro]:
    """Micro-batches of packed rows (see the module docstring), each with its padded view for the loss.

    ``share_prefixes`` lays rows with a common untrained prefix out as one unit (module docstring);
    a batch that already carries ``sequence_ids`` (packed SFT rows) is packed without sharing.
    """
    if share_prefixes and "sequence_ids" not in batch:
        return _shared_prefix_micros(batch, budget, pad_token_id, cost_width)
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


@dataclass(frozen=True)
class Unit:
    """Rows (batch indices) sharing their first ``prefix`` real tokens, laid out as prefix + branches."""

    rows: tuple[int, ...]
    prefix: int
    length: int  # tokens the unit occupies: prefix + every row's remainder


UNIT_WIDTHS = (1, 2, 4, 8)  # candidate unit widths, in multiples of the group's longest row


def attention_cost_width(config: Any) -> int:
    """The row width at which a token's attention costs as much as the rest of its layer.

    Under a dense mask each token's attention runs QK and PV over its whole packed row (2 x heads x
    head_dim multiply-adds per row position), while its projections and (active) MLP cost a fixed
    amount; their ratio is this width. ``shared_prefix_units`` uses it to judge whether sharing a
    prompt over more responses (fewer tokens) is worth the wider rows (more attention per token).
    """
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads)
    if getattr(config, "num_experts", None):
        active = int(config.num_experts_per_tok) + int(getattr(config, "num_shared_experts", 0) or 0)
        mlp = 3 * hidden * int(config.moe_intermediate_size) * active
    else:
        mlp = 3 * hidden * int(config.intermediate_size)
    return max(1, round((projections + mlp) / (2 * heads * head_dim)))


def _bin_group(members: list[int], lengths: list[int], prefix: int, cap: int) -> list[Unit]:
    """A group's rows into units of at most ``cap`` tokens: first fit, longest row first."""
    bins: list[list[int]] = []
    sizes: list[int] = []
    for i in sorted(members, key=lambda i: (-lengths[i], i)):
        extra = lengths[i] - prefix
        slot = next((b for b, size in enumerate(sizes) if size + extra <= cap), None)
        if slot is None:
            bins.append([])
            sizes.append(prefix)
            slot = len(bins) - 1
        bins[slot].append(i)
        sizes[slot] += extra
    return [Unit(tuple(sorted(rows)), prefix, size) for rows, size in zip(bins, sizes, strict=True)]


def shared_prefix_units(
    batch: dict[str, Tensor], budget: int, cost_width: int = DEFAULT_COST_WIDTH
) -> list[Unit]:
    """Group rows by their tokens before the first trained token, then split each group into units.

    Only an exact token match is shared, and never a trained token, so a row's log-probs cannot change.
    Each group is split (``_bin_group``) at the width, among 1, 2, 4 and 8 times its longest row (at
    most ``budget``) or one row per unit, with the least estimated cost: a unit of ``L`` tokens costs
    ``L * (cost_width + L)`` (layer work per token, plus attention over a row about that wide; see
    ``attention_cost_width``). Short prompts with long answers then stay one row per unit, while long
    prompts with short answers share over many. Deterministic; units come out by their first row and
    list their rows in batch order.
    """
    valid = batch["attention_mask"].bool()
    trained = batch["loss_mask"].bool() & valid
    groups: dict[tuple[int, ...], list[int]] = {}
    lengths, prefixes = [], []
    alone: list[int] = []
    for i in range(valid.shape[0]):
        cols = valid[i].nonzero().flatten()
        hits = trained[i, cols].nonzero().flatten()
        n = int(hits[0]) if hits.numel() else int(cols.numel())
        lengths.append(int(cols.numel()))
        prefixes.append(n)
        if n == 0:
            alone.append(i)
        else:
            groups.setdefault(tuple(batch["input_ids"][i, cols[:n]].tolist()), []).append(i)
    units = [Unit((i,), 0, lengths[i]) for i in alone]
    for members in groups.values():
        n = prefixes[members[0]]
        longest = max(lengths[i] for i in members)
        options = [[Unit((i,), n, lengths[i]) for i in members]]
        options += [_bin_group(members, lengths, n, min(budget, f * longest)) for f in UNIT_WIDTHS]
        units.extend(min(options, key=lambda us: sum(u.length * (cost_width + u.length) for u in us)))
    return sorted(units, key=lambda u: u.rows[0])


def shard_rows_keeping_prefixes(
    batch: dict[str, Tensor],
    num_shards: int,
    *,
    balance: bool,
    share_prefixes: bool,
    budget: int,
    cost_width: int = DEFAULT_COST_WIDTH,
) -> list[list[int]]:
    """Each data-parallel rank's rows. With ``balance`` and ``share_prefixes`` whole units (a prompt and
    up to a micro-batch of its responses, ``shared_prefix_units``) go to ranks by the tokens they will
    compute, so a prompt is not split over ranks and computed on each; otherwise (or with fewer units
    than ranks, where some rank would idle) ``shard_plan``."""
    if not (balance and share_prefixes) or "sequence_ids" in batch or num_shards == 1:
        return shard_plan(batch, num_shards, balance=balance)
    units = shared_prefix_units(batch, budget, cost_width)
    if len(units) < num_shards:
        return shard_plan(batch, num_shards, balance=balance)
    placed = balanced_shard_rows([u.length for u in units], num_shards)
    return [sorted(i for u in rank for i in units[u].rows) for rank in placed]


def _shared_prefix_micros(
    batch: dict[str, Tensor], budget: int, pad_token_id: int, cost_width: int
) -> list[Micro]:
    units = shared_prefix_units(batch, budget, cost_width)
    mask = batch["attention_mask"].bool()
    out = []
    for rows in plan_packed([u.length for u in units], budget):
        members = sorted(i for row in rows for u in row for i in units[u].rows)
        used = mask[members].any(dim=0).nonzero().flatten()
        start, stop = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 1)
        plan = MicroBatch(tuple(members), start, stop)
        out.append(_pack_units(batch, plan, [[units[u] for u in row] for row in rows], pad_token_id))
    return out


def _pack_units(
    batch: dict[str, Tensor], plan: MicroBatch, rows: list[list[Unit]], pad_token_id: int
) -> Micro:
    view = take(batch, plan)
    device = view["input_ids"].device
    width = max(1, max(sum(u.length for u in row) for row in rows))
    total = len(rows) * width
    valid = view["attention_mask"].bool()
    flat_index = torch.zeros(valid.shape, dtype=torch.long, device=device)
    position = {i: k for k, i in enumerate(plan.rows)}
    ids = torch.full((total,), pad_token_id, dtype=view["input_ids"].dtype, device=device)
    seq = torch.full((total,), PAD_SEQUENCE_ID, dtype=torch.long, device=device)
    branch = torch.zeros(total, dtype=torch.long, device=device)
    pos = torch.zeros(total, dtype=torch.long, device=device)
    parent = torch.arange(total, device=device)  # itself: no predecessor (never a target)
    targets = torch.zeros(total, dtype=view["loss_mask"].dtype, device=device)
    unit_id = 0
    for r, row in enumerate(rows):
        cursor = r * width
        for unit in row:
            n = unit.prefix
            first = position[unit.rows[0]]
            head = valid[first].nonzero().flatten()[:n]
            prefix = torch.arange(cursor, cursor + n, device=device)
            ids[prefix] = view["input_ids"][first, head]
            seq[prefix] = unit_id
            pos[prefix] = torch.arange(n, device=device)
            parent[prefix[1:]] = prefix[:-1]
            cursor += n
            for b, i in enumerate(unit.rows, start=1):
                k = position[i]
                cols = valid[k].nonzero().flatten()
                span = torch.arange(cursor, cursor + cols.numel() - n, device=device)
                flat_index[k, cols[:n]] = prefix
                flat_index[k, cols[n:]] = span
                ids[span] = view["input_ids"][k, cols[n:]]
                seq[span], branch[span] = unit_id, b
                pos[span] = torch.arange(n, cols.numel(), device=device)
                parent[span[1:]] = span[:-1]
                if n and span.numel():
                    parent[span[0]] = prefix[-1]
                targets[span] = view["loss_mask"][k, cols[n:]]
                cursor += span.numel()
            unit_id += 1
    targets = targets.masked_fill(parent == torch.arange(total, device=device), 0)
    forward = {
        "input_ids": ids,
        "attention_mask": (seq >= 0).long(),
        "loss_mask": targets,
        "sequence_ids": seq,
        "position_ids": pos,
        "branch_ids": branch,
        "parent_index": parent - torch.arange(len(rows), device=device).repeat_interleave(width) * width,
    }
    forward = {key: t.view(len(rows), width) for key, t in forward.items()}
    return Micro(view=view, forward=forward, plan=plan, flat_index=flat_index, valid=valid)


def make_micros(
    batch: dict[str, Tensor],
    budget: int,
    *,
    packing: bool,
    pad_token_id: int = 0,
    share_prefixes: bool = False,
    cost_width: int = DEFAULT_COST_WIDTH,
) -> list[Micro]:
    """The micro-batches of one rank's batch: packed (prompts shared if asked) or padded."""
    if packing:
        return packed_micros(
            batch, budget, pad_token_id=pad_token_id, share_prefixes=share_prefixes, cost_width=cost_width
        )
    return padded_micros(batch, budget)
