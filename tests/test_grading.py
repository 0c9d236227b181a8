"""Streaming grading: Ray tasks started as samples arrive give the same rewards as grading in the driver."""

import sys
import time

import pytest
from kexaone_align.verifiers import Sample, TaskRouter, VerifyResult, score_batch
from ray import cloudpickle

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.grading import StreamingGrader

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module


class SlowVerifier:
    """Sleeps on 'slow' responses (longer than the test's limit), scores 1 on 'ok'."""

    name = "slow"

    def verify(self, sample):
        if sample.response == "slow":
            time.sleep(5.0)
        return VerifyResult(1.0 if sample.response == "ok" else 0.0)


def math_samples(n):
    return [
        Sample(f"q{i}", f"<think>.</think> \\boxed{{{i if i % 3 else i + 1}}}", str(i), "math")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_streamed_ray_grading_equals_driver_grading(ray_local):
    samples = math_samples(20)
    router = TaskRouter({"math": "math"})
    want = score_batch(samples, router, max_workers=2, timeout_s=30).rewards
    grader = StreamingGrader(router, num_workers=3, chunk_size=3, timeout_s=30.0)
    try:
        grader.submit([("a", i) for i in range(12)], samples[:12])  # one worker's samples arrive
        grader.submit([("b", i) for i in range(8)], samples[12:])  # then another's
        rewards, metrics = grader.wait()
        assert [rewards[("a", i)] for i in range(12)] + [rewards[("b", i)] for i in range(8)] == want
        assert 0 < sum(want) < len(want)  # some right, some wrong: the comparison means something
        assert metrics["grading/failed_tasks"] == 0.0 and metrics["grading/tail_s"] >= 0.0
        assert grader.wait()[0] == {}  # emptied
        assert grader.grade(samples[:4]) == want[:4]  # the blocking form (held-out evaluation)
    finally:
        grader.close()


def test_grading_limits_each_sample(ray_local):
    router = TaskRouter({"t": SlowVerifier()})
    samples = [Sample("q", r, None, "t") for r in ("ok", "slow", "no", "ok")]
    grader = StreamingGrader(router, num_workers=2, chunk_size=2, timeout_s=0.5)
    try:
        started = time.perf_counter()
        assert grader.grade(samples) == [1.0, 0.0, 0.0, 1.0]  # the slow one is cut off and scores 0
        assert time.perf_counter() - started < 4.5
    finally:
        grader.close()


def test_local_backend_is_the_driver_path():
    samples = math_samples(6)
    router = TaskRouter({"math": "math"})
    grader = StreamingGrader(router, backend="local", num_workers=2, timeout_s=30.0)
    assert grader.grade(samples) == score_batch(samples, router, max_workers=1, timeout_s=30).rewards


def test_bad_grading_settings_are_named():
    with pytest.raises(KexaoneError, match="backend"):
        StreamingGrader(None, backend="threads")
    with pytest.raises(KexaoneError, match="num_workers"):
        StreamingGrader(None, num_workers=0)
    with pytest.raises(KexaoneError, match="timeout_s"):
        StreamingGrader(None, timeout_s=0)
