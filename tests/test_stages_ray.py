"""start_ray: Ray waits forever for actors it cannot place, so the stage checks for room first."""

from pathlib import Path

import pytest

from kexaone_align.config import load_recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.stages.common import start_ray

TINY = Path(__file__).parents[1] / "recipes/tiny"


@pytest.fixture
def no_ray():
    import ray

    ray.shutdown()
    yield ray
    ray.shutdown()


def test_own_local_ray_grows_for_a_larger_stage(no_ray):
    # a pipeline's 1-learner SFT starts Ray first; its 2 + 2 actor AGAPO used to wait forever
    start_ray(load_recipe(TINY / "sft.yaml", ["learners.num_learners=1"]))
    small = no_ray.cluster_resources()["CPU"]
    agapo = load_recipe(TINY / "agapo.yaml", ["learners.num_learners=2", "rollout.num_workers=2"])
    assert small < 4
    start_ray(agapo)
    assert no_ray.cluster_resources()["CPU"] >= 4


def test_a_foreign_ray_without_room_is_a_clear_error(no_ray):
    no_ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    agapo = load_recipe(TINY / "agapo.yaml", ["learners.num_learners=2", "rollout.num_workers=2"])
    with pytest.raises(
        KexaoneError, match=r"has 1 CPUs but the recipe's actors need 4.*rollout\.num_workers"
    ):
        start_ray(agapo)
    assert no_ray.is_initialized()  # not ours: left running
