"""Versioned weight sync: after a push the rollout backend's logits equal the source model's exactly."""

from __future__ import annotations

import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig
from kexaone_align.runtime.rollout.hf import HFRolloutBackend
from kexaone_align.runtime.rollout.tiny import tiny_exaone_moe
from kexaone_align.runtime.weight_sync import (
    WeightSync,
    bucket_nbytes,
    bucketize,
    flatten_bucket,
    unflatten_bucket,
)

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
