"""Student sampling engines, keyed on `actor.engine`.

The actor loop (weights, backpressure, publishing) does not care how tokens are sampled, so an engine is a
small object: `model` (a Hugging Face module whose parameters receive the weight broadcast), `tokenizer`,
`sample(prompts, generator, images)` returning `opd.models.sampler.Sample`s whose behaviour logprobs follow the
learner's convention (log-softmax(raw logits / temperature) of the sampled token, before top-p); `images`, for a
vision-language student, gives each prompt's `PromptImages` (None for a text prompt), the prompts' ids already
holding one image id per image feature; and
`sync_weights(version)`, called before each generation batch, which makes the sampler use the weights now in
`model` if the version moved. Each engine is one file here and one line in `ENGINES`; engines are imported only when chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd import registry
from opd.config import Config
from opd.models.builds import Assets
from opd.models.sampler import Sample
from opd.models.vision import PromptImages


@dataclass
class Request:
    """One sequence for a streaming engine (`actor.generation: stream`): its own seed, so what it samples does not
    depend on which other sequences share its decode steps."""

    key: str
    prompt_ids: list[int]
    images: PromptImages | None
    seed: int


class StudentEngine(Protocol):
    model: torch.nn.Module
    tokenizer: object

    def sample(
        self,
        prompts: list[list[int]],
        generator: torch.Generator,
        images: list[PromptImages | None] | None = None,
    ) -> list[Sample]: ...

    def sync_weights(self, version: int) -> None: ...

    def close(self) -> None: ...


ENGINES: dict[str, str] = {
    "hf": "actors.engines.hf:HFEngine",
    "vllm": "actors.engines.vllm:VLLMEngine",
}


def build_engine(cfg: Config, assets: Assets) -> StudentEngine:
    """The student engine `actor.engine` names."""
    unknown = f"actor.engine: {cfg.actor.engine} has no student engine; choose one of {sorted(ENGINES)}"
    return registry.load(ENGINES, cfg.actor.engine, unknown)(cfg, assets)
