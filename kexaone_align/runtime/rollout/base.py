"""The rollout contract shared by every backend: requests in, samples with log-probs and a version out.

AGAPO's importance ratio divides the learner's token probability by the probability the token was
*actually sampled with*, so a backend must report log-probs under the processed distribution
(after temperature and top-p), and tag every sample with the policy version that produced it.

Weight updates are two-phase so a learner can stream its parameters in buckets without ever
holding the full model twice: call ``update_weights(version, bucket)`` once per bucket (all with
the same ``version``), then ``finish_update(version)`` to publish the new version. Until
``finish_update`` returns, ``policy_version`` still reports the previous version. A ``version``
that is not greater than the current one is refused (a stale push).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from kexaone_align.errors import KexaoneError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: the paper's defaults are temperature 1.0 and top-p 0.95 (top-k off).

    Order, as in vLLM: temperature, then top-k, then top-p on the top-k renormalised distribution.
    The model's eos always stops a sample; ``stop_token_ids`` adds more stop tokens.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise KexaoneError(f"sampling.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KexaoneError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise KexaoneError(f"sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise KexaoneError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def from_recipe(
        cls, rollout: Any, *, stop_token_ids: Iterable[int] = (), seed: int = 0
    ) -> SamplingConfig:
        """From the recipe's ``rollout`` section (its temperature, top_p, top_k and max_new_tokens)."""
        return cls(
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            stop_token_ids=tuple(stop_token_ids),
            seed=seed,
        )


@dataclass
class RolloutRequest:
    """One prompt to sample ``num_samples`` responses for (a GRPO/AGAPO group)."""

    request_id: str
    prompt_token_ids: list[int]
    num_samples: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)
    # A tighter token budget than ``SamplingConfig.max_new_tokens`` (a multi-turn episode's later turns).
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise KexaoneError(f"rollout request {self.request_id!r}: max_new_tokens must be >= 1")
        if not self.prompt_token_ids:
            raise KexaoneError(f"rollout request {self.request_id!r} has an empty prompt")
        if self.num_samples < 1:
            raise KexaoneError(f"rollout request {self.request_id!r}: num_samples must be >= 1")


@dataclass
class RolloutSample:
    """One sampled response; ``logprobs[i]`` is the processed log-prob of ``token_ids[i]``.

    A multi-turn tool episode interleaves policy tokens with environment tokens (tool results, turn
    headers): ``policy_mask[i]`` is 1 where the policy sampled ``token_ids[i]`` (only those carry a
    rollout log-prob and loss) and 0 for environment tokens (log-prob 0.0, context only). ``None``
    means every token is the policy's (a single-turn sample).
    """

    request_id: str
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    policy_mask: list[int] | None = None


def effective_max_new_tokens(request: RolloutRequest, sampling: SamplingConfig) -> int:
    """A request's token budget: its own ``max_new_tokens`` when tighter than the sampling config's."""
    if request.max_new_tokens is None:
        return sampling.max_new_tokens
    return min(request.max_new_tokens, sampling.max_new_tokens)


@runtime_checkable
class RolloutBackend(Protocol):
    """What the stage loops need from a rollout engine (hf or vllm)."""

    @property
    def policy_version(self) -> int: ...

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[RolloutSample]: ...

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def finish_update(self, version: int) -> None: ...

    def release_memory(self) -> None: ...

    def resume(self) -> None: ...


class VersionTracker:
    """The two-phase version bookkeeping every backend shares (stale pushes are refused)."""

    def __init__(self, version: int = 0) -> None:
        self.current = version
        self.pending: int | None = None

    def begin(self, version: int) -> None:
        """Accept a bucket of ``version``; refuse versions that are not newer than the current one."""
        if version <= self.current:
            raise KexaoneError(
                f"stale weight update: version {version} is not newer than the rollout policy "
                f"version {self.current}"
            )
        if self.pending is not None and self.pending != version:
            raise KexaoneError(
                f"weight update for version {version} started while version {self.pending} "
                "is still being received; call finish_update first"
            )
        self.pending = version

    def finish(self, version: int) -> None:
        """Publish ``version``; it must be the one whose buckets were received."""
        if self.pending != version:
            raise KexaoneError(
                f"finish_update({version}) without matching update_weights (pending: {self.pending})"
            )
        self.current = version
        self.pending = None


def expand_requests(requests: list[RolloutRequest]) -> list[tuple[RolloutRequest, int]]:
    """Flatten requests into (request, sample_index) rows, refusing duplicate request ids."""
    seen: set[str] = set()
    rows: list[tuple[RolloutRequest, int]] = []
    for req in requests:
        if req.request_id in seen:
            raise KexaoneError(f"duplicate rollout request_id {req.request_id!r}")
        seen.add(req.request_id)
        rows.extend((req, i) for i in range(req.num_samples))
    return rows


def rollout_metrics(samples: list[RolloutSample], seconds: float) -> dict[str, float]:
    """Throughput of one ``generate`` call, in the metric names every backend reports."""
    n_tokens = sum(len(s.token_ids) for s in samples)
    return {
        "rollout/samples": float(len(samples)),
        "rollout/generated_tokens": float(n_tokens),
        "rollout/seconds": seconds,
        "rollout/tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
    }
