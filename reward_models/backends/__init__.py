"""Judge backends: an OpenAI-compatible HTTP client, a local transformers model, and its Ray actor."""

from kexaone_align.reward_models.backends.base import BackendError, JudgeBackend, Messages, complete_each
from kexaone_align.reward_models.backends.http import OpenAICompatibleBackend
from kexaone_align.reward_models.backends.local import TransformersJudgeBackend
from kexaone_align.reward_models.backends.ray_actor import RayJudgeBackend

from kexaone_align.errors import KexaoneError


def backend_from_settings(settings: dict) -> JudgeBackend:
    """A backend from plain settings (``backend`` ``openai`` with ``base_url`` and ``model``, or ``local``
    with a checkpoint path as ``model``; optional ``timeout_s`` and ``max_concurrency``), for code that
    receives its judge as data: a rollout worker (the recipe's ``tools.compress_judge``), ``envgen``."""
    kind = settings.get("backend")
    if kind == "openai":
        if not settings.get("base_url") or not settings.get("model"):
            raise KexaoneError("the 'openai' judge backend needs base_url and model")
        return OpenAICompatibleBackend(
            settings["base_url"], settings["model"], timeout_s=float(settings.get("timeout_s") or 60.0),
            max_concurrency=int(settings.get("max_concurrency") or 8),
        )  # fmt: skip
    if kind == "local":
        if not settings.get("model"):
            raise KexaoneError("the 'local' judge backend needs a checkpoint path as model")
        return TransformersJudgeBackend(settings["model"])
    raise KexaoneError(f"judge backend must be 'openai' or 'local', got {kind!r}")


__all__ = [
    "BackendError",
    "JudgeBackend",
    "Messages",
    "OpenAICompatibleBackend",
    "RayJudgeBackend",
    "TransformersJudgeBackend",
    "backend_from_settings",
    "complete_each",
]
