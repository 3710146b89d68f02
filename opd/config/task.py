"""The task section: where prompts come from and how a completion is checked (read by opd/tasks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from opd.config.base import Strict


class AdditionTask(Strict):
    """Built-in task: `a+b=` answered with the sum; a verifier checks the digits exactly."""

    kind: Literal["addition"] = "addition"
    max_digits: int = Field(3, ge=1, le=6, description="Operands have 1..max_digits digits.")
    eval_size: int = Field(200, ge=1, description="Held-out problems used for accuracy.")
    eval_seed: int = Field(12345, description="Seed of the held-out set (kept out of training prompts).")


class JsonlTask(Strict):
    """Prompts from a JSONL file: one object per line with `prompt` and optionally `answer` and `id`."""

    kind: Literal["jsonl"] = "jsonl"
    train_path: Path = Field(description="JSONL of training prompts.")
    eval_path: Path | None = Field(
        None, description="JSONL of held-out prompts with `answer`; none = no accuracy."
    )
    verifier: Literal["exact", "contains"] = Field(
        "exact", description="How a completion is checked against `answer`."
    )
    eval_size: int = Field(200, ge=1, description="At most this many held-out prompts are evaluated.")


TaskConfig = Annotated[AdditionTask | JsonlTask, Field(discriminator="kind")]
