"""Student sampling engines, keyed on `actor.engine`.

The actor loop (weights, backpressure, publishing) does not care how tokens are sampled, so an engine is a
small object: `model` (a Hugging Face module whose parameters receive the weight broadcast), `tokenizer`,
`sample(prompts, generator, images)` returning `opd.models.sampler.Sample`s whose behaviour logprobs follow the
learner's convention (log-softmax(raw logits / temperature) of the sampled token, before top-p); `images`, for a
vision-language student, gives each prompt's `PromptImages` (None for a text prompt), the prompts' ids already
holding one image id per image feature; and
`sync_weights(version)`, called before each generation batch, which makes the sampler use the weights now in
`model` if the version moved. Each engine is one file here and one line in `ENGINES`; engines are imported only when chosen.

Stream generation (`actor.generation: stream`, actors/streaming.py) uses four more: `start(Request)` queues one
sequence with its own seed; `step()` runs one decode step over every sequence in flight (prefilling those queued)
and returns the ones that ended, their `Sample.token_versions` holding the version that sampled each token;
`inflight()`; `abort()` drops everything in flight. `sync_weights` is then called between steps as well, and
applies `actor.on_new_weights` to the sequences in flight.
"""

from __future__ import annotations

from typing import Protocol

import torch

from actors.engines.request import Request
from opd import registry
from opd.config import Config
from opd.models.builds import Assets
from opd.models.sampler import Sample
from opd.models.vision import PromptImages


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

    def start(self, request: Request) -> None: ...

    def step(self) -> list[tuple[str, Sample]]: ...

    def inflight(self) -> int: ...

    def abort(self) -> int: ...

    def close(self) -> None: ...


ENGINES: dict[str, str] = {
    "hf": "actors.engines.hf:HFEngine",
    "vllm": "actors.engines.vllm:VLLMEngine",
}


def build_engine(cfg: Config, assets: Assets) -> StudentEngine:
    """The student engine `actor.engine` names."""
    unknown = f"actor.engine: {cfg.actor.engine} has no student engine; choose one of {sorted(ENGINES)}"
    return registry.load(ENGINES, cfg.actor.engine, unknown)(cfg, assets)
