"""The ray section with several learner ranks: each rank reserves ray.learner's resources."""

import pytest

from opd.config import load_config
from tests.conftest import TINY


def test_a_local_ray_must_hold_every_learner_rank():
    with pytest.raises(ValueError, match=r"learner 2 \+ actors 0.5"):
        load_config(TINY, ["ray.num_cpus=2", "learner.num_ranks=2"])
    cfg = load_config(TINY, ["ray.num_cpus=2", "learner.num_ranks=2", "ray.learner.num_cpus=0.5"])
    assert cfg.ray.learner_placement == "PACK"
    with pytest.raises(ValueError, match="learner_placement"):
        load_config(TINY, ["ray.learner_placement=EVERYWHERE"])
