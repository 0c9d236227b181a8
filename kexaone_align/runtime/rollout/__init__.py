"""Rollout workers: one interface (``RolloutBackend``), ``hf`` and ``vllm`` backends chosen by name."""

from kexaone_align.runtime.rollout.base import (
    RolloutBackend,
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
)
from kexaone_align.runtime.rollout.worker import RolloutWorker, make_backend, remote_rollout_worker

__all__ = [
    "RolloutBackend",
    "RolloutRequest",
    "RolloutSample",
    "RolloutWorker",
    "SamplingConfig",
    "make_backend",
    "remote_rollout_worker",
]
