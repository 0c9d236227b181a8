"""score_batch and TaskRouter: bounded concurrency, per-sample limits, failures that never escape."""

from __future__ import annotations

import threading
import time

import pytest
from kexaone_align.verifiers import FunctionVerifier, Sample, TaskRouter, VerifyResult, score_batch
from kexaone_align.verifiers import batch as batch_module
from kexaone_align.verifiers.batch import time_limit_of
from kexaone_align.verifiers.code import CodeVerifier, SandboxLimits

from kexaone_align.errors import KexaoneError


def _sample(task: str, response: str = "r", reference=None) -> Sample:
    return Sample(prompt="p", response=response, reference=reference, task=task)


def test_raising_and_hanging_verifiers_cost_only_their_sample(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def flaky(sample: Sample) -> float:
        if sample.response == "boom":
            raise RuntimeError("kaput")
        if sample.response == "hang":
            release.wait()  # sleeps "forever" until the test ends
        if sample.response == "nan":
            return float("nan")
        return 1.0

    verifier = FunctionVerifier("flaky", flaky)
    samples = [_sample("t", r) for r in ["ok", "boom", "hang", "ok", "nan", "ok"]]
    start = time.monotonic()
    try:
        result = score_batch(samples, verifier, max_workers=2, timeout_s=0.5)
    finally:
        release.set()
    assert time.monotonic() - start < 5
    assert result.rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert "kaput" in result.results[1].details["reason"] and result.results[1].details["error"]
    assert result.results[2].details["timeout"] is True
    assert result.errors == 2 and result.timeouts == 1
    assert result.per_task["t"].count == 6 and result.per_task["t"].mean_reward == pytest.approx(0.5)
    assert "timed out" in caplog.text and "kaput" in caplog.text


def test_concurrency_is_bounded() -> None:
    live, peak, lock = [0], [0], threading.Lock()

    def slow(sample: Sample) -> float:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return 0.5

    result = score_batch([_sample("t") for _ in range(12)], FunctionVerifier("slow", slow), max_workers=3)
    assert result.rewards == [0.5] * 12
    assert peak[0] == 3


def test_router_mixes_tasks_and_counts_unrouted() -> None:
    router = TaskRouter({"math": "math", "always": FunctionVerifier("one", lambda s: 1.0)})
    samples = [
        _sample("math", "\\boxed{2}", "2"),
        _sample("always"),
        _sample("poetry"),
        _sample("math", "\\boxed{3}", "2"),
    ]
    result = score_batch(samples, router, max_workers=4, timeout_s=30)
    assert result.rewards == [1.0, 1.0, 0.0, 0.0]
    assert result.unrouted == 1 and result.per_task["poetry"].unrouted == 1
    assert "no verifier for task 'poetry'" in result.results[2].details["reason"]
    assert result.per_task["math"].mean_reward == 0.5


def test_router_without_mapping_uses_registered_names_and_default() -> None:
    router = TaskRouter(
        default=FunctionVerifier("fallback", lambda s: VerifyResult(0.25, {"by": "fallback"}))
    )
    stem = _sample("stem", "The answer is (C).", "C")
    other = _sample("unknown-task")
    assert router.verify(stem).reward == 1.0
    assert router.verify(other).details == {"by": "fallback"}


def test_batch_is_deterministic() -> None:
    samples = [_sample("math", f"\\boxed{{{i}/4}}", str(i / 4)) for i in range(6)]
    a = score_batch(samples, "math", max_workers=3).rewards
    b = score_batch(samples, "math", max_workers=1).rewards
    assert a == b == [1.0] * 6


def test_bad_arguments_raise() -> None:
    with pytest.raises(KexaoneError):
        score_batch([], "math", max_workers=0)
    with pytest.raises(KexaoneError, match="no verifier named"):
        score_batch([_sample("t")], "not-a-verifier")


def test_router_and_builtins_pickle_for_ray_actors() -> None:
    import pickle

    from kexaone_align.verifiers import get_verifier

    router = TaskRouter({"math": "math", "stem": "choice"}, default="format")
    router.verify(_sample("stem", "Answer: A", "A"))  # builds and caches a verifier, holds a lock
    clone = pickle.loads(pickle.dumps(router))
    assert clone.verify(_sample("math", "\\boxed{0.5}", "1/2")).reward == 1.0
    for name in ("math", "ifeval", "format", "choice"):
        assert pickle.loads(pickle.dumps(get_verifier(name))).name == name


class _Declared:
    """A verifier that declares its own worst case per sample (reference = (limit, sleep))."""

    name = "declared"

    def time_limit_s(self, sample: Sample) -> float:
        return sample.reference[0]

    def verify(self, sample: Sample) -> VerifyResult:
        time.sleep(sample.reference[1])
        return VerifyResult(1.0, {})


def test_default_limits_come_from_the_verifiers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_module, "_GRACE_S", 0.2)
    samples = [_sample("t", reference=(0.5, 0.3)), _sample("t", reference=(0.05, 2.0))]
    result = score_batch(samples, _Declared(), max_workers=2)
    assert result.rewards == [1.0, 0.0]
    assert result.results[1].details["reason"] == "verifier timed out after 0.25s"
    # Through a router too; a verifier that declares nothing gets the 60 s default.
    router = TaskRouter({"t": _Declared()})
    assert time_limit_of(router, samples[0]) == 0.5
    assert time_limit_of(FunctionVerifier("plain", lambda s: 1.0), samples[0]) is None
    with pytest.raises(KexaoneError, match="auto"):
        score_batch(samples, _Declared(), timeout_s="soon")


def test_slow_program_verdict_is_kept_by_default() -> None:
    # Three stdin/stdout runs of ~1 s each: the code verifier's own worst case is far above any
    # fixed per-sample limit this short, and the default limit follows it.
    limits = SandboxLimits(cpu_s=2, wall_s=2, memory_mb=512)
    verifier = CodeVerifier(limits=limits)
    program = "```python\nimport time\ntime.sleep(1.0)\nprint(int(input()) * 2)\n```"
    ref = {"tests": [{"input": str(k), "output": str(2 * k)} for k in range(3)]}
    sample = Sample(prompt="p", response=program, reference=ref, task="code")
    assert verifier.time_limit_s(sample) > 3 * limits.wall_s
    kept = score_batch([sample], verifier)
    assert kept.rewards == [1.0] and kept.timeouts == 0
    cut = score_batch([sample], verifier, timeout_s=1.5)
    assert cut.rewards == [0.0] and cut.timeouts == 1
    # That sample's thread (and its sandbox) ran on, abandoned: let it end before other tests run.
    deadline = time.monotonic() + 30
    while any(t.name == "verify-0" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
