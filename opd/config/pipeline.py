"""The pipeline section: asynchronous or lockstep stages, and emulated per-token stage compute for benchmarks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opd.config.base import Strict


class ServiceTimeConfig(Strict):
    """Emulated per-token compute of each stage, for benchmarks: after its real work on a batch of N tokens a stage
    sleeps until the batch took at least N x ms. Sleeping frees the CPU, so each stage behaves as if it ran on its
    own accelerator, and the overlap the asynchronous design buys shows even on a 2-core CPU (BENCHMARKS.md)."""

    actor_ms_per_token: float = Field(
        0.0, ge=0, description="Each actor batch takes at least this x generated response tokens (0 = off)."
    )
    scorer_ms_per_token: float = Field(
        0.0, ge=0, description="Each scoring round takes at least this x scored response tokens (0 = off)."
    )
    learner_ms_per_token: float = Field(
        0.0, ge=0, description="Each learner update takes at least this x trained response tokens (0 = off)."
    )


class PipelineConfig(Strict):
    """How the stages overlap: async (the design) or sync (lockstep generate -> score -> train, for comparison)."""

    mode: Literal["async", "sync"] = Field(
        "async",
        description="async: actors keep generating while older batches are scored and trained; sync: each actor "
        "generates one batch, then waits for the weights trained on it (one batch in flight, staleness 0).",
    )
    service_time: ServiceTimeConfig = Field(
        default_factory=ServiceTimeConfig, description="Emulated per-token stage compute (benchmarks)."
    )
