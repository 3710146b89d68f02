"""The metrics section: Prometheus endpoints of every component, and the learner's wandb/TensorBoard logging."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from opd.config.base import Strict


class WandbConfig(Strict):
    """Weights & Biases logging of the learner's per-step record (`pip install -e .[logging]`)."""

    enabled: bool = Field(False, description="Log every learner step to wandb.")
    project: str = Field("opd-stream", description="wandb project name.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline writes a local run (`wandb sync` uploads it later); online needs a login.",
    )
    dir: Path | None = Field(None, description="Where wandb writes its run folder; null = run.output_dir.")


class TensorBoardConfig(Strict):
    """TensorBoard event files of the learner's per-step scalars (`pip install -e .[logging]`)."""

    enabled: bool = Field(False, description="Write the learner's per-step scalars as TensorBoard events.")
    dir: Path | None = Field(None, description="Event file folder; null = <run.output_dir>/tensorboard.")


class MetricsConfig(Strict):
    """Prometheus endpoints of every component, and the learner's wandb/TensorBoard logging."""

    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Base Prometheus port (0 = off). Learner +0, actor i +1+i, scorer j +1+actor.num_actors+j "
        "(README: Watching a run).",
    )
    host: str = Field(
        "127.0.0.1", description="Address the endpoints bind; 0.0.0.0 to be scraped from other hosts."
    )
    port_layout: Literal["offset", "fixed"] = Field(
        "offset",
        description="offset: many components on one host (opd run), each on metrics.port plus its offset; "
        "fixed: each binds metrics.port itself (one component per container: docker-compose, --index auto).",
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)

    @field_validator("port")
    @classmethod
    def _not_privileged(cls, v: int) -> int:
        if 0 < v < 1024:
            raise ValueError(f"metrics.port {v} is a privileged port; use 0 (off) or e.g. 9400")
        return v
