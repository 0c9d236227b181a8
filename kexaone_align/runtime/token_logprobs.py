"""The learner's differentiable forward: per-token log-probs of a policy over padded, packed or
shared-prefix rows (``runtime.packed_micro``), under the sampling distribution the ratio needs.

Kept apart from ``runtime.learner`` (the DeepSpeed rank) so that tests and benchmarks can run the same
forward on a bare model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kexaone_align.algorithms.logprobs import chunked_token_logprobs
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.packed_micro import TREE_KEYS


class TokenLogprobModel(nn.Module):
    """Wraps the causal LM so one forward gives per-token log-probs ``[N, T]`` (and the MoE aux loss).

    ``out[i, t] = log p(input_ids[i, t] | input_ids[i, :t])`` where ``target_mask[i, t]`` is set, else 0
    (column 0 has no prediction). Only the selected positions go through the LM head, in chunks,
    so the full ``[tokens, vocab]`` logits never exist. Under ZeRO-3 the LM-head weight is used
    outside ``lm_head.forward``, so it is registered as an external parameter of this module.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        chunk_size: int,
        zero3: bool,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.chunk_size = chunk_size
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        if zero3:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            register_external_parameter(self, policy.lm_head.weight)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        target_mask: Tensor,
        with_aux: bool = False,
        sequence_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        branch_ids: Tensor | None = None,
        parent_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-prob of each target token given its predecessor: the previous token, or ``parent_index``'s
        (shared-prefix rows, ``runtime.packed_micro``, where a branch's first token follows the prefix)."""
        if sequence_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        elif branch_ids is None:  # packed rows (data.packing): positions restart per sample
            inputs = _packed_inputs(input_ids, sequence_ids, self.policy.config)
        else:
            inputs = _tree_inputs(input_ids, sequence_ids, position_ids, branch_ids, self.policy.config)
        out = self.policy.model(**inputs, use_cache=False, output_router_logits=with_aux)
        hidden = out.last_hidden_state
        if parent_index is None:
            select = target_mask[:, 1:].bool()
            picked = self._token_logprobs(hidden[:, :-1][select], input_ids[:, 1:][select])
            shifted = torch.zeros(select.shape, dtype=torch.float32, device=hidden.device).masked_scatter(
                select, picked.float()
            )
            logprobs = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)
        else:
            rows, cols = target_mask.bool().nonzero(as_tuple=True)
            picked = self._token_logprobs(hidden[rows, parent_index[rows, cols]], input_ids[rows, cols])
            empty = torch.zeros(target_mask.shape, dtype=torch.float32, device=hidden.device)
            logprobs = empty.index_put((rows, cols), picked.float())
        aux = None
        if with_aux:
            aux = self._aux_loss(out.router_logits, attention_mask)
        return logprobs, aux

    def _token_logprobs(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        return chunked_token_logprobs(
            hidden, self.policy.lm_head.weight, tokens, chunk_size=self.chunk_size, **self.sampling
        )

    def _aux_loss(self, router_logits: tuple[Tensor, ...] | None, attention_mask: Tensor) -> Tensor:
        """Switch-style load-balancing loss over the MoE layers (transformers' Mixtral formulation)."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        if not router_logits:
            raise KexaoneError("aux_loss_coef > 0 but the model returned no router logits (is it an MoE?)")
        cfg = self.policy.config
        return load_balancing_loss_func(
            tuple(router_logits), cfg.num_experts, cfg.num_experts_per_tok, attention_mask
        )


def _packed_inputs(input_ids: Tensor, sequence_ids: Tensor, config: Any) -> dict[str, Any]:
    """Model inputs for packed rows: per-sample positions (from ``sequence_ids``) and leak-free masks."""
    from kexaone_align.data.packing import packed_forward_kwargs

    index = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    batch = {"input_ids": input_ids, "position_ids": index - first, "sequence_ids": sequence_ids}
    kwargs = packed_forward_kwargs(batch, config)
    kwargs.pop("use_cache", None)
    return kwargs


def _tree_inputs(
    input_ids: Tensor, sequence_ids: Tensor, position_ids: Tensor | None, branch_ids: Tensor, config: Any
) -> dict[str, Any]:
    """Model inputs for shared-prefix rows: the rows' own positions and prefix-plus-branch masks."""
    from kexaone_align.data.packing import packed_forward_kwargs

    if position_ids is None:
        raise KexaoneError("shared-prefix rows need position_ids")
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "sequence_ids": sequence_ids,
        "branch_ids": branch_ids,
    }
    kwargs = packed_forward_kwargs(batch, config)
    kwargs.pop("use_cache", None)
    return kwargs


def forward_args(inputs: dict[str, Tensor], with_aux: bool) -> tuple[Any, ...]:
    """``TokenLogprobModel.forward``'s positional arguments for a micro-batch's forward rows."""
    extra = [inputs.get(key) for key in ("sequence_ids", *TREE_KEYS)]
    return (inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"], with_aux, *extra)
