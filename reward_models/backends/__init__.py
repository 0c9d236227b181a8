"""Judge backends: an OpenAI-compatible HTTP client, a local transformers model, and its Ray actor."""

from kexaone_align.reward_models.backends.base import BackendError, JudgeBackend, Messages, complete_each
from kexaone_align.reward_models.backends.http import OpenAICompatibleBackend
from kexaone_align.reward_models.backends.local import TransformersJudgeBackend
from kexaone_align.reward_models.backends.ray_actor import RayJudgeBackend

__all__ = [
    "BackendError",
    "JudgeBackend",
    "Messages",
    "OpenAICompatibleBackend",
    "RayJudgeBackend",
    "TransformersJudgeBackend",
    "complete_each",
]
