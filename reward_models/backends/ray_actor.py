"""``TransformersJudgeBackend`` inside a Ray actor, so a judge can own its own GPU(s) next to the trainer.

``ray`` is imported only when the actor is first needed: importing the reward-model package (for a rule
reward or the HTTP judge) must not pull Ray in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kexaone_align.reward_models.backends.base import BackendError, Messages

from kexaone_align.errors import MissingExtraError


class RayJudgeBackend:
    """Same interface as ``TransformersJudgeBackend``; calls go to one actor that loads the model itself."""

    batched = True

    def __init__(
        self,
        model_path: str | Path,
        tokenizer_path: str | Path | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        actor_options: dict[str, Any] | None = None,
        call_timeout_s: float | None = None,
        **backend_kwargs: Any,
    ) -> None:
        self.model_path = str(model_path)
        self.tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(actor_options or {})}
        self.call_timeout_s = call_timeout_s
        self.backend_kwargs = backend_kwargs
        self._actor: Any = None

    def _get_actor(self) -> Any:
        if self._actor is None:
            try:
                import ray
            except ImportError:
                raise MissingExtraError("ray", "default", "The Ray judge backend") from None
            from kexaone_align.reward_models.backends.local import TransformersJudgeBackend

            if not ray.is_initialized():
                ray.init(ignore_reinit_error=True, log_to_driver=False)
            actor_cls = ray.remote(TransformersJudgeBackend)
            self._actor = actor_cls.options(**self.options).remote(
                self.model_path, self.tokenizer_path, **self.backend_kwargs
            )
        return self._actor

    def complete_batch(
        self, batch: Sequence[Messages], *, max_tokens: int = 512, temperature: float = 0.0
    ) -> list[str | Exception]:
        import ray

        ref = self._get_actor().complete_batch.remote(
            list(batch), max_tokens=max_tokens, temperature=temperature
        )
        try:
            return ray.get(ref, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise BackendError(f"the Ray judge actor did not answer within {self.call_timeout_s}s") from None
        except ray.exceptions.RayError as exc:
            raise BackendError(f"the Ray judge actor failed: {exc}") from None

    def complete(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        out = self.complete_batch([messages], max_tokens=max_tokens, temperature=temperature)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        """Kill the actor (frees its GPU); the next call starts a new one."""
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None
