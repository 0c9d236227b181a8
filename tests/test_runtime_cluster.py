"""Learner placement on a simulated two-node Ray cluster (one machine, two raylets)."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sys

import pytest
import torch
from ray import cloudpickle

from kexaone_align.algorithms.sft import sft_loss
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import collate
from kexaone_align.runtime.cluster import LearnerResources, create_learner_group, init_ray
from kexaone_align.runtime.learner import LearnerConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "head_dim": 16,
}


def sft_loss_fn(token_logprobs, batch):
    return sft_loss(token_logprobs, batch["loss_mask"]), {}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from kexaone_align.models import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "policy", seed=0, architecture=SMALL)


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    init_ray(cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_group_needs_ray_and_valid_placement(tiny_path):
    import ray

    if not ray.is_initialized():
        with pytest.raises(KexaoneError, match="init_ray"):
            create_learner_group(1, tiny_path, LearnerConfig(), "disaggregated")
    with pytest.raises(KexaoneError, match="placement"):
        create_learner_group(1, tiny_path, LearnerConfig(), "everywhere")
    with pytest.raises(KexaoneError, match="num_learners"):
        create_learner_group(0, tiny_path, LearnerConfig(), "colocated")


@pytest.mark.slow
def test_learners_spread_over_two_nodes_and_train(two_node_cluster, tiny_path):
    import ray

    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2
    # each learner wants a whole node's CPUs: the only placement is one learner per node
    group = create_learner_group(
        2, tiny_path, LearnerConfig(lr=1e-2), "disaggregated", LearnerResources(num_cpus=2)
    )
    try:
        assert {n["node_id"] for n in group.nodes} == node_ids
        batch = collate(
            [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], [[0, 1, 1, 1], [0, 1, 1], [0, 0, 1, 1, 1]]
        )
        first = group.train_step(batch, sft_loss_fn)
        second = group.train_step(batch, sft_loss_fn)
        assert second["loss"] < first["loss"] and first["learner_tokens"] == 12
        assert torch.isfinite(torch.tensor(first["grad_norm"]))
    finally:
        group.shutdown()


@pytest.mark.slow
def test_colocated_learners_pack_onto_one_node(two_node_cluster, tiny_path):
    # learners.threads: more torch threads than the one CPU each reserves (phases that take turns)
    config = LearnerConfig(threads=2)
    group = create_learner_group(2, tiny_path, config, "colocated", LearnerResources(num_cpus=1))
    try:
        assert group.threads == [2, 2]
        assert len({n["node_id"] for n in group.nodes}) == 1
        assert group.placement_group is not None  # rollout workers can be scheduled into its bundles
    finally:
        group.shutdown()
