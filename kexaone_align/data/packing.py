"""Sequence packing without cross-sample attention leakage.

Several tokenized samples share one row; each sample must still behave as if it ran alone. That takes
three things, all produced here:

* ``position_ids`` restart at 0 for every sample (RoPE on ExaoneMoe's sliding-window layers sees the same
  positions as an unpacked run);
* attention stays inside a sample, causally, and on sliding-window layers also within the window;
* the loss never trains the first token of a sample from the previous sample's last token
  (``loss_mask`` is 0 on every sample's first token, and the next-token targets stop at boundaries).

How transformers 5.x ExaoneMoe takes packed rows (checked against ``masking_utils`` and tested):

* **Explicit masks** (``packed_attention_masks``; what ``packed_forward_kwargs`` uses for ``sdpa`` and
  ``eager``): a ``{layer_type: 4D mask}`` dict passed as ``attention_mask``. ExaoneMoe uses each entry on
  the layers of that type as is. A single 4D tensor would be applied to every layer and lose the sliding
  window, so it must be the dict.
* **Position restarts** (for ``flash_attention_*``/``flex_attention``, where a dense 4D mask does not
  fit): ``position_ids`` with ``attention_mask=None`` **and ``use_cache=False``**. The mask builders then
  detect packing from the restarts (``find_packed_sequence_indices``) and build block-diagonal causal and
  sliding-window masks. The detection is skipped whenever a cache exists, and ExaoneMoe creates a
  ``DynamicCache`` by default (``config.use_cache`` is True, in train mode too), so forgetting
  ``use_cache=False`` silently leaks across samples; so does passing any 2D ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kexaone_align.errors import KexaoneError

IGNORE_INDEX = -100
PAD_SEQUENCE_ID = -1


@dataclass
class PackedBatch:
    """One packed row: samples laid end to end, with everything needed to keep them apart.

    ``sequence_ids[t]`` is the index (within this row) of the sample token ``t`` belongs to
    (``PAD_SEQUENCE_ID`` for padding added by ``collate_packed``); ``boundaries`` are the samples'
    ``(start, end)`` spans; ``example_indices`` the positions of those samples in the packer's input.
    """

    input_ids: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    sequence_ids: Tensor
    boundaries: list[tuple[int, int]] = field(default_factory=list)
    example_indices: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def labels(self) -> Tensor:
        """Hugging Face style (unshifted) labels: the token where it is trained on, else -100."""
        ignore = torch.full_like(self.input_ids, IGNORE_INDEX)
        return torch.where(self.loss_mask.bool(), self.input_ids, ignore)


def _as_pair(example: Any, index: int) -> tuple[list[int], list[int]]:
    if isinstance(example, Mapping):
        ids, mask = example.get("input_ids"), example.get("loss_mask")
    elif isinstance(example, Sequence) and len(example) == 2:
        ids, mask = example
    else:
        raise KexaoneError(f"pack_sequences: example {index} must be (input_ids, loss_mask) or a dict")
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    mask = mask.tolist() if isinstance(mask, Tensor) else list(mask)
    if len(ids) != len(mask):
        raise KexaoneError(
            f"pack_sequences: example {index} has {len(ids)} input_ids but {len(mask)} loss_mask entries"
        )
    if not ids:
        raise KexaoneError(f"pack_sequences: example {index} is empty")
    return ids, mask


def pack_sequences(
    examples: Sequence[Any], max_tokens: int, *, sort_by_length: bool = True
) -> list[PackedBatch]:
    """Pack ``(input_ids, loss_mask)`` examples into rows of at most ``max_tokens`` tokens (first fit).

    With ``sort_by_length`` the longest examples are placed first (first-fit decreasing: fuller rows);
    otherwise examples are placed in input order. Every example lands in exactly one row, unsplit; one
    longer than ``max_tokens`` is an error (truncate it when tokenizing).
    """
    if max_tokens < 1:
        raise KexaoneError(f"pack_sequences: max_tokens must be >= 1, got {max_tokens}")
    pairs = [_as_pair(example, i) for i, example in enumerate(examples)]
    for i, (ids, _) in enumerate(pairs):
        if len(ids) > max_tokens:
            raise KexaoneError(
                f"pack_sequences: example {i} has {len(ids)} tokens, more than max_tokens={max_tokens}; "
                "truncate it when tokenizing (max_seq_len) or raise max_tokens"
            )
    order = list(range(len(pairs)))
    if sort_by_length:
        order.sort(key=lambda i: -len(pairs[i][0]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        size = len(pairs[i][0])
        for b, room in enumerate(free):
            if size <= room:
                bins[b].append(i)
                free[b] -= size
                break
        else:
            bins.append([i])
            free.append(max_tokens - size)
    return [_build_row(pairs, members) for members in bins]


def _build_row(pairs: list[tuple[list[int], list[int]]], members: list[int]) -> PackedBatch:
    ids: list[int] = []
    mask: list[int] = []
    positions: list[int] = []
    seq: list[int] = []
    boundaries = []
    for k, i in enumerate(members):
        sample_ids, sample_mask = pairs[i]
        start = len(ids)
        ids.extend(sample_ids)
        # The first token of a sample has no in-sample predecessor: never a training target.
        mask.extend([0, *(1 if m else 0 for m in sample_mask[1:])])
        positions.extend(range(len(sample_ids)))
        seq.extend([k] * len(sample_ids))
        boundaries.append((start, len(ids)))
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        loss_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
        sequence_ids=torch.tensor(seq, dtype=torch.long),
        boundaries=boundaries,
        example_indices=list(members),
    )


def next_token_targets(input_ids: Tensor, loss_mask: Tensor, sequence_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted targets for per-position log-probs: position ``t`` predicts token ``t + 1``.

    ``target_mask[t]`` is 1 only when token ``t + 1`` is trained on and belongs to the same sample as
    ``t``, so no prediction ever crosses a sample boundary. The last position has no target.
    """
    targets = torch.zeros_like(input_ids)
    target_mask = torch.zeros_like(loss_mask)
    targets[..., :-1] = input_ids[..., 1:]
    same = sequence_ids[..., 1:] == sequence_ids[..., :-1]
    target_mask[..., :-1] = loss_mask[..., 1:] * same.to(loss_mask.dtype)
    return targets, target_mask


def collate_packed(
    rows: Sequence[PackedBatch], *, pad_token_id: int = 0, pad_to_multiple_of: int = 1
) -> dict[str, Tensor]:
    """Stack packed rows into ``[B, T]`` tensors, padding on the right.

    Padding gets ``loss_mask`` 0, ``sequence_ids`` -1 and positions restarting at 0 (so transformers'
    packing detection treats it as a separate sample that no real token can see). Returns
    ``input_ids``, ``position_ids``, ``loss_mask``, ``sequence_ids``, ``labels`` (unshifted, -100
    where untrained) and ``target_ids``/``target_mask`` (shifted, see ``next_token_targets``).
    """
    if not rows:
        raise KexaoneError("collate_packed: no rows to collate")
    width = max(r.num_tokens for r in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, list[Tensor]] = {k: [] for k in ("input_ids", "position_ids", "loss_mask", "sequence_ids")}
    for r in rows:
        pad = width - r.num_tokens
        out["input_ids"].append(torch.cat([r.input_ids, torch.full((pad,), pad_token_id, dtype=torch.long)]))
        out["position_ids"].append(torch.cat([r.position_ids, torch.arange(pad, dtype=torch.long)]))
        out["loss_mask"].append(torch.cat([r.loss_mask, torch.zeros(pad, dtype=torch.long)]))
        out["sequence_ids"].append(
            torch.cat([r.sequence_ids, torch.full((pad,), PAD_SEQUENCE_ID, dtype=torch.long)])
        )
    batch = {k: torch.stack(v) for k, v in out.items()}
    batch["labels"] = torch.where(
        batch["loss_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE_INDEX)
    )
    batch["target_ids"], batch["target_mask"] = next_token_targets(
        batch["input_ids"], batch["loss_mask"], batch["sequence_ids"]
    )
    return batch


def block_diagonal_attention_mask(
    sequence_ids: Tensor, *, sliding_window: int | None = None, dtype: torch.dtype = torch.bool
) -> Tensor:
    """``[B, 1, T, T]`` mask letting each token attend only to earlier tokens of its own sample.

    ``sequence_ids`` is ``[T]`` or ``[B, T]`` (samples contiguous, as ``pack_sequences`` lays them out).
    With ``sliding_window`` a token also sees at most that many tokens back, itself included (the
    transformers convention). ``dtype=torch.bool`` gives True = may attend (for ``sdpa``); a floating
    dtype gives an additive mask, 0 or the dtype's minimum (for ``eager``).
    """
    if sequence_ids.dim() == 1:
        sequence_ids = sequence_ids.unsqueeze(0)
    if sequence_ids.dim() != 2:
        raise KexaoneError(
            f"block_diagonal_attention_mask: sequence_ids must be [T] or [B, T], "
            f"got shape {tuple(sequence_ids.shape)}"
        )
    length = sequence_ids.shape[-1]
    idx = torch.arange(length, device=sequence_ids.device)
    same_sample = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    allowed = same_sample & (idx[None, :, None] >= idx[None, None, :])
    if sliding_window is not None:
        if sliding_window < 1:
            raise KexaoneError(
                f"block_diagonal_attention_mask: sliding_window must be >= 1, got {sliding_window}"
            )
        allowed = allowed & (idx[None, None, :] > idx[None, :, None] - sliding_window)
    return _as_mask_dtype(allowed.unsqueeze(1), dtype)


def tree_attention_mask(
    sequence_ids: Tensor,
    branch_ids: Tensor,
    position_ids: Tensor,
    *,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.bool,
) -> Tensor:
    """``[B, 1, T, T]`` mask for shared-prefix rows (``runtime.packed_micro``): a token sees its own
    sample's shared prefix (branch 0) and its own branch, at positions up to its own; with
    ``sliding_window``, only keys fewer than that many *positions* back (the prefix and a branch are not
    adjacent in the row, so row distance would be wrong). With every ``branch_ids`` 0 this is
    ``block_diagonal_attention_mask``."""
    if not sequence_ids.shape == branch_ids.shape == position_ids.shape or sequence_ids.dim() != 2:
        raise KexaoneError(
            "tree_attention_mask: sequence_ids, branch_ids and position_ids must all be [B, T], got "
            f"{tuple(sequence_ids.shape)}, {tuple(branch_ids.shape)}, {tuple(position_ids.shape)}"
        )
    query, key = (slice(None), slice(None), None), (slice(None), None, slice(None))
    allowed = sequence_ids[query] == sequence_ids[key]
    allowed &= (branch_ids[key] == 0) | (branch_ids[key] == branch_ids[query])
    distance = position_ids[query] - position_ids[key]
    allowed &= distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return _as_mask_dtype(allowed.unsqueeze(1), dtype)


def _as_mask_dtype(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise KexaoneError(f"attention mask dtype must be bool or floating, got {dtype}")
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)


def packed_attention_masks(
    sequence_ids: Tensor,
    config: Any,
    *,
    dtype: torch.dtype = torch.bool,
    branch_ids: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-layer-type masks for ExaoneMoe (``{"full_attention": ..., "sliding_attention": ...}``).

    Pass the dict as ``attention_mask=``: the model uses each entry on the layers of that type as is.
    Use ``dtype=torch.bool`` with ``sdpa`` attention and the model's float dtype with ``eager``. With
    ``branch_ids`` and ``position_ids`` (shared-prefix rows) the masks are ``tree_attention_mask``'s.
    """
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])

    def mask(window: int | None) -> Tensor:
        if branch_ids is not None and position_ids is not None:
            return tree_attention_mask(
                sequence_ids, branch_ids, position_ids, sliding_window=window, dtype=dtype
            )
        return block_diagonal_attention_mask(sequence_ids, sliding_window=window, dtype=dtype)

    masks = {}
    for layer_type in layer_types:
        if layer_type == "full_attention":
            masks[layer_type] = mask(None)
        elif layer_type == "sliding_attention":
            window = getattr(config, "sliding_window", None)
            if window is None:
                raise KexaoneError("packed_attention_masks: config has sliding layers but no sliding_window")
            masks[layer_type] = mask(window)
        else:
            raise KexaoneError(f"packed_attention_masks: no packed mask for layer type {layer_type!r}")
    return masks


def packed_forward_kwargs(batch: Mapping[str, Tensor], config: Any) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)`` on a ``collate_packed`` batch, leak-free for ``config``.

    ``sdpa``/``eager`` get explicit per-layer-type masks (bool for sdpa, additive in the model's dtype for
    eager); other attention implementations get ``position_ids`` with no mask, relying on transformers'
    packed-sequence detection. Always ``use_cache=False`` (a cache disables that detection).
    """
    impl = getattr(config, "_attn_implementation", None) or "eager"
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    tree = batch.get("branch_ids")
    if impl in ("sdpa", "eager"):
        dtype = torch.bool if impl == "sdpa" else getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        kwargs["attention_mask"] = packed_attention_masks(
            batch["sequence_ids"], config, dtype=dtype, branch_ids=tree, position_ids=batch["position_ids"]
        )
    elif tree is not None:
        raise KexaoneError(
            f"shared-prefix rows need explicit attention masks (sdpa or eager attention), not {impl!r}; "
            "set learners.share_prefixes=false"
        )
    return kwargs
