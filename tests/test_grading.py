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


class CountingVerifier:
    """Scores 1 on 'ok' and remembers every response it was asked to grade."""

    name = "count"

    def __init__(self):
        self.seen = []

    def verify(self, sample):
        self.seen.append(sample.response)
        return VerifyResult(1.0 if sample.response == "ok" else 0.0)


def test_equal_content_is_graded_once_and_every_key_gets_its_reward():
    verifier = CountingVerifier()
    grader = StreamingGrader(TaskRouter({"t": verifier}), backend="local", num_workers=1, timeout_s=30.0)
    responses = ["ok", "no", "ok", "ok", "no"]
    samples = [Sample("q", r, None, "t") for r in responses]
    keys = [("r", i) for i in range(5)]
    grader.submit(keys, samples, content=[(0, r) for r in responses])
    rewards, metrics = grader.wait()
    assert [rewards[k] for k in keys] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert sorted(verifier.seen) == ["no", "ok"]  # each distinct response graded once
    assert metrics["grading/duplicates"] == 3.0
    # the same text for another prompt row is other content: graded again, nothing carried over
    grader.submit([("s", 0), ("s", 1)], [samples[0], samples[2]], content=[(1, "ok"), (2, "ok")])
    rewards, metrics = grader.wait()
    assert rewards == {("s", 0): 1.0, ("s", 1): 1.0} and metrics["grading/duplicates"] == 0.0
    assert len(verifier.seen) == 4


def test_deduplicated_ray_grading_equals_driver_grading(ray_local):
    samples = math_samples(6)
    doubled = samples + samples  # every sample twice, as two responses of one group that agree
    router = TaskRouter({"math": "math"})
    want = score_batch(doubled, router, max_workers=1, timeout_s=30).rewards
    grader = StreamingGrader(router, num_workers=2, chunk_size=2, timeout_s=30.0)
    try:
        grader.submit(list(range(12)), doubled, content=[i % 6 for i in range(12)])
        rewards, metrics = grader.wait()
        assert [rewards[i] for i in range(12)] == want and 0 < sum(want) < 12
        assert metrics["grading/duplicates"] == 6.0
    finally:
        grader.close()


def test_content_must_match_the_samples():
    grader = StreamingGrader(None, backend="local")
    with pytest.raises(KexaoneError, match="2 keys"):
        grader.submit([0, 1], [Sample("q", "a", None, "t")] * 2, content=[0])


def test_wait_returns_when_grading_is_done_not_at_the_next_poll(ray_local):
    """The harvest thread is woken by ``submit``: back-to-back steps of 8 samples each came back in
    0.5 s (the thread's poll) before it was, against ~0.04 s here."""
    samples = math_samples(8)
    grader = StreamingGrader(TaskRouter({"math": "math"}), num_workers=2, chunk_size=4, timeout_s=30.0)
    try:
        grader.grade(samples)  # start the grading actors
        times = []
        for _ in range(5):
            started = time.perf_counter()
            grader.submit(list(range(8)), samples)
            grader.wait()
            times.append(time.perf_counter() - started)
        assert sorted(times)[2] < 0.3, times
    finally:
        grader.close()
