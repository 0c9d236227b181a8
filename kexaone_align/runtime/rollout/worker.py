"""A rollout worker: one backend (hf or vllm) behind a Ray actor, plus the receiving end of weight sync.

The class is plain Python so it also runs in-process; :func:`remote_rollout_worker` wraps it in a
Ray actor only when asked, so importing this module never needs a Ray session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import RolloutBackend, RolloutRequest, RolloutSample, SamplingConfig

BACKENDS = ("hf", "vllm")


def make_backend(name: str, **kwargs: Any) -> RolloutBackend:
    """Build a rollout backend by recipe name: ``"hf"`` (transformers) or ``"vllm"``."""
    if name == "hf":
        from kexaone_align.runtime.rollout.hf import HFRolloutBackend

        return HFRolloutBackend(**kwargs)
    if name == "vllm":
        from kexaone_align.runtime.rollout.vllm import VLLMRolloutBackend

        return VLLMRolloutBackend(**kwargs)
    raise KexaoneError(f"unknown rollout backend {name!r}; expected one of {list(BACKENDS)}")


def generate_mixed(
    backend: RolloutBackend, requests: list[RolloutRequest], sampling: SamplingConfig
) -> list[RolloutSample]:
    """Single-turn requests straight to the backend, tool episodes through the episode driver; samples
    come back in request order either way."""
    from kexaone_align.runtime.rollout.episodes import is_episode, run_episodes

    episodic = [r for r in requests if is_episode(r)]
    if not episodic:
        return backend.generate(requests, sampling)
    plain = [r for r in requests if not is_episode(r)]
    by_id: dict[str, list[RolloutSample]] = {}
    plain_metrics: dict[str, float] = {}
    if plain:
        for s in backend.generate(plain, sampling):
            by_id.setdefault(s.request_id, []).append(s)
        plain_metrics = dict(getattr(backend, "last_metrics", {}))
    for s in run_episodes(backend, episodic, sampling):
        by_id.setdefault(s.request_id, []).append(s)
    if plain_metrics and hasattr(backend, "last_metrics"):  # one call's throughput: both parts added
        for key in ("rollout/samples", "rollout/generated_tokens", "rollout/seconds"):
            backend.last_metrics[key] = backend.last_metrics.get(key, 0.0) + plain_metrics.get(key, 0.0)
    return [s for r in requests for s in by_id.get(r.request_id, [])]


class RolloutWorker:
    """Holds one backend; every sample it returns carries the policy version that produced it."""

    def __init__(self, backend: str | RolloutBackend, **backend_kwargs: Any) -> None:
        self.backend_name = backend if isinstance(backend, str) else type(backend).__name__
        self.backend = make_backend(backend, **backend_kwargs) if isinstance(backend, str) else backend
        self._group: Any = None

    def ping(self) -> dict[str, Any]:
        """Liveness and identity: backend, current policy version, process id."""
        return {
            "backend": self.backend_name,
            "policy_version": self.backend.policy_version,
            "pid": os.getpid(),
        }

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[RolloutSample]:
        version = self.backend.policy_version
        samples = generate_mixed(self.backend, requests, sampling)
        for sample in samples:
            sample.policy_version = version
        return samples

    def metrics(self) -> dict[str, float]:
        """Throughput of the last ``generate`` call (tokens/s and friends)."""
        return dict(getattr(self.backend, "last_metrics", {}))

    def update_weights(
        self, version: int, named_tensors: Sequence[tuple[str, torch.Tensor]]
    ) -> dict[str, int]:
        """Load one bucket for ``version``; returns what was loaded so the sender can report GB/s."""
        bucket = list(named_tensors)
        self.backend.update_weights(version, bucket)
        return {"tensors": len(bucket), "bytes": sum(t.numel() * t.element_size() for _, t in bucket)}

    def finish_update(self, version: int) -> int:
        self.backend.finish_update(version)
        return self.backend.policy_version

    def release_memory(self) -> None:
        self.backend.release_memory()

    def resume(self) -> None:
        self.backend.resume()

    def logits(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Full-sequence logits from the backend (hf only), to check that a sync landed."""
        if not hasattr(self.backend, "logits"):
            raise KexaoneError(f"the {self.backend_name} backend does not expose logits")
        return self.backend.logits(token_ids)

    # -- collective weight-sync receiver -----------------------------------------------------------
    def sync_ranks(self, backend: str | None = None) -> int:
        """How many ranks this worker occupies in the weight-sync group (vLLM: one per TP rank).

        With ``backend`` it also refuses, before any rendezvous starts, a group it could not receive
        on: nccl needs the backend's weights on a CUDA device.
        """
        if backend == "nccl" and torch.device(getattr(self.backend, "device", "cuda")).type != "cuda":
            raise KexaoneError(
                f"the {self.backend_name} rollout worker holds its weights on "
                f"{getattr(self.backend, 'device', '?')}, so it cannot receive a nccl weight push; "
                "run the learners on CPU (gloo) or set rollout.weight_sync_transport=object_store"
            )
        return int(getattr(self.backend, "sync_ranks", lambda: 1)())

    def join_weight_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        """Join (or re-join, replacing the old one) the side group as ranks ``rank_offset..``."""
        if hasattr(self.backend, "join_weight_sync_group"):
            self.backend.join_weight_sync_group(host, port, rank_offset, world_size, backend)
            return
        from kexaone_align.runtime.weight_wire import open_sync_group

        self._group = None  # drop the old group before the rendezvous of the new one
        self._group = open_sync_group(host, port, rank_offset, world_size, backend)

    def receive_weights(self, version: int) -> dict[str, int]:
        """Receive one whole collective push (every bucket up to the end marker), load it and publish
        ``version``; returns ``{buckets, tensors, bytes}`` so the driver can check nothing was lost.

        A backend with its own ``receive_weights`` (vLLM: every TP rank receives inside the engine's
        worker processes) does it all itself. Otherwise this process receives and feeds the backend's
        ``update_weights``; a refused (stale) version is drained to the end before it is raised, so the
        sender and the other workers never block.
        """
        if hasattr(self.backend, "receive_weights"):
            result = self.backend.receive_weights(version)
            return dict(result) if isinstance(result, dict) else {}
        from kexaone_align.runtime.weight_wire import receive_into

        if self._group is None:
            raise KexaoneError(
                "receive_weights called before join_weight_sync_group"
                + (
                    f" (the {self.backend_name} backend joined the group itself but has no receive_weights)"
                    if hasattr(self.backend, "join_weight_sync_group")
                    else ""
                )
            )
        device = getattr(self.backend, "device", "cpu")
        counts = receive_into(
            self._group, device, version, lambda bucket: self.backend.update_weights(version, bucket)
        )
        self.backend.finish_update(version)
        return counts


def remote_rollout_worker(
    backend: str,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    scheduling_strategy: Any = None,
    runtime_env: dict[str, Any] | None = None,
    **backend_kwargs: Any,
) -> Any:
    """Start a :class:`RolloutWorker` as a Ray actor (needs ``ray.init`` first); the resource options come
    from ``runtime.rollout.resources``."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    if runtime_env:
        options["runtime_env"] = runtime_env
    return ray.remote(RolloutWorker).options(**options).remote(backend, **backend_kwargs)
