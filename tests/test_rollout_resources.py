"""Rollout resources derived from the recipe, and the 236B layouts placed on a Ray cluster with declared GPUs.

The pure half checks ``rollout_plan`` for every layout; the Ray half starts a simulated multi-node
cluster (``ray.cluster_utils.Cluster``, GPUs declared per node, a custom resource per node) and places
probe actors with exactly the options the pool and the learner group use, then asks each actor which
GPUs and node it got.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kexaone_align.config import load_recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.resources import (
    actor_options,
    create_rollout_group,
    max_model_len,
    rollout_plan,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[1]
AGAPO_236B = ROOT / "recipes/k-exaone-236b/agapo.yaml"


def recipe_236b(**overrides):
    return load_recipe(AGAPO_236B, [f"{k}={v}" for k, v in overrides.items()])


def test_disaggregated_236b_layout_gives_each_engine_its_tp_gpus_in_one_bundle():
    recipe = recipe_236b()
    plan = rollout_plan(recipe)
    tp = recipe.rollout.tensor_parallel_size
    assert plan.layout == "disaggregated" and plan.num_workers == 8 and tp == 8
    assert plan.bundles == [{"CPU": 8.0, "GPU": 8.0}] * 8 and plan.strategy == "PACK"
    assert [plan.actor_resources(i)["num_gpus"] for i in range(8)] == [8.0] * 8
    assert plan.bundle_indices == [[i] for i in range(8)]
    eng = plan.engine
    assert eng["tensor_parallel_size"] == 8 and eng["gpu_memory_utilization"] == 0.9
    assert eng["max_model_len"] == max_model_len(recipe) == 2048 + 32768
    assert eng["max_num_seqs"] == 256 and eng["dtype"] == "bfloat16" and eng["enable_mtp"] is False
    assert "enable_sleep_mode" not in eng


def test_colocated_layouts_share_the_learners_bundles():
    one = rollout_plan(recipe_236b(**{"cluster.placement": "colocated", "rollout.tensor_parallel_size": 1,
                                      "rollout.num_workers": 128, "rollout.max_staleness": 0}))  # fmt: skip
    assert one.layout == "colocated" and one.bundles == []
    assert one.bundle_indices[5] == [5] and one.actor_resources(5)["num_gpus"] == 0.5
    assert one.engine["enable_sleep_mode"] is True and one.sleep_while_training
    eight = rollout_plan(recipe_236b(**{"cluster.placement": "colocated", "rollout.num_workers": 16,
                                        "rollout.max_staleness": 0}))  # fmt: skip
    assert eight.bundle_indices[2] == list(range(16, 24))
    assert eight.actor_resources(2)["num_gpus"] == 0.0, "the TP ranks, not the driver actor, hold GPUs"
    assert eight.engine["distributed_executor_backend"] == "ray"
    assert worker_env(eight, 2) == {
        "VLLM_RAY_PER_WORKER_GPUS": "0.5",
        "VLLM_RAY_BUNDLE_INDICES": "16,17,18,19,20,21,22,23",
    }
    with pytest.raises(KexaoneError, match="only the 128 learners' GPUs"):
        rollout_plan(recipe_236b(**{"cluster.placement": "colocated", "rollout.num_workers": 17,
                                    "rollout.max_staleness": 0}))  # fmt: skip
    with pytest.raises(KexaoneError, match="max_staleness"):
        rollout_plan(recipe_236b(**{"cluster.placement": "colocated", "rollout.num_workers": 16}))


def test_cpu_and_simulated_layouts_run_engines_on_cpu():
    tiny = load_recipe(ROOT / "recipes/tiny/agapo.yaml", ["rollout.batch_size=7"])
    plan = rollout_plan(tiny)
    assert plan.layout == "cpu" and plan.num_gpus == 0 and plan.bundles == []
    assert plan.engine == {"dtype": "float32", "max_batch_size": 7, "device": "cpu"}
    sim = rollout_plan(recipe_236b(**{"cluster.simulated_gpus": "true", "learners.backend": "gloo"}))
    assert sim.simulated_gpus and sim.layout == "disaggregated" and sim.num_gpus == 8.0
    assert sim.engine["dtype"] == "float32", "bf16 is ~30x slower on the CPU build (issue 11)"
    with pytest.raises(KexaoneError, match=r"rollout\.backend: vllm"):
        rollout_plan(load_recipe(ROOT / "recipes/tiny/agapo.yaml", ["rollout.tensor_parallel_size=2"]))


@pytest.fixture(scope="module")
def simulated_cluster():
    """3 nodes x 8 declared GPUs, each node tagged with a custom resource naming it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 40, "num_gpus": 8,
                                                            "resources": {"node0": 1}})  # fmt: skip
    for i in (1, 2):
        cluster.add_node(num_cpus=40, num_gpus=8, resources={f"node{i}": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _probe_class():
    import ray

    @ray.remote
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return {"gpus": len(ray.get_gpu_ids()), "node": ctx.get_node_id()}

    return Probe


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_disaggregated_engines_get_tp_gpus_on_one_node(simulated_cluster, tp):
    import ray
    from ray.util import remove_placement_group

    recipe = recipe_236b(**{"cluster.nodes": 3, "learners.num_learners": 8,
                            "rollout.tensor_parallel_size": tp,
                            "rollout.num_workers": 16 // tp, "cluster.cpus_per_actor": 1})  # fmt: skip
    plan = rollout_plan(recipe)
    group = create_rollout_group(plan, timeout_s=60)
    try:
        probes = [
            _probe_class().options(**actor_options(plan, i, group)).remote() for i in range(plan.num_workers)
        ]
        seen = ray.get([p.where.remote() for p in probes], timeout=60)
        assert [s["gpus"] for s in seen] == [tp] * plan.num_workers
        if tp == 8:  # a whole node each
            assert len({s["node"] for s in seen}) == 2
        assert ray.available_resources().get("GPU", 0) == 24 - 16
        for p in probes:
            ray.kill(p)
    finally:
        remove_placement_group(group)


@pytest.mark.slow
def test_colocated_engine_ranks_share_learner_gpus(simulated_cluster):
    """The learners' group (as ``create_learner_group`` builds it) with TP-1 engines in the same bundles."""
    import ray
    from ray.util import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    recipe = recipe_236b(**{"cluster.nodes": 3, "cluster.placement": "colocated", "learners.num_learners": 16,
                            "rollout.tensor_parallel_size": 1, "rollout.num_workers": 16,
                            "rollout.max_staleness": 0, "cluster.cpus_per_actor": 1})  # fmt: skip
    plan = rollout_plan(recipe)
    group = placement_group([{"CPU": 2.0, "GPU": 1.0}] * 16, strategy="PACK")
    ray.get(group.ready(), timeout=60)
    try:
        Probe = _probe_class()

        def in_bundle(r):
            return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=r)

        learners = [Probe.options(num_cpus=1, num_gpus=0.5, scheduling_strategy=in_bundle(r)).remote()
                    for r in range(16)]  # fmt: skip
        engines = [Probe.options(**actor_options(plan, i, group)).remote() for i in range(16)]
        ls = ray.get([a.where.remote() for a in learners], timeout=60)
        es = ray.get([a.where.remote() for a in engines], timeout=60)
        assert [e["node"] for e in es] == [learner["node"] for learner in ls], "engine i sits with learner i"
        assert ray.available_resources().get("GPU", 0) == 24 - 16
    finally:
        remove_placement_group(group)


def test_impossible_rollout_group_is_a_named_error(simulated_cluster):
    plan = rollout_plan(recipe_236b())  # 8 engines x TP 8 = 64 GPUs; the simulated cluster has 24
    with pytest.raises(KexaoneError, match="could not place 8 rollout engine"):
        create_rollout_group(plan, timeout_s=2)
