"""``model`` and ``tokenizer`` sections: which policy to train and how it is shaped.

``model.architecture`` uses the keyword names of ``transformers.ExaoneMoeConfig`` so that a recipe can be
turned into a config with no network (``plan`` builds the model on the meta device from it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kexaone_align.config.base import Section

LayerType = Literal["sliding_attention", "full_attention"]
MlpLayerType = Literal["dense", "sparse"]


class ArchitectureConfig(Section):
    """Shape of an EXAONE-MoE model; field names match ``transformers.ExaoneMoeConfig`` kwargs."""

    vocab_size: int | None = Field(
        None, gt=0, description="Vocabulary size. None (tiny models only) = the tiny tokenizer's size."
    )
    hidden_size: int = Field(gt=0, description="Width of the residual stream.")
    num_hidden_layers: int = Field(gt=0, description="Number of decoder layers (MTP layers not included).")
    num_attention_heads: int = Field(gt=0, description="Query heads per attention layer.")
    num_key_value_heads: int = Field(
        gt=0, description="Key/value heads (GQA); must divide num_attention_heads."
    )
    head_dim: int | None = Field(
        None, gt=0, description="Per-head dimension. None = hidden_size // num_attention_heads."
    )
    intermediate_size: int = Field(gt=0, description="FFN width of the dense (non-MoE) layers.")
    moe_intermediate_size: int = Field(gt=0, description="FFN width of each routed (and shared) expert.")
    num_experts: int = Field(gt=0, description="Routed experts per MoE layer (E).")
    num_experts_per_tok: int = Field(gt=0, description="Routed experts chosen per token (top-k).")
    num_shared_experts: int = Field(1, ge=0, description="Always-active shared experts per MoE layer.")
    first_k_dense_replace: int = Field(
        1, ge=0, description="The first k layers use a dense FFN instead of MoE (K-EXAONE: 1)."
    )
    mlp_layer_types: list[MlpLayerType] | None = Field(
        None, description="Per-layer 'dense'/'sparse'; overrides first_k_dense_replace when given."
    )
    sliding_window: int = Field(
        4096, gt=0, description="Window (tokens) of the sliding-window attention layers."
    )
    sliding_window_pattern: int = Field(
        4,
        ge=1,
        description="Every N-th layer is global attention, the others sliding (4 = 3 SWA + 1 global; "
        "1 = all global). Ignored when layer_types is given.",
    )
    layer_types: list[LayerType] | None = Field(
        None, description="Explicit per-layer attention type; length must equal num_hidden_layers."
    )
    max_position_embeddings: int = Field(2048, gt=0, description="Longest context the model supports.")
    hidden_act: str = Field("silu", description="Activation of FFNs and experts.")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    rope_parameters: dict[str, Any] | None = Field(
        None,
        description="RoPE settings (rope_theta, rope_type); used by sliding layers only (global = NoPE).",
    )
    tie_word_embeddings: bool = Field(False, description="Share the embedding matrix with lm_head.")
    norm_topk_prob: bool = Field(True, description="Renormalise the top-k routing weights to sum to 1.")
    routed_scaling_factor: float = Field(2.5, gt=0, description="Scale applied to routed expert outputs.")
    n_group: int = Field(1, gt=0, description="Expert groups for group-limited routing.")
    topk_group: int = Field(1, gt=0, description="Groups kept per token in group-limited routing.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the random init (tiny models).")

    @model_validator(mode="after")
    def _check_shape(self) -> ArchitectureConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok: {self.num_experts_per_tok} exceeds num_experts ({self.num_experts})"
            )
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError("n_group: num_experts must be divisible by n_group and topk_group <= n_group")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError("first_k_dense_replace: exceeds num_hidden_layers")
        for name in ("layer_types", "mlp_layer_types"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_hidden_layers:
                raise ValueError(
                    f"{name}: has {len(value)} entries but num_hidden_layers is {self.num_hidden_layers}"
                )
        return self

    @property
    def resolved_head_dim(self) -> int:
        """Head dimension actually used by the attention layers."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def resolved_layer_types(self) -> list[str]:
        """Per-layer attention type, computed the way ``ExaoneMoeConfig`` does."""
        if self.layer_types is not None:
            return list(self.layer_types)
        n = self.sliding_window_pattern
        return [
            "sliding_attention" if (i + 1) % n else "full_attention" for i in range(self.num_hidden_layers)
        ]

    def resolved_mlp_layer_types(self) -> list[str]:
        """Per-layer 'dense' / 'sparse', computed the way ``ExaoneMoeConfig`` does."""
        if self.mlp_layer_types is not None:
            return list(self.mlp_layer_types)
        return [
            "dense" if i < self.first_k_dense_replace else "sparse" for i in range(self.num_hidden_layers)
        ]

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.ExaoneMoeConfig`` (unset optional fields left out).

        ``layer_types`` is always spelled out because transformers' string ``sliding_window_pattern``
        handling is unreliable; the integer pattern is resolved here instead.
        """
        kwargs = self.model_dump(exclude_none=True)
        kwargs["layer_types"] = self.resolved_layer_types()
        kwargs["mlp_layer_types"] = self.resolved_mlp_layer_types()
        kwargs["head_dim"] = self.resolved_head_dim
        kwargs.pop("sliding_window_pattern", None)
        return kwargs


class ModelConfig(Section):
    """The policy to train: a tiny model built offline, or a pretrained checkpoint."""

    source: Literal["tiny", "pretrained"] = Field(
        description="'tiny' = random toy model built offline from `architecture`; "
        "'pretrained' = a checkpoint at `path` (local directory or hub name)."
    )
    path: str | None = Field(
        None, description="Checkpoint directory or hub name; required when source is 'pretrained'."
    )
    architecture: ArchitectureConfig | None = Field(
        None,
        description="Model shape. Required for source 'tiny'; for 'pretrained' it lets `plan` work with no "
        "network (at run time the checkpoint's own config.json is what gets loaded).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype the policy weights are loaded in."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute layer activations in backward to save memory."
    )
    freeze_router: bool | None = Field(
        None,
        description="Freeze the MoE routers. None = the stage's default (agapo/grouper.freeze_router; "
        "False for sft).",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="transformers attention kernel; None = transformers' default."
    )
    experts_implementation: Literal["eager", "grouped_mm", "batched_mm"] | None = Field(
        None,
        description="transformers MoE experts kernel for the learners; None = transformers' default "
        "(grouped_mm); benchmarks/moe_kernels.py times them on a given machine.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> ModelConfig:
        if self.source == "pretrained" and not self.path:
            raise ValueError("path: required when source is 'pretrained'")
        if self.source == "tiny" and self.architecture is None:
            raise ValueError("architecture: required when source is 'tiny'")
        if self.source == "tiny" and self.path:
            # a checkpoint path next to source 'tiny' would be silently ignored (a random model trains)
            raise ValueError(
                f"path: {self.path!r} is set but source is 'tiny', which builds a random model and "
                "ignores path; set model.source=pretrained to train that checkpoint"
            )
        return self


class TokenizerConfig(Section):
    """Where the tokenizer (and its chat template) comes from."""

    source: Literal["tiny", "pretrained"] | None = Field(
        None,
        description="'tiny' = the offline byte-level BPE tokenizer; 'pretrained' = load from `path`. "
        "None = follow model.source.",
    )
    path: str | None = Field(None, description="Tokenizer directory or hub name; None = model.path.")
    chat_template: str | None = Field(
        None, description="Path to a Jinja chat template overriding the tokenizer's own; None = keep it."
    )
