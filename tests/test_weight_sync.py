"""Versioned weight sync: after a push the rollout backend's logits equal the source model's exactly."""

from __future__ import annotations

import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig
from kexaone_align.runtime.rollout.hf import HFRolloutBackend
from kexaone_align.runtime.rollout.tiny import tiny_exaone_moe
from kexaone_align.runtime.weight_sync import WeightSync
from kexaone_align.runtime.weight_wire import bucket_nbytes, bucketize, flatten_bucket, unflatten_bucket

PROBE = [[1, 9, 33, 70, 4, 200, 17, 3, 88, 91, 5, 6]]  # longer than the sliding window


def trained(seed: int = 0) -> torch.nn.Module:
    """The tiny model after a (fake) optimizer step: every parameter changed."""
    model = tiny_exaone_moe(seed=0)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def source_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE), use_cache=False).logits.float()


def state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_bucketize_respects_size_and_order():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 50, 3, 3, 3])]
    buckets = list(bucketize(tensors, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert all(bucket_nbytes(b) <= 200 for b in buckets)
    with pytest.raises(KexaoneError, match="bucket_bytes"):
        list(bucketize(tensors, 0))


def test_flat_buffer_roundtrip_mixed_dtypes():
    bucket = [
        ("a", torch.randn(3).to(torch.bfloat16)),  # 6 bytes: the next tensor must still be aligned
        ("b", torch.randn(2, 5)),
        ("c", torch.arange(7, dtype=torch.int64)),
        ("d", torch.randn(0)),
    ]
    flat, metas = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8
    back = unflatten_bucket(flat, metas)
    for (n1, t1), (n2, t2) in zip(bucket, back, strict=True):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_local_sync_makes_logits_equal_and_refuses_stale():
    source = trained()
    backend = HFRolloutBackend.from_model(tiny_exaone_moe(seed=0))
    assert not torch.allclose(backend.logits(PROBE), source_logits(source))
    sync = WeightSync([backend], transport="local")
    metrics = sync.push(1, bucketize(source.state_dict().items(), bucket_bytes=64 * 1024))
    assert torch.equal(backend.logits(PROBE), source_logits(source))
    assert backend.policy_version == 1
    samples = backend.generate([RolloutRequest("r", [1, 2, 3])], SamplingConfig(max_new_tokens=3))
    assert samples[0].policy_version == 1
    assert metrics.num_bytes == state_bytes(source) and metrics.num_buckets > 1
    assert metrics.as_dict()["weight_sync/gb_per_s"] > 0 and metrics.seconds > 0

    newer = trained(seed=1)
    with pytest.raises(KexaoneError, match="stale"):
        sync.push(1, bucketize(newer.state_dict().items(), 1 << 20))
    with pytest.raises(KexaoneError, match="stale"):
        backend.update_weights(0, list(newer.state_dict().items())[:1])
    assert torch.equal(backend.logits(PROBE), source_logits(source)), "a refused push must not change weights"


def test_bad_tensors_are_refused():
    backend = HFRolloutBackend.from_model(tiny_exaone_moe(seed=0))
    with pytest.raises(KexaoneError, match="unknown parameter"):
        backend.update_weights(1, [("model.not_a_layer.weight", torch.zeros(1))])
    with pytest.raises(KexaoneError, match="shape"):
        backend.update_weights(1, [("lm_head.weight", torch.zeros(3, 3))])
    with pytest.raises(KexaoneError, match="finish_update"):
        backend.finish_update(5)
    # DeepSpeed-style names are accepted
    backend.update_weights(1, [("module.lm_head.weight", torch.zeros_like(backend.model.lm_head.weight))])
    backend.finish_update(1)
    assert backend.model.lm_head.weight.abs().sum() == 0


def test_local_sync_to_several_backends_with_pending_version_guard():
    source = trained()
    a = HFRolloutBackend.from_model(tiny_exaone_moe(seed=0))
    b = HFRolloutBackend.from_model(tiny_exaone_moe(seed=0))
    WeightSync([a, b], transport="local").push(3, bucketize(source.state_dict().items(), 1 << 16))
    assert torch.equal(a.logits(PROBE), b.logits(PROBE))
    assert torch.equal(a.logits(PROBE), source_logits(source))
    a.update_weights(4, [])
    with pytest.raises(KexaoneError, match="still being received"):
        a.update_weights(5, [])


# -- the collective wire protocol, in one process: a gloo side group across threads ----------------
def _in_threads(*fns):
    """Run ``fns`` concurrently; return their results, or raise the first error (by position)."""
    import threading

    results, errors = [None] * len(fns), [None] * len(fns)

    def call(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # handed back to the test
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a member of the side group hung"
    return results, errors


@pytest.fixture(scope="module")
def side_group():
    """Rank 0 sends, ranks 1 and 2 receive; one group for the module (opening one costs ~0.1 s)."""
    from kexaone_align.runtime.weight_wire import free_port, open_sync_group

    port = free_port()
    groups, errors = _in_threads(
        *[lambda r=r: open_sync_group("127.0.0.1", port, r, 3, "gloo", timeout_s=60) for r in range(3)]
    )
    assert errors == [None] * 3
    return groups


def test_broadcast_protocol_loads_drains_refuses_and_aborts(side_group):
    from kexaone_align.runtime.weight_wire import (
        BroadcastSender,
        broadcast_buckets,
        receive_buckets,
        receive_into,
    )

    sender, g1, g2 = side_group
    source = trained()
    backend = HFRolloutBackend.from_model(tiny_exaone_moe(seed=0))
    state = list(source.state_dict().items())
    buckets = list(bucketize(state, 64 * 1024))
    assert len(buckets) >= 10

    def load(version):
        return lambda: receive_into(g1, "cpu", version, lambda b: backend.update_weights(version, b))

    def first_then_close(version):  # a consumer that stops early: the rest must still be received
        def run():
            stream = receive_buckets(g2, "cpu", version=version)
            first = next(stream)
            stream.close()
            return [n for n, _ in first]

        return run

    (sent, counts, names), errors = _in_threads(
        lambda: broadcast_buckets(sender, iter(buckets), "cpu", version=1), load(1), first_then_close(1)
    )
    assert errors == [None] * 3
    backend.finish_update(1)
    assert sent == (state_bytes(source), len(state), len(buckets))
    assert counts == {"buckets": len(buckets), "tensors": len(state), "bytes": state_bytes(source)}
    assert names == [n for n, _ in buckets[0]]
    assert torch.equal(backend.logits(PROBE), source_logits(source))

    # a stale version: the receiver drains the whole push, then refuses; the sender is not blocked
    newer = trained(seed=1)
    (sent, _, _), errors = _in_threads(
        lambda: broadcast_buckets(sender, bucketize(newer.state_dict().items(), 64 * 1024), "cpu", version=1),
        load(1),
        lambda: list(receive_buckets(g2, "cpu", version=1)),
    )
    assert errors[0] is None and errors[2] is None and sent[2] == len(buckets)
    assert isinstance(errors[1], KexaoneError) and "stale" in str(errors[1])
    assert torch.equal(backend.logits(PROBE), source_logits(source)), "a refused push changed weights"

    # a version other than the one the receiver was told: drained, then refused
    _, errors = _in_threads(
        lambda: broadcast_buckets(sender, iter(buckets), "cpu", version=7),
        lambda: list(receive_buckets(g1, "cpu", version=8)),
        lambda: list(receive_buckets(g2, "cpu", version=7)),
    )
    assert errors[0] is None and errors[2] is None and "expected 8" in str(errors[1])

    # the producer fails mid-push (a learner's gather): both receivers are told, nobody hangs
    def failing():
        yield buckets[0]
        raise RuntimeError("gather failed")

    _, errors = _in_threads(
        lambda: broadcast_buckets(sender, failing(), "cpu", version=9),
        lambda: list(receive_buckets(g1, "cpu", version=9)),
        lambda: list(receive_buckets(g2, "cpu", version=9)),
    )
    assert isinstance(errors[0], RuntimeError)
    for err in errors[1:]:
        assert isinstance(err, KexaoneError) and "aborted the push of version 9" in str(err)
        assert "gather failed" in str(err)

    # the sender object refuses a stale version itself, after walking every bucket (the other learner
    # ranks are in the same ZeRO-3 gathers), and tells the receivers
    bs = BroadcastSender()
    bs.group, bs.last_version = sender, 5
    walked = []

    def walk():
        for b in buckets:
            walked.append(1)
            yield b

    _, errors = _in_threads(
        lambda: bs.send(5, walk()),
        lambda: list(receive_buckets(g1, "cpu", version=5)),
        lambda: list(receive_buckets(g2, "cpu", version=5)),
    )
    assert isinstance(errors[0], KexaoneError) and "stale" in str(errors[0])
    assert len(walked) == len(buckets)
    assert all("aborted" in str(e) and "stale" in str(e) for e in errors[1:])

    # and the group still works afterwards
    (sent, counts, _), errors = _in_threads(
        lambda: broadcast_buckets(sender, bucketize(newer.state_dict().items(), 1 << 20), "cpu", version=2),
        load(2),
        lambda: list(receive_buckets(g2, "cpu", version=2)),
    )
    assert errors == [None] * 3
    backend.finish_update(2)
    assert torch.equal(backend.logits(PROBE), source_logits(newer))


def test_nccl_side_group_needs_cuda_and_unknown_backends_are_refused():
    from kexaone_align.runtime.weight_wire import open_sync_group

    if not torch.cuda.is_available():
        with pytest.raises(KexaoneError, match="nccl weight-sync group needs CUDA"):
            open_sync_group("127.0.0.1", 1, 0, 2, "nccl")
    with pytest.raises(KexaoneError, match="unknown collective backend 'mpi'"):
        open_sync_group("127.0.0.1", 1, 0, 2, "mpi")
    with pytest.raises(KexaoneError, match="unknown weight-sync transport 'tcp'"):
        WeightSync([object()], transport="tcp")
    with pytest.raises(KexaoneError, match="push_from_learners"):
        WeightSync([object()], transport="collective").push(1, [])
