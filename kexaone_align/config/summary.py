"""The short summary `kexaone-align validate` prints for a valid recipe."""

from __future__ import annotations

from kexaone_align.config.recipe import Recipe


def _model_line(recipe: Recipe) -> str:
    model = recipe.model
    if model is None:
        return "model:    (from the first stage)"
    where = model.path if model.source == "pretrained" else "built offline"
    line = f"model:    {model.source} ({where}), {model.dtype}"
    arch = model.architecture
    if arch is not None:
        line += (
            f"; {arch.num_hidden_layers} layers, hidden {arch.hidden_size}, "
            f"{arch.num_attention_heads}Q/{arch.num_key_value_heads}KV heads, "
            f"{arch.num_experts} experts top-{arch.num_experts_per_tok} + {arch.num_shared_experts} shared"
        )
    return line


def recipe_summary(recipe: Recipe) -> str:
    """A few lines: stage, model, the key hyper-parameters and the layout."""
    lines = [f"recipe:   {recipe.source_path or '(in memory)'}", f"stage:    {recipe.stage}"]
    if recipe.stage == "pipeline":
        for i, entry in enumerate(recipe.pipeline or []):
            extra = f" {' '.join(entry.overrides)}" if entry.overrides else ""
            lines.append(f"  {i}: {entry.recipe}{extra}")
        lines.append(_model_line(recipe))
        lines.append(f"run_dir:  {recipe.resolved_run_dir}")
        return "\n".join(lines)
    lines.append(_model_line(recipe))
    algo = recipe.algorithm
    if recipe.stage == "sft":
        keys = ("lr", "epochs", "max_steps", "batch_size", "max_seq_len", "packing")
    elif recipe.stage == "agapo":
        keys = ("group_size", "is_cap", "lr", "prompts_per_step", "steps", "zero_variance_filter")
    else:
        keys = ("group_size", "lr", "prompts_per_step", "steps", "refresh_every")
    lines.append(
        f"{recipe.stage}:"
        + " " * max(1, 9 - len(recipe.stage))
        + ", ".join(f"{k}={getattr(algo, k)}" for k in keys)
    )
    lines.append(f"router:   {'frozen' if recipe.freeze_router else 'trained'}")
    data = recipe.data
    if data is not None:
        src = f"generator {data.generator}" if data.generator else f"{len(data.train_files)} train source(s)"
        if not data.generator:
            src += f", split {data.split}" + (f" (held out: {data.eval_split})" if data.eval_split else "")
            if data.columns.preset != "none" or data.columns.prompt or data.columns.messages:
                src += f", columns preset {data.columns.preset}"
        lines.append(f"data:     {src}")
    learn = recipe.learners
    lines.append(
        f"learners: {learn.num_learners} x ZeRO-{learn.zero_stage} {learn.precision} {learn.backend}, "
        f"micro-batch {learn.micro_batch_tokens} tokens, schedule {learn.lr_schedule}"
    )
    if recipe.stage != "sft":
        r = recipe.rollout
        lines.append(
            f"rollout:  {r.num_workers} x {r.backend} (tp={r.tensor_parallel_size}), T={r.temperature}, "
            f"top_p={r.top_p}, max_new_tokens={r.max_new_tokens}, max_staleness={r.max_staleness}"
        )
    c = recipe.cluster
    lines.append(
        f"cluster:  {c.address or 'local ray.init()'}, {c.placement}, "
        f"{c.nodes} node(s) x {c.gpus_per_node} GPU(s)"
    )
    if recipe.verifiers:
        lines.append("verifiers: " + ", ".join(f"{t}={v}" for t, v in recipe.verifiers.items()))
    lines.append(f"run_dir:  {recipe.resolved_run_dir}")
    lines.extend(f"warning:  {w}" for w in recipe.warnings)
    return "\n".join(lines)
