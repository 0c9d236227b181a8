"""The judge backend contract: chat messages in, generated text out.

A backend only generates; parsing, retries on bad judge text and timeouts per judgement belong to
``RubricJudge``. Backends that batch natively (a local model) set ``batched = True`` and implement
``complete_batch``; the judge then sends whole rounds at once instead of one request per thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

Messages = list[dict[str, str]]


class BackendError(RuntimeError):
    """A judge request failed for good (after the backend's own retries); ``retryable`` is advisory."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@runtime_checkable
class JudgeBackend(Protocol):
    """Anything that turns one chat into one completion."""

    def complete(self, messages: Messages, *, max_tokens: int, temperature: float) -> str: ...


def complete_each(
    backend: JudgeBackend, batch: Sequence[Messages], *, max_tokens: int, temperature: float
) -> list[str | Exception]:
    """Fallback ``complete_batch``: one call per conversation, an exception kept in place of its text."""
    out: list[str | Exception] = []
    for messages in batch:
        try:
            out.append(backend.complete(messages, max_tokens=max_tokens, temperature=temperature))
        except Exception as exc:  # one bad request must not sink the batch
            out.append(exc)
    return out
