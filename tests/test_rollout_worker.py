"""The rollout worker in-process: backend by name, version stamping, bucket accounting."""

from __future__ import annotations

import pytest
import torch

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig
from kexaone_align.runtime.rollout.tiny import save_tiny_exaone_moe, tiny_exaone_moe
from kexaone_align.runtime.rollout.worker import RolloutWorker


def test_worker_by_name_stamps_versions_and_counts_bytes(tmp_path):
    worker = RolloutWorker("hf", model_path=save_tiny_exaone_moe(tmp_path / "m"), max_batch_size=2)
    assert worker.ping()["backend"] == "hf" and worker.ping()["policy_version"] == 0
    reqs = [RolloutRequest("a", [1, 4, 5], 3)]
    before = worker.generate(reqs, SamplingConfig(max_new_tokens=3))
    assert {s.policy_version for s in before} == {0} and len(before) == 3
    assert worker.metrics()["rollout/tokens_per_s"] > 0

    new = tiny_exaone_moe(seed=1).state_dict()
    items = list(new.items())
    acks = [worker.update_weights(1, items[:10]), worker.update_weights(1, items[10:])]
    assert sum(a["tensors"] for a in acks) == len(items)
    assert sum(a["bytes"] for a in acks) == sum(t.numel() * t.element_size() for t in new.values())
    assert worker.ping()["policy_version"] == 0
    assert worker.finish_update(1) == 1
    after = worker.generate(reqs, SamplingConfig(max_new_tokens=3))
    assert {s.policy_version for s in after} == {1}
    ref = tiny_exaone_moe(seed=1)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([[1, 4, 5, 6]])).logits.float()
    assert torch.equal(worker.logits([[1, 4, 5, 6]]), expected)
    with pytest.raises(KexaoneError, match="receive_weights called before join_weight_sync_group"):
        worker.receive_weights(2)
    assert worker.sync_ranks("gloo") == 1
    with pytest.raises(KexaoneError, match="cannot receive a nccl weight push"):
        worker.sync_ranks("nccl")  # a CPU worker: refused before anyone waits in the rendezvous
    worker.release_memory()
    worker.resume()
