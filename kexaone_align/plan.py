"""Parameters and per-GPU memory of a recipe, on paper (``kexaone-align plan``).

The model is built on the meta device from ``model.architecture`` (or a local ``config.json``), so
nothing is allocated and no network is needed. Parameter counts come from
``kexaone_align.models.loading.count_parameters`` (active = all parameters minus the routed experts a
token is not sent to: top-k of E per MoE layer).

Memory formulas, per GPU, all in bytes (b_w = 2 for bf16 / 4 for fp32 training, DP = num_learners):
  * weights:     ZeRO-2: P * b_w.   ZeRO-3: P * b_w / DP, plus the live (gathered) parameters of the largest
                 single module (ZeRO-3 gathers a module's full tensors before using it).
  * gradients:   P_train * b_w / DP (ZeRO-2 and 3 both partition gradients).
  * optimizer:   Adam, P_train * (8 + 4 if bf16 else 8) / DP: two fp32 moments, plus an fp32 master copy
                 when training in bf16. 0 on GPU when offload_optimizer is set.
  * activations: memory-efficient attention (flash / sdpa without a materialised seq^2 mask), b_a = b_w,
                 T = learners.micro_batch_tokens. Bytes per token and layer (q = n_q*d, kv = n_kv*d):
                   norms:     (2h + q + kv) * (4 + b_a)      RMSNorm keeps an fp32 copy of its input
                   attention: (h + 2q + 2kv) * b_a            proj input, Q, attention output, K, V
                              + (2q + 2kv) * b_a on sliding layers (RoPE intermediates; global = NoPE)
                   dense MLP: (h + 4I) * b_a                  input, gate, up, act(gate), product
                   MoE MLP:   4h + 8E  +  k*(2h + 4I_e)*b_a  +  (h + 4*I_e*S)*b_a
                              (fp32 router input/logits, the k routed copies, the S shared experts)
                 without gradient checkpointing: T * (sum over layers + final norm h*(4+b_a));
                 with it: T * (L*h*b_a  [each layer's input]  +  the largest single layer  [recomputed]).
  * log-prob head (``algorithms.logprobs``, on every learner's GPU; c = b_w when b_w < 4, else 0: the
                 fp32 results are cast back to the weight dtype):
                   lm_head_grad:   V * H * (4 + c)    the LM-head weight gradient, accumulated over the chunks
                                                      in an fp32 [V, H] buffer, then cast to the weight dtype
                   logprob_chunk:  C * V * (4 + c)    one chunk of C = min(T, 1024) tokens: fp32 logits (the
                                                      backward reuses them in place for the gradient) and a
                                                      copy in the weight dtype
                 Summed with the rest, although the chunk is freed before the final cast: an upper bound.
  * rollout:     weights P * b_r / TP (b_r = 2 for bf16, 4 for float32 model dtype). KV cache per sequence of
                 S = data.max_prompt_tokens + rollout.max_new_tokens tokens:
                   sum over layers of 2 * ceil(n_kv / TP) * d * b_r * (min(S, window) if sliding else S)
                 times rollout.batch_size sequences in flight per worker.
  * peak:        colocated: learner + rollout on the same GPU; disaggregated: the larger of the two.

Host memory (``host_memory_gib``, not on a GPU):
  * kept_rollout_weights:  P * b_w, with rollout.max_worker_restarts > 0: the rollout pool keeps the
                 buckets of the last weight push in Ray's object store (on the node of learner rank 0,
                 which produced them) so a replacement worker can be loaded without the learners.
  * grouper_initial_policy: P * b_r, GROUPER with refresh_every 0 and eval_every_steps > 0: after an
                 evaluation the starting checkpoint is loaded whole by one Ray actor and pushed back.
Disk (``disk_gib``):
  * group_cache: GROUPER's sampled groups (``runtime.group_cache``), at most steps * prompts_per_step
                 prompts, each G * rollout.max_new_tokens * (4 bytes token id + 4 bytes log-prob)
                 + data.max_prompt_tokens * 4 (the prompt, once per group).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kexaone_align.config.recipe import Recipe
from kexaone_align.errors import KexaoneError

GIB = 1024**3
LOGPROB_CHUNK = 1024  # runtime.learner.LearnerConfig.logprob_chunk_size (not a recipe key)


def hf_config(recipe: Recipe) -> Any:
    """The ``ExaoneMoeConfig`` of the recipe's model, with no network."""
    from transformers import AutoConfig, ExaoneMoeConfig

    model = recipe.model
    if model is None:
        raise KexaoneError("plan needs a model section")
    if model.architecture is not None:
        kwargs = model.architecture.to_hf_kwargs()
        if "vocab_size" not in kwargs:
            from kexaone_align.models.tokenizer import build_tokenizer

            kwargs["vocab_size"] = len(build_tokenizer())
        try:
            return ExaoneMoeConfig(**kwargs)
        except Exception as exc:  # transformers' strict dataclass raises its own error types
            raise KexaoneError(f"model.architecture is not a valid ExaoneMoeConfig: {exc}") from None
    path = Path(model.path or "")
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    raise KexaoneError(
        f"plan cannot see the architecture of {model.path!r} without a network: add a model.architecture "
        "section to the recipe, or point model.path at a local checkpoint directory"
    )


def _meta_model(config: Any) -> Any:
    try:
        from kexaone_align.models.loading import meta_model
    except ImportError:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return meta_model(config)


def _counts(model: Any) -> dict[str, int]:
    """total / active / embedding / routed / router parameters and the largest single module.

    total and active come from the models package's ``count_parameters`` when it is importable (one
    definition of "active" for the whole project); the walk below is the fallback and also finds what
    only the memory estimate needs (router size, largest module gathered at once under ZeRO-3).
    """
    total = embedding = routed = router = 0
    per_module: dict[str, int] = {}
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if name.endswith("embed_tokens.weight") or name.startswith("lm_head."):
            embedding += n
        if ".mlp.experts." in name:  # routed experts: E x ... tensors on the experts module
            routed += n
        if ".mlp.gate." in name:  # the MoE router
            router += n
        module = name.rsplit(".", 1)[0]
        per_module[module] = per_module.get(module, 0) + n
    config = model.config
    active = total - routed + routed * config.num_experts_per_tok // config.num_experts
    try:
        from kexaone_align.models.loading import count_parameters
    except ImportError:
        pass
    else:
        counted = count_parameters(model)
        total, active, embedding, routed = (
            counted.total,
            counted.active,
            counted.embedding,
            counted.routed_experts,
        )
    return {
        "total": total,
        "active": active,
        "embedding": embedding,
        "routed": routed,
        "router": router,
        "largest_module": max(per_module.values(), default=0),
    }


def _activation_bytes_per_token(config: Any, b: int) -> tuple[int, int, int]:
    """(all layers + final norm, the largest layer, the checkpointed layer inputs) in bytes per token.

    The per-layer terms follow what transformers' ExaoneMoe saves for backward (checked against
    ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_plan.py).
    """
    h = config.hidden_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    ie, k, e = config.moe_intermediate_size, config.num_experts_per_tok, config.num_experts
    norms = (2 * h + q + kv) * (4 + b)  # RMSNorm keeps an fp32 copy of its input plus its output
    attn = (h + 2 * q + 2 * kv) * b  # projection input, Q, attention output, K, V
    rope = (2 * q + 2 * kv) * b  # rotary intermediates (sliding layers; global layers are NoPE)
    dense = (h + 4 * config.intermediate_size) * b  # input, gate, up, act(gate), act(gate) * up
    moe = (
        h * 4
        + 2 * e * 4  # router: fp32 input copy, logits and scores
        + k * (2 * h + 4 * ie) * b  # each routed copy: input, gate/up, act, product, weighted output
        + (h + 4 * ie * config.num_shared_experts) * b  # shared experts
    )
    layers = []
    for attn_kind, mlp_kind in zip(config.layer_types, config.mlp_layer_types, strict=True):
        rotary = rope if attn_kind == "sliding_attention" else 0
        layers.append(norms + attn + rotary + (moe if mlp_kind == "sparse" else dense))
    final_norm = h * (4 + b)
    return sum(layers) + final_norm, max(layers), len(layers) * h * b


def _kv_bytes_per_sequence(config: Any, seq_len: int, tp: int, bytes_per_el: int) -> int:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = math.ceil(config.num_key_value_heads / tp)
    window = config.sliding_window
    total = 0
    for kind in config.layer_types:
        tokens = min(seq_len, window) if (kind == "sliding_attention" and window) else seq_len
        total += 2 * heads * d * bytes_per_el * tokens
    return total


def _gib(n: float) -> float:
    return round(n / GIB, 6)


def plan_recipe(recipe: Recipe) -> dict[str, Any]:
    """Parameter counts and a per-GPU memory estimate for one stage (or each stage of a pipeline)."""
    if recipe.stage == "pipeline":
        from kexaone_align.config.loading import load_pipeline_stages

        stages = [plan_recipe(stage) for stage in load_pipeline_stages(recipe)]
        first = stages[0]
        return {
            "recipe": str(recipe.source_path),
            "stage": "pipeline",
            "total_params": first["total_params"],
            "active_params": first["active_params"],
            "per_gpu_memory_gib": first["per_gpu_memory_gib"],
            "stages": stages,
        }
    config = hf_config(recipe)
    model = _meta_model(config)
    counts = _counts(model)
    learn, roll, cluster = recipe.learners, recipe.rollout, recipe.cluster
    dp = learn.num_learners
    b_w = 2 if learn.precision == "bf16" else 4
    trainable = counts["total"] - (counts["router"] if recipe.freeze_router else 0)

    weights = counts["total"] * b_w
    live = 0
    if learn.zero_stage == 3:
        weights = weights / dp
        live = counts["largest_module"] * b_w
    grads = trainable * b_w / dp
    optim = 0.0 if learn.offload_optimizer else trainable * (12 if learn.precision == "bf16" else 8) / dp

    tokens = learn.micro_batch_tokens
    gc = bool(recipe.model and recipe.model.gradient_checkpointing)
    all_layers, one_layer, inputs = _activation_bytes_per_token(config, b_w)
    acts = tokens * (inputs + one_layer) if gc else tokens * all_layers
    cast = b_w if b_w < 4 else 0  # the log-prob head's fp32 results cast back to the weight dtype
    vocab, hidden = config.vocab_size, config.hidden_size
    lm_head_grad = vocab * hidden * (4 + cast)
    chunk = min(tokens, LOGPROB_CHUNK) * vocab * (4 + cast)
    learner_total = weights + live + grads + optim + acts + lm_head_grad + chunk

    memory: dict[str, float] = {
        "weights": _gib(weights),
        "zero3_live_params": _gib(live),
        "gradients": _gib(grads),
        "optimizer_states": _gib(optim),
        "activations": _gib(acts),
        "lm_head_grad": _gib(lm_head_grad),
        "logprob_chunk": _gib(chunk),
        "learner_total": _gib(learner_total),
    }
    rollout: dict[str, Any] = {}
    rollout_total = 0.0
    if recipe.stage != "sft":
        tp = roll.tensor_parallel_size
        b_r = 2 if (roll.backend == "vllm" or recipe.model.dtype == "bfloat16") else 4
        seq_len = recipe.data.max_prompt_tokens + roll.max_new_tokens
        kv_seq = _kv_bytes_per_sequence(config, seq_len, tp, b_r)
        r_weights = counts["total"] * b_r / tp
        kv = kv_seq * roll.batch_size
        rollout_total = r_weights + kv
        memory.update(rollout_weights=_gib(r_weights), kv_cache=_gib(kv), rollout_total=_gib(rollout_total))
        rollout = {
            "sequence_tokens": seq_len,
            "kv_cache_per_sequence_mib": round(kv_seq / 1024**2, 3),
            "sequences_in_flight_per_worker": roll.batch_size,
            "tensor_parallel_size": tp,
        }
        if cluster.gpu_memory_gib:
            free = cluster.gpu_memory_gib * GIB * roll.gpu_memory_utilization - r_weights
            rollout["max_sequences_that_fit"] = max(0, int(free // kv_seq)) if kv_seq else None
        from kexaone_align.runtime.rollout.resources import rollout_plan

        placed = rollout_plan(recipe)  # what the run will ask Ray for (runtime.rollout.resources)
        rollout["placement"] = {
            "layout": placed.layout, "gpus_per_worker_actor": placed.num_gpus,
            "bundles_per_worker": len(placed.bundle_indices[0]) if placed.bundle_indices else 0,
            "engine": {k: v for k, v in placed.engine.items() if k != "seed"},
        }  # fmt: skip
    host, disk = _host_and_disk_bytes(recipe, counts["total"], b_w)
    colocated = cluster.placement == "colocated"
    peak = learner_total + rollout_total if colocated else max(learner_total, rollout_total)
    memory["peak"] = _gib(peak)
    warnings = []
    if cluster.gpu_memory_gib and peak > cluster.gpu_memory_gib * GIB:
        warnings.append(f"peak {_gib(peak)} GiB exceeds cluster.gpu_memory_gib {cluster.gpu_memory_gib}")
    return {
        "recipe": str(recipe.source_path),
        "stage": recipe.stage,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "embedding_params": counts["embedding"],
        "routed_expert_params": counts["routed"],
        "router_params": counts["router"],
        "trainable_params": trainable,
        "per_gpu_memory_gib": memory,
        "host_memory_gib": {k: _gib(v) for k, v in host.items()},
        "disk_gib": {k: _gib(v) for k, v in disk.items()},
        "layout": {
            "placement": cluster.placement,
            "num_learners": dp,
            "zero_stage": learn.zero_stage,
            "precision": learn.precision,
            "micro_batch_tokens": tokens,
            "gradient_checkpointing": gc,
            "rollout_workers": roll.num_workers if recipe.stage != "sft" else 0,
            "gpus": cluster.nodes * cluster.gpus_per_node,
            "gpu_memory_gib": cluster.gpu_memory_gib,
        },
        "rollout": rollout,
        "warnings": warnings,
        "formulas": "see the module docstring of kexaone_align.plan",
    }


def _host_and_disk_bytes(recipe: Recipe, params: int, b_w: int) -> tuple[dict[str, int], dict[str, int]]:
    """Memory outside the GPUs and disk a run needs, in bytes (see the module docstring)."""
    host: dict[str, int] = {}
    disk: dict[str, int] = {}
    if recipe.stage == "sft":
        return host, disk
    roll = recipe.rollout
    if roll.max_worker_restarts > 0:
        host["kept_rollout_weights"] = params * b_w
    grouper = recipe.grouper
    if recipe.stage == "grouper" and grouper is not None:
        if grouper.refresh_every == 0 and grouper.eval_every_steps > 0:
            b_r = 2 if recipe.model is not None and recipe.model.dtype == "bfloat16" else 4
            host["grouper_initial_policy"] = params * b_r
        prompts = grouper.steps * grouper.prompts_per_step
        per_group = grouper.group_size * roll.max_new_tokens * (4 + 4) + recipe.data.max_prompt_tokens * 4
        disk["group_cache"] = prompts * per_group
    return host, disk


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: dict[str, Any]) -> str:
    """Readable text of ``plan_recipe``'s result."""
    if plan["stage"] == "pipeline":
        return "\n\n".join(format_plan(stage) for stage in plan["stages"])
    lay = plan["layout"]
    lines = [
        f"recipe: {plan['recipe']} (stage {plan['stage']})",
        f"parameters: {_human(plan['total_params'])} total ({plan['total_params']:,}), "
        f"{_human(plan['active_params'])} active ({plan['active_params']:,})",
        f"  embedding + lm_head {_human(plan['embedding_params'])}, routed experts "
        f"{_human(plan['routed_expert_params'])}, trainable {_human(plan['trainable_params'])}",
        f"layout: {lay['num_learners']} learner(s) ZeRO-{lay['zero_stage']} {lay['precision']}, "
        f"{lay['rollout_workers']} rollout worker(s), {lay['placement']}, {lay['gpus']} GPU(s)",
        "per-GPU memory (GiB):",
    ]
    for key, value in plan["per_gpu_memory_gib"].items():
        lines.append(f"  {key:<18} {value:>10.3f}")
    for key, value in plan.get("rollout", {}).items():
        lines.append(f"  rollout.{key}: {value}")
    for title, section in (("host memory", "host_memory_gib"), ("disk", "disk_gib")):
        if plan.get(section):
            lines.append(f"{title} (GiB):")
            lines.extend(f"  {key:<22} {value:>10.3f}" for key, value in plan[section].items())
    lines.extend(f"warning: {w}" for w in plan["warnings"])
    return "\n".join(lines)
