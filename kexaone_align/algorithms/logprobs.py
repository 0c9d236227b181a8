"""Token log-probabilities from final hidden states, without the full ``[tokens, vocab]`` logits.

At K-EXAONE's vocabulary (153,600) the logits of a 16K-token sequence alone take 10 GB in fp32. Here
the tokens are processed ``chunk_size`` at a time: each chunk's logits are formed, reduced to the
target token's log-probability and the log-partition, and dropped. The backward pass recomputes each
chunk's logits instead of storing them, so peak memory is ``chunk_size * vocab`` regardless of the
sequence length, in the forward and the backward pass alike: each pass keeps one chunk-sized buffer
and works on it in place.

With ``top_p < 1`` or ``top_k > 0`` the log-probs are those of the *processed sampler*: temperature,
then top-k, then the top-p nucleus, renormalised over the tokens kept (``truncation_mask``, the same
rule the rollout sampler applies). That takes a sort of each chunk's logits: about four chunk-sized
buffers instead of one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    # bf16/fp16 activations are reduced in fp32; fp64 (used by gradcheck) stays fp64.
    return torch.promote_types(hidden.dtype, torch.float32)


def _chunk_logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    logits = (hidden @ weight.t()).to(_compute_dtype(hidden))
    return logits.div_(temperature) if temperature != 1.0 else logits


def truncation_mask(logp: Tensor, top_p: float = 1.0, top_k: int = -1) -> Tensor | None:
    """``[..., V]`` bool: the tokens a top-k then top-p sampler keeps (None when it keeps them all).

    ``logp`` are log-probs after temperature. Top-k keeps the k most likely (ties at the k-th kept);
    top-p then keeps the smallest set of most likely tokens, under the top-k renormalised distribution,
    whose mass reaches ``top_p`` (the most likely token always stays). The order is vLLM's.
    """
    keep = None
    if 0 < top_k < logp.shape[-1]:
        kth = torch.topk(logp, top_k, dim=-1).values[..., -1:]
        keep = logp >= kth
        logp = logp.masked_fill(~keep, float("-inf"))
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    if top_p < 1.0:
        drop = _nucleus_drop_from_top(logp, top_p)
        if drop is None:
            sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
            probs = sorted_logp.exp()
            mass_before = torch.cumsum(probs, dim=-1) - probs
            drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        keep = ~drop if keep is None else keep & ~drop
    return keep


# How many of the most likely tokens the nucleus is first looked for in (see _nucleus_drop_from_top).
NUCLEUS_PROBE = 64


def _nucleus_drop_from_top(logp: Tensor, top_p: float) -> Tensor | None:
    """The top-p drop mask from the ``NUCLEUS_PROBE`` most likely tokens only, or None when that is not
    enough to decide it exactly.

    A trained policy's nucleus is a handful of tokens, so sorting the whole vocabulary (most of a decode
    step's sampling cost) is wasted work. The answer is the full sort's when every row's cut falls inside
    the probe (its last token is already dropped, so everything below it is too) and no run of tied
    log-probs straddles a cut (ties are the one place where the order inside the probe could differ from
    the stable sort's). Otherwise the caller sorts.
    """
    k = min(NUCLEUS_PROBE, logp.shape[-1])
    if k == logp.shape[-1]:
        return None
    values, order = torch.topk(logp, k, dim=-1)
    probs = values.exp()
    dropped = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    if not bool(dropped[..., -1].all()):
        return None
    kept = (~dropped).sum(dim=-1, keepdim=True)  # >= 1: the most likely token always stays
    if bool((values.gather(-1, kept - 1) == values.gather(-1, kept)).any()):
        return None
    return torch.ones_like(logp, dtype=torch.bool).scatter(-1, order, dropped)


def _kept_logits(logits: Tensor, targets: Tensor, top_p: float, top_k: int) -> Tensor:
    """``logits`` with the tokens the sampler drops set to -inf, in place; each row's target always
    stays (a token the policy sampled but whose nucleus has since moved keeps a finite log-prob)."""
    keep = truncation_mask(torch.log_softmax(logits, dim=-1), top_p, top_k)
    if keep is not None:
        keep[torch.arange(keep.shape[0], device=keep.device), targets] = True
        logits.masked_fill_(~keep, float("-inf"))
    return logits


def _logsumexp_in_place(logits: Tensor) -> Tensor:
    """Row-wise log-sum-exp that overwrites ``logits`` (``torch.logsumexp`` allocates a second chunk)."""
    peak = logits.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        temperature: float,
        top_p: float,
        top_k: int,
    ):
        n_tokens = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        out = torch.empty(n_tokens, dtype=dtype, device=hidden.device)
        lse = torch.empty(n_tokens, dtype=dtype, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            logits = _chunk_logits(hidden[start:stop], weight, temperature)
            picked = logits.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
            logits = _kept_logits(logits, targets[start:stop], top_p, top_k)
            chunk_lse = _logsumexp_in_place(logits)  # one chunk-sized buffer, reused
            lse[start:stop] = chunk_lse
            out[start:stop] = picked - chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.temperature, ctx.top_p, ctx.top_k = temperature, top_p, top_k
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:stop]
            # d logp(target) / d logits = onehot(target) - softmax(logits), times 1/temperature.
            grad_logits = _chunk_logits(h, weight, temperature)  # the only chunk-sized buffer
            grad_logits = _kept_logits(grad_logits, targets[start:stop], ctx.top_p, ctx.top_k)
            grad_logits.sub_(lse[start:stop].unsqueeze(1)).exp_().neg_()
            rows = torch.arange(stop - start, device=grad_logits.device)
            grad_logits[rows, targets[start:stop]] += 1.0
            grad_logits.mul_((grad_out[start:stop].to(lse.dtype) / temperature).unsqueeze(1))
            if need_h:
                grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_weight.addmm_(grad_logits.t(), h.to(lse.dtype))  # in place: no [V, H] temporary
            del grad_logits
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
) -> Tensor:
    """``log softmax(hidden @ weight.T / temperature)[target]`` per token, in fp32, chunk by chunk.

    With ``top_p < 1`` or ``top_k > 0``: the log-prob under the processed sampler instead (the softmax
    taken over the tokens ``truncation_mask`` keeps, plus the target).

    Args:
        hidden: ``[..., H]`` final hidden states (after the last norm), one per predicting position.
        weight: ``[V, H]`` the LM head (unembedding) weight.
        targets: ``[...]`` the token id each position predicts.
        chunk_size: tokens per chunk; peak extra memory is about ``chunk_size * V * 4`` bytes.
        temperature: divides the logits, as the rollout sampler did (1.0: the model itself).
        top_p, top_k: the sampler's truncation (1.0 and -1: none, the full vocabulary).
    Returns:
        ``[...]`` float32 log-probabilities; differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1 or top_k == 0 or top_k < -1:
        raise ValueError(f"top_p must be in (0, 1] and top_k -1 or >= 1, got {top_p}, {top_k}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not line up")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != lm head width {weight.shape[-1]}")
    lead_shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    out = _ChunkedTokenLogprobs.apply(
        flat_hidden, weight, flat_targets, chunk_size, float(temperature), float(top_p), int(top_k)
    )
    return out.reshape(lead_shape)


@torch.no_grad()
def chunked_token_entropy(
    hidden: Tensor, weight: Tensor, *, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """Entropy of the next-token distribution per position (a diagnostic; no gradient)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=_compute_dtype(hidden), device=hidden.device)
    for start in range(0, flat.shape[0], chunk_size):
        stop = min(start + chunk_size, flat.shape[0])
        logp = torch.log_softmax(_chunk_logits(flat[start:stop], weight, temperature), dim=-1)
        out[start:stop] = -(logp.exp() * logp).sum(dim=-1)
    return out.reshape(hidden.shape[:-1])


def naive_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
) -> Tensor:
    """Reference implementation that materialises all logits (for tests and benchmarks only)."""
    logits = _chunk_logits(hidden, weight, temperature)
    logp = torch.log_softmax(logits, dim=-1)
    keep = truncation_mask(logp, top_p, top_k)
    if keep is not None:
        keep = keep | torch.nn.functional.one_hot(targets.long(), logits.shape[-1]).bool()
        logp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
