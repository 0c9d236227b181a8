"""Rollouts with plain transformers: batched, KV-cached, with our own sampling loop.

We do not call ``model.generate`` because we need, for every sampled token, its log-prob under the
exact distribution it was drawn from (temperature, then top-p, renormalised), and per-sample random
streams so that a sample does not change when the batch around it changes. Prompts are left-padded;
position ids are computed from the attention mask so padded and unpadded rows see the same RoPE
positions.

Rows that finished (stop token or budget) are dropped from the decode batch, KV cache included, once
a ``compact_fraction`` share of the rows still being decoded has finished; until then they are fed a
pad token whose result is discarded. Every row decodes in lockstep, so a row's step index stays the
index of its own next token and random number.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from kexaone_align.errors import KexaoneError
from kexaone_align.models.attention import use_gqa_sdpa
from kexaone_align.models.loading import load_policy
from kexaone_align.runtime.rollout.base import (
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    VersionTracker,
    effective_max_new_tokens,
    expand_requests,
    rollout_metrics,
)
from kexaone_align.runtime.rollout.sampling import (
    draw_tokens,
    model_logprobs,
    processed_logprobs,
    sample_seed,
)

# Drop finished rows from the decode batch once this share of it has finished (see _generate_batch).
COMPACT_FRACTION = 0.1


def load_named_tensors(
    targets: dict[str, torch.Tensor], named_tensors: Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Copy tensors into a model's state dict in place (names may carry a DeepSpeed ``module.`` prefix)."""
    count = 0
    with torch.no_grad():
        for name, tensor in named_tensors:
            key = name.removeprefix("module.")
            target = targets.get(key)
            if target is None:
                raise KexaoneError(f"weight update names unknown parameter {name!r}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise KexaoneError(
                    f"weight update for {name!r} has shape {tuple(tensor.shape)}, "
                    f"the rollout model expects {tuple(target.shape)}"
                )
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            count += 1
    return count


class HFRolloutBackend:
    """A :class:`RolloutBackend` on transformers, for CPU runs, tests and small GPU jobs."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 16,
        initial_version: int = 0,
        compact_fraction: float | None = COMPACT_FRACTION,
    ) -> None:
        model = load_policy(model_path, dtype=dtype)
        if torch.device(device).type == "cpu":
            use_gqa_sdpa(model)  # its own copy: decode without copying K/V heads (models/attention.py)
        self._setup(model, device=device, max_batch_size=max_batch_size, initial_version=initial_version,
                    compact_fraction=compact_fraction)  # fmt: skip

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        *,
        device: str = "cpu",
        max_batch_size: int = 16,
        initial_version: int = 0,
        compact_fraction: float | None = COMPACT_FRACTION,
    ) -> HFRolloutBackend:
        """Wrap an already-built model (tests, or a colocated learner's copy)."""
        self = cls.__new__(cls)
        self._setup(model, device=device, max_batch_size=max_batch_size, initial_version=initial_version,
                    compact_fraction=compact_fraction)  # fmt: skip
        return self

    def _setup(
        self,
        model: PreTrainedModel,
        *,
        device: str,
        max_batch_size: int,
        initial_version: int,
        compact_fraction: float | None,
    ) -> None:
        if max_batch_size < 1:
            raise KexaoneError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if compact_fraction is not None and not 0.0 < compact_fraction < 1.0:
            raise KexaoneError(f"compact_fraction must be in (0, 1) or None, got {compact_fraction}")
        # None: never drop finished rows (they decode pad tokens until the whole batch stops)
        self.compact_fraction = compact_fraction
        self.decode_row_steps = 0  # rows x forward passes of the last generate call (prefill excluded)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.max_batch_size = max_batch_size
        self._versions = VersionTracker(initial_version)
        self._targets = self.model.state_dict()
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = getattr(self.model.generation_config, "eos_token_id", None) or cfg.eos_token_id
        if eos is None:
            eos = []
        self.default_stop_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        self.last_metrics: dict[str, float] = {}

    # -- RolloutBackend ---------------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self._versions.current

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[RolloutSample]:
        """Sample every request ``num_samples`` times; order follows the requests, then sample index."""
        rows = expand_requests(requests)
        for req in requests:
            bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise KexaoneError(
                    f"rollout request {req.request_id!r} has token ids outside the vocabulary "
                    f"(size {self.vocab_size}): {bad[:5]}"
                )
        stop = set(self.default_stop_token_ids) | set(sampling.stop_token_ids)
        start = time.perf_counter()
        self.decode_row_steps = 0
        samples: list[RolloutSample] = []
        for lo in range(0, len(rows), self.max_batch_size):
            samples.extend(self._generate_batch(rows[lo : lo + self.max_batch_size], sampling, stop))
        seconds = time.perf_counter() - start
        self.last_metrics = rollout_metrics(samples, seconds)
        return samples

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of weights for ``version``; publish it with :meth:`finish_update`."""
        self._versions.begin(version)
        load_named_tensors(self._targets, named_tensors)

    def finish_update(self, version: int) -> None:
        """Publish ``version``: samples generated from now on carry it."""
        self._versions.finish(version)

    def release_memory(self) -> None:
        """Colocated mode: hand the accelerator back to the learners (no-op on CPU)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            self._targets = self.model.state_dict()  # drop our references to the device copies
            torch.cuda.empty_cache()

    def resume(self) -> None:
        """Colocated mode: move the weights back to the accelerator (no-op on CPU)."""
        if self.device.type != "cpu":
            self.model.to(self.device)
            self._targets = self.model.state_dict()

    # -- helpers ----------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Full-sequence float32 logits for equal-length sequences (used to check weight sync)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits.float().cpu()

    @torch.no_grad()
    def _generate_batch(
        self, rows: list[tuple[RolloutRequest, int]], sampling: SamplingConfig, stop: set[int]
    ) -> list[RolloutSample]:
        batch = len(rows)
        width = max(len(req.prompt_token_ids) for req, _ in rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (req, _) in enumerate(rows):
            n = len(req.prompt_token_ids)
            input_ids[i, width - n :] = torch.tensor(req.prompt_token_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # every random number a sample will use, drawn up front from its own seeded generator
        uniforms = torch.stack(
            [
                torch.rand(
                    sampling.max_new_tokens,
                    generator=torch.Generator().manual_seed(sample_seed(sampling.seed, req.request_id, idx)),
                )
                for req, idx in rows
            ]
        ).to(self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = positions[:, -1:] + 1
        budgets = [effective_max_new_tokens(req, sampling) for req, _ in rows]
        tokens: list[list[int]] = [[] for _ in rows]
        logps: list[list[float]] = [[] for _ in rows]
        reasons: list[Any] = [None] * batch
        live = list(range(batch))  # the row of `rows` behind each row of the decode batch
        for step in range(sampling.max_new_tokens):
            logits = out.logits[:, -1, :]
            logp = processed_logprobs(logits, sampling.temperature, sampling.top_p, sampling.top_k)
            drawn = draw_tokens(logp.exp(), uniforms[:, step])
            if sampling.logprobs == "model_at_temperature":  # report the untruncated softmax at T
                logp = model_logprobs(logits, sampling.temperature)
            drawn_logp = logp.gather(1, drawn[:, None]).squeeze(1)
            chosen = []
            for i, tok, tok_logp in zip(live, drawn.tolist(), drawn_logp.tolist(), strict=True):
                if reasons[i] is not None:
                    chosen.append(self.pad_token_id)
                    continue
                tokens[i].append(tok)
                logps[i].append(tok_logp)
                if tok in stop:
                    reasons[i] = "stop"
                elif len(tokens[i]) >= budgets[i]:
                    reasons[i] = "length"
                chosen.append(tok)
            keep = [j for j, i in enumerate(live) if reasons[i] is None]
            if not keep:
                break
            done = len(live) - len(keep)
            if self.compact_fraction is not None and done and done >= self.compact_fraction * len(live):
                # drop the finished rows: KV cache (full and sliding-window layers), mask, positions, uniforms
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, uniforms = mask[index], next_pos[index], uniforms[index]
                live, chosen = [live[j] for j in keep], [chosen[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
            self.decode_row_steps += len(live)
            out = self.model(
                input_ids=torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
        version = self.policy_version
        return [
            RolloutSample(
                request_id=req.request_id,
                sample_index=idx,
                prompt_token_ids=list(req.prompt_token_ids),
                token_ids=tokens[i],
                logprobs=logps[i],
                finish_reason=reasons[i],
                policy_version=version,
                metadata=dict(req.metadata),
            )
            for i, (req, idx) in enumerate(rows)
        ]
