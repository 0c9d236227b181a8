"""The ``math`` verifier: math-verify equivalence between the final answer and the reference string.

Rules: in reasoning mode only text after the last ``</think>`` is graded and an unclosed ``<think>``
scores 0; the final answer comes from ``\\boxed{}``, else "the answer is ..." phrases, else the last
line; a response stating several different final answers scores 0 (every stated answer must match).
Parsing and comparison run in ``math_pool`` worker processes, so a hung sympy call costs at most
``timeout_s`` seconds of the worker's CPU time (a wall-clock backstop of 10x that catches a stalled
worker) and is safe from threads. Workers warm math-verify up before taking requests, so the limit
counts the comparison itself, never a fresh worker's lazy imports and caches.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kexaone_align.verifiers.answer import final_answers, strip_reasoning, unique
from kexaone_align.verifiers.api import Sample, VerifyResult, register_verifier
from kexaone_align.verifiers.math_pool import (
    WALL_FACTOR,
    MathWorkerPool,
    WorkerError,
    WorkerTimeout,
    default_pool,
)

from kexaone_align.errors import KexaoneError

DEFAULT_TIMEOUT_S = float(os.environ.get("KEXAONE_MATH_TIMEOUT_S", "3"))
MAX_CANDIDATE_CHARS = 2_000
MAX_CANDIDATES = 8


def reference_answer(reference: Any) -> str:
    """The ground-truth answer as a string (dict references may hold it under ``answer``)."""
    if isinstance(reference, dict):
        for key in ("answer", "ground_truth", "solution", "reference"):
            if key in reference:
                reference = reference[key]
                break
    if isinstance(reference, bool) or reference is None:
        raise KexaoneError(f"math verifier needs the ground-truth answer as a string, got {reference!r}")
    if isinstance(reference, int | float):
        reference = repr(reference) if isinstance(reference, float) else str(reference)
    if not isinstance(reference, str) or not reference.strip():
        raise KexaoneError(f"math verifier needs a non-empty ground-truth answer string, got {reference!r}")
    return reference.strip()


def _norm(text: str) -> str:
    return "".join(text.split()).rstrip(".")


@register_verifier("math")
class MathVerifier:
    """Reward 1 when every final answer in the response is equivalent to the reference, else 0."""

    name = "math"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, pool: MathWorkerPool | None = None) -> None:
        self.timeout_s = timeout_s
        self._pool = pool

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes do not travel (e.g. to a Ray actor); the receiver uses its own default pool.
        return {"timeout_s": self.timeout_s, "_pool": None}

    def time_limit_s(self, sample: Sample) -> float:
        """Worst case of one ``verify``: a fresh worker's start-up plus the request's wall backstop."""
        pool = self._pool or default_pool()
        return pool.startup_timeout_s + self.timeout_s * WALL_FACTOR

    def verify(self, sample: Sample) -> VerifyResult:
        gold = reference_answer(sample.reference)
        stripped = strip_reasoning(sample.response, reasoning=sample.metadata.get("reasoning"))
        if stripped.answer is None:
            return VerifyResult(0.0, {"reason": stripped.reason})
        if not stripped.answer:
            return VerifyResult(0.0, {"reason": "empty answer after reasoning"})
        found, source = final_answers(stripped.answer)
        candidates = unique(found)
        details: dict[str, Any] = {"source": source, "answers": candidates}
        if not candidates:
            return VerifyResult(0.0, {**details, "reason": "no final answer found"})
        if len(candidates) > MAX_CANDIDATES:
            return VerifyResult(0.0, {**details, "reason": f"{len(candidates)} different final answers"})
        if any(len(c) > MAX_CANDIDATE_CHARS for c in candidates):
            return VerifyResult(0.0, {**details, "reason": "final answer longer than a final answer can be"})
        if all(_norm(c) == _norm(gold) for c in candidates):
            return VerifyResult(1.0, {**details, "reason": "exact match"})
        mode = {"boxed": "boxed", "answer_is": "phrase", "last_line": "raw"}[source]
        payload_cands = [{"text": c, "mode": mode} for c in candidates]
        if source == "last_line":
            payload_cands[0]["fallback"] = stripped.answer[-MAX_CANDIDATE_CHARS:]
        pool = self._pool or default_pool()
        start = time.monotonic()
        try:
            out = pool.call({"gold": gold, "candidates": payload_cands}, self.timeout_s)
        except WorkerTimeout:
            return VerifyResult(
                0.0,
                {**details, "reason": f"math-verify timed out after {self.timeout_s:g}s", "timeout": True},
            )
        except WorkerError as exc:
            return VerifyResult(0.0, {**details, "reason": f"math worker failed: {exc}", "error": str(exc)})
        details["elapsed_s"] = round(time.monotonic() - start, 4)
        if "error" in out:
            return VerifyResult(0.0, {**details, "reason": out["error"], "error": out["error"]})
        details.update(parsed=out["parsed"], gold_parsed=out["gold_parsed"], matched=out["matched"])
        matched = out["matched"]
        if all(matched):
            return VerifyResult(1.0, {**details, "reason": "equivalent"})
        if out.get("too_big"):
            return VerifyResult(0.0, {**details, "reason": "final answer too large to compute"})
        if len(candidates) > 1 and any(matched):
            return VerifyResult(0.0, {**details, "reason": "several different final answers"})
        return VerifyResult(0.0, {**details, "reason": "not equivalent to the reference"})
