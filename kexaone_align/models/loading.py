"""Loading the policy and its tokenizer: one code path for the tiny kit and the real K-EXAONE checkpoints.

``path`` is a local checkpoint directory (what ``build_tiny_checkpoint`` writes, or a downloaded
K-EXAONE) or, on a machine with hub access, a hub name. ``meta_model`` and ``count_parameters`` let the
``plan`` command reason about a 236B model without allocating it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from kexaone_align.errors import KexaoneError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise KexaoneError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _check_source(path: str | Path) -> str:
    """A local directory, or a hub name ("org/model"); fail early on a local path that does not exist.

    Anything that is not of the form ``org/name``, or whose first component is a local directory
    (``checkpoints/tiny``), is taken as a local path, so a typo fails at once instead of after hub retries.
    """
    text = str(path)
    local = Path(text).expanduser()
    parts = text.split("/")
    hub_like = (
        not isinstance(path, Path)
        and len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~"))
        and not Path(parts[0]).is_dir()
    )
    if local.is_dir():
        return str(local)
    if hub_like:
        return text
    raise KexaoneError(f"checkpoint directory not found: {text}")


def _describe(source: str) -> str:
    return repr(source) if Path(source).is_dir() else f"{source!r} (not a local directory; tried the hub)"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing by its new transformers name, or the old one (the vllm extra pins <5.21)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_policy(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM checkpoint for training: given dtype and device, optional gradient checkpointing.

    ``device=None`` leaves placement alone; so does a model built inside DeepSpeed's ZeRO-3 ``zero.Init``
    (its parameters are shards that DeepSpeed places and must not be moved).
    """
    source = _check_source(path)
    kwargs: dict = {"dtype": _resolve_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise KexaoneError(f"cannot load a causal LM from {_describe(source)}: {_first_line(exc)}") from exc
    if device is not None and not any(hasattr(p, "ds_id") for p in model.parameters()):
        model.to(device)
    if gradient_checkpointing:
        _enable_checkpointing(model)
        model.config.use_cache = False  # the KV cache is useless (and warned about) while checkpointing
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load the checkpoint's fast tokenizer; it must carry a chat template (K-EXAONE's, or the tiny one)."""
    source = _check_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise KexaoneError(f"cannot load a tokenizer from {_describe(source)}: {_first_line(exc)}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise KexaoneError(f"the tokenizer at {source!r} is not a fast (tokenizers-backed) tokenizer")
    if not tokenizer.chat_template:
        raise KexaoneError(f"the tokenizer at {source!r} has no chat_template")
    return tokenizer


def meta_model(config: PretrainedConfig | str | Path) -> PreTrainedModel:
    """Build the model on the meta device: all shapes, no memory. ``config`` may also be a checkpoint path."""
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(_check_source(config))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ParameterCount:
    """Parameter totals of a (MoE) causal LM.

    ``active`` is what one token touches: everything except the routed experts it is not sent to.
    ``embedding`` counts the input embedding and an untied ``lm_head``; ``routed_experts`` all routed experts.
    """

    total: int
    active: int
    embedding: int
    routed_experts: int

    def __str__(self) -> str:
        def b(n: int) -> str:
            return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

        return (
            f"{b(self.total)} total, {b(self.active)} active, {b(self.embedding)} embedding, "
            f"{b(self.routed_experts)} in routed experts"
        )


def _numel(param: torch.nn.Parameter) -> int:
    """Full size, also for a DeepSpeed ZeRO-3 partitioned parameter (whose local ``numel()`` is 0)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def count_parameters(model_or_config: PreTrainedModel | PretrainedConfig) -> ParameterCount:
    """Count total and active parameters; a config is counted through a meta-device model (no memory)."""
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else meta_model(model_or_config)
    config = model.config
    total = embedding = routed = 0
    for name, param in model.named_parameters():  # tied weights are yielded once
        n = _numel(param)
        total += n
        if name.endswith("embed_tokens.weight") or name.startswith("lm_head."):
            embedding += n
        elif _is_routed_expert(name):
            routed += n
    n_experts = getattr(config, "num_experts", None) or 0
    top_k = getattr(config, "num_experts_per_tok", None) or 0
    active_routed = routed * top_k // n_experts if n_experts else routed
    active = total - routed + active_routed
    return ParameterCount(total=total, active=active, embedding=embedding, routed_experts=routed)
