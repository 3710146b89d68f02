"""What a streaming actor asks its engine for: one sequence, with its own sampling seed."""

from __future__ import annotations

from dataclasses import dataclass

from opd.models.vision import PromptImages


@dataclass(frozen=True)
class Request:
    """One sequence to generate. `key` names it when it ends; `seed` seeds its own sampler, so what it samples
    does not depend on the sequences it shares decode steps with (reproducible runs, batch == stream)."""

    key: str
    prompt_ids: list[int]
    images: PromptImages | None
    seed: int
