"""Rubric-based generative reward: an LLM judge scores a response on weighted rubric dimensions.

The reward is the weighted mean of the dimension scores, each mapped from the rubric scale to [0, 1].
A judge must never stop a training step: garbled text is a counted parse failure and is retried, a call
that exceeds ``timeout_s`` (wall clock, whatever the backend) is counted and retried, a backend error is
counted and retried unless it is permanent; when attempts run out the reward is 0 and ``details`` says
why (``details["failed"] = True``). ``stats`` keeps the counts so a stage can log them or stop when the
failure rate says the judge is misconfigured.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kexaone_align.reward_models.backends.base import BackendError, JudgeBackend, Messages
from kexaone_align.reward_models.parsing import ParseFailure, parse_scores
from kexaone_align.reward_models.rubric import Rubric, load_rubric
from kexaone_align.verifiers.api import Sample, VerifyResult

from kexaone_align.errors import KexaoneError

log = logging.getLogger(__name__)
T = TypeVar("T")
_RAW_EXCERPT = 500


class JudgeTimeout(TimeoutError):
    """One judge call ran past the judge's ``timeout_s``."""


@dataclass
class JudgeStats:
    """Counters over the judge's lifetime (thread-safe). ``failures`` are samples that got reward 0."""

    judged: int = 0
    requests: int = 0
    parse_failures: int = 0
    timeouts: int = 0
    backend_errors: int = 0
    retries: int = 0
    partial: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                setattr(self, key, getattr(self, key) + n)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "_lock"}
        out["failure_rate"] = out["failures"] / out["judged"] if out["judged"] else 0.0
        return out


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` in a daemon thread and give up waiting after ``timeout_s``.

    A blocked backend call cannot be interrupted from Python; the abandoned thread finishes on its own
    (the HTTP backend's own timeout bounds it) and its result is dropped.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="judge-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise JudgeTimeout(f"judge call timed out after {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class RubricJudge:
    """Scores samples against a rubric with an LLM; usable wherever a ``Verifier`` is (``verify``)."""

    def __init__(
        self,
        backend: JudgeBackend,
        rubric: Rubric | str | Path,
        *,
        retries: int = 2,
        timeout_s: float = 120.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        retry_temperature: float | None = None,
        min_coverage: float = 0.5,
        max_concurrency: int | None = None,
        name: str | None = None,
    ) -> None:
        if retries < 0:
            raise KexaoneError(f"judge retries must be >= 0, got {retries}")
        if not timeout_s > 0:
            raise KexaoneError(f"judge timeout_s must be > 0, got {timeout_s}")
        if not 0.0 < min_coverage <= 1.0:
            raise KexaoneError(f"judge min_coverage must be in (0, 1], got {min_coverage}")
        if not callable(getattr(backend, "complete", None)):
            raise KexaoneError(f"judge backend {backend!r} has no complete(messages, ...) method")
        self.backend = backend
        self.rubric = rubric if isinstance(rubric, Rubric) else load_rubric(rubric)
        self.retries = int(retries)
        self.timeout_s = float(timeout_s)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.retry_temperature = retry_temperature
        self.min_coverage = float(min_coverage)
        self.max_concurrency = int(max_concurrency or getattr(backend, "max_concurrency", 8))
        self.name = name or f"judge:{self.rubric.name}"
        self.stats = JudgeStats()

    # -- public -----------------------------------------------------------------------------------------
    def messages(self, sample: Sample) -> Messages:
        """What the judge is sent for ``sample``."""
        return self.rubric.render(sample.prompt, sample.response, sample.reference)

    def score(self, sample: Sample) -> VerifyResult:
        """The rubric reward for one sample; never raises for judge trouble."""
        messages = self.messages(sample)
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.add(retries=1)
            temperature = self._temperature(attempt)
            try:
                self.stats.add(requests=1)
                text = call_with_timeout(
                    lambda t=temperature: self.backend.complete(
                        messages, max_tokens=self.max_tokens, temperature=t
                    ),
                    self.timeout_s,
                )
            except Exception as exc:
                if not self._record_call_error(exc, errors):
                    break
                continue
            result = self._parse(text, attempt + 1, errors)
            if result is not None:
                return result
        return self._failed(len(errors), errors)

    def score_batch(self, samples: Sequence[Sample]) -> list[VerifyResult]:
        """Rewards in order: whole rounds for batching backends, else ``max_concurrency`` threads."""
        if not samples:
            return []
        if getattr(self.backend, "batched", False) and callable(
            getattr(self.backend, "complete_batch", None)
        ):
            return self._score_rounds(samples)
        with ThreadPoolExecutor(min(self.max_concurrency, len(samples)), thread_name_prefix="judge") as pool:
            return list(pool.map(self.score, samples))

    def verify(self, sample: Sample) -> VerifyResult:
        return self.score(sample)

    def __repr__(self) -> str:
        return f"RubricJudge({self.name!r}, rubric={self.rubric.name!r}, backend={self.backend!r})"

    # -- internals --------------------------------------------------------------------------------------
    def _temperature(self, attempt: int) -> float:
        if attempt and self.retry_temperature is not None:
            return float(self.retry_temperature)
        return self.temperature

    def _score_rounds(self, samples: Sequence[Sample]) -> list[VerifyResult]:
        """Batched backends: each round sends every sample still unscored in one ``complete_batch``.

        The wall-clock limit of a round is ``timeout_s`` per ``max_batch_size`` chunk of the round.
        """
        messages = [self.messages(s) for s in samples]
        results: list[VerifyResult | None] = [None] * len(samples)
        errors: list[list[str]] = [[] for _ in samples]
        pending = list(range(len(samples)))
        chunk = max(1, int(getattr(self.backend, "max_batch_size", len(samples)) or len(samples)))
        for attempt in range(self.retries + 1):
            if not pending:
                break
            if attempt:
                self.stats.add(retries=len(pending))
            self.stats.add(requests=len(pending))
            batch = [messages[i] for i in pending]
            temperature = self._temperature(attempt)
            deadline = self.timeout_s * math.ceil(len(batch) / chunk)
            try:
                texts: list[str | Exception] = call_with_timeout(
                    lambda b=batch, t=temperature: self.backend.complete_batch(  # type: ignore[attr-defined]
                        b, max_tokens=self.max_tokens, temperature=t
                    ),
                    deadline,
                )
                if len(texts) != len(batch):
                    raise BackendError(f"backend returned {len(texts)} completions for {len(batch)} chats")
            except Exception as exc:
                texts = [exc] * len(batch)
            still: list[int] = []
            for i, text in zip(pending, texts, strict=True):
                if isinstance(text, Exception):
                    if self._record_call_error(text, errors[i]):
                        still.append(i)
                    continue
                results[i] = self._parse(text, attempt + 1, errors[i])
                if results[i] is None:
                    still.append(i)
            pending = still
        return [
            r if r is not None else self._failed(len(errors[i]), errors[i]) for i, r in enumerate(results)
        ]

    def _record_call_error(self, exc: Exception, errors: list[str]) -> bool:
        """Count a failed call; returns whether another attempt makes sense."""
        if isinstance(exc, JudgeTimeout):
            self.stats.add(timeouts=1)
            errors.append(f"timeout: {exc}")
            return True
        self.stats.add(backend_errors=1)
        errors.append(f"backend_error: {type(exc).__name__}: {exc}")
        return not (isinstance(exc, BackendError) and not exc.retryable)

    def _parse(self, text: Any, attempts: int, errors: list[str]) -> VerifyResult | None:
        try:
            parsed = parse_scores(text, self.rubric, min_coverage=self.min_coverage)
        except ParseFailure as exc:
            self.stats.add(parse_failures=1)
            errors.append(f"parse_failure: {exc.reason}")
            return None
        self.stats.add(judged=1, partial=int(bool(parsed.missing)))
        return VerifyResult(
            reward=parsed.reward,
            details={
                "judge": self.name,
                "rubric": self.rubric.name,
                "scores": parsed.scores,
                "missing": parsed.missing,
                "out_of_range": parsed.out_of_range,
                "coverage": parsed.coverage,
                "attempts": attempts,
                "raw": text[:_RAW_EXCERPT],
            },
        )

    def _failed(self, attempts: int, errors: list[str]) -> VerifyResult:
        self.stats.add(judged=1, failures=1)
        reason = errors[-1] if errors else "no attempt was made"
        log.warning("%s gave reward 0 after %d attempt(s): %s", self.name, attempts, reason)
        return VerifyResult(
            reward=0.0,
            details={
                "judge": self.name,
                "rubric": self.rubric.name,
                "failed": True,
                "reason": reason,
                "errors": errors,
                "attempts": attempts,
            },
        )


__all__ = ["JudgeStats", "JudgeTimeout", "RubricJudge", "call_with_timeout"]
