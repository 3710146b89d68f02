"""The ray section: resources each component's Ray actor reserves under `opd run --launcher ray`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opd.config.base import Strict
from opd.config.broker import EMBEDDED_BROKERS


class RayResources(Strict):
    """Ray resources one component's actor reserves (fractions allowed, as in Ray)."""

    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs the component's Ray actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the component's Ray actor reserves.")


# Per-role defaults, as classes so that `opd run --help` shows each role's own default.
class RayBrokerResources(RayResources):
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs the broker's Ray actor reserves.")


class RayLearnerResources(RayResources):
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs the learner's Ray actor reserves.")


class RayScorerResources(RayResources):
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs each scorer's Ray actor reserves.")


class RayConfig(Strict):
    """`opd run --launcher ray`: each component is a process owned by a Ray actor placed with these resources."""

    address: str | None = Field(
        None, description="Ray cluster to join (e.g. auto or ray://host:10001); null = start a local Ray."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local Ray started when address is null (null = all)."
    )
    placement_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for Ray to place a component before giving up on it."
    )
    learner_placement: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How the learner.num_ranks ranks' placement group (one bundle of ray.learner resources per "
        "rank) spreads over nodes: PACK = as few nodes as fit, STRICT_PACK = one node, SPREAD/STRICT_SPREAD = "
        "across nodes.",
    )
    broker: RayBrokerResources = Field(
        default_factory=RayBrokerResources,
        description=f"Resources of the {' or '.join(EMBEDDED_BROKERS)} broker.",
    )
    learner: RayLearnerResources = Field(
        default_factory=RayLearnerResources,
        description="Resources of the learner (of each rank, with learner.num_ranks > 1: one bundle each).",
    )
    actor: RayResources = Field(default_factory=RayResources, description="Resources of each actor.")
    scorer: RayScorerResources = Field(
        default_factory=RayScorerResources, description="Resources of each scorer."
    )
