"""The run section: the run's name, directories, seed and process settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from opd.config.base import Strict


class RunConfig(Strict):
    run_id: str | None = Field(
        None, description="Names the run directory and streams; default: time-stamped."
    )
    output_dir: Path | None = Field(None, description="Run directory; default runs/<run_id>.")
    cache_dir: Path = Field(
        Path(".cache/opd"), description="Where built tokenizers and tiny models are cached."
    )
    seed: int = Field(0, description="Seeds actors' prompt streams and sampling, and the learner.")
    torch_threads: int = Field(1, ge=1, description="Threads per component process (they share the machine).")
    status_every: int = Field(10, ge=1, description="Learner steps between status lines.")
    progress: bool = Field(True, description="Show a progress bar when stdout is a terminal.")
    shutdown_grace_s: float = Field(
        20.0, gt=0, description="Seconds a component gets to stop before it is killed."
    )

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/\\ :")):
            raise ValueError("run_id must be non-empty without '/', '\\', ':' or spaces")
        return v
