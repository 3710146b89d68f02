"""The scaling section: scorers added or removed while a run trains, by hand or by the autoscaler."""

from __future__ import annotations

from pydantic import Field, model_validator

from opd.config.base import Strict


class ScalingConfig(Strict):
    """Teacher scorers added or removed while a run trains (`opd scale`, or this autoscaler); see README."""

    autoscale: bool = Field(
        False, description="Let the launcher add/remove scorers to keep the rollouts queue within bounds."
    )
    min_scorers: int = Field(1, ge=1, description="The autoscaler never goes below this many scorers.")
    max_scorers: int = Field(
        4, ge=1, description="The autoscaler never goes above this; without autoscale, `opd scale` may."
    )
    queue_low: int = Field(
        8, ge=0, description="Remove a scorer when the mean rollouts depth over cooldown_s is below this."
    )
    queue_high: int = Field(
        128, ge=1, description="Add a scorer when the mean rollouts depth over cooldown_s is above this."
    )
    cooldown_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between autoscaler changes (and the window its depth is averaged over).",
    )
    interval_s: float = Field(
        5.0, gt=0, description="Seconds between scorer throughput records in runs/<id>/scaling.jsonl."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.min_scorers > self.max_scorers:
            raise ValueError(
                f"scaling.min_scorers ({self.min_scorers}) > scaling.max_scorers ({self.max_scorers}); "
                "raise max_scorers or lower min_scorers"
            )
        if self.queue_low >= self.queue_high:
            raise ValueError(
                f"scaling.queue_low ({self.queue_low}) must be below scaling.queue_high ({self.queue_high}); "
                "widen the band"
            )
        return self
