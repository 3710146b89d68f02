"""Student sampling engines, keyed on `actor.engine`.

The actor loop (weights, backpressure, publishing) does not care how tokens are sampled, so an engine is a
small object: `model` (a Hugging Face module whose parameters receive the weight broadcast), `tokenizer`,
`sample(prompts, generator)` returning `opd.sampling.Sample`s whose behaviour logprobs follow the learner's
convention (log-softmax(raw logits / temperature) of the sampled token, before top-p), and
`sync_weights(version)`, called before each generation batch, which makes the sampler use the weights now in
`model` if the version moved. Optional engines are imported only when chosen.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from opd.assets import Assets, load_asset
from opd.config import Config
from opd.sampling import Sample, sample


class StudentEngine(Protocol):
    model: torch.nn.Module
    tokenizer: object

    def sample(self, prompts: list[list[int]], generator: torch.Generator) -> list[Sample]: ...

    def sync_weights(self, version: int) -> None: ...

    def close(self) -> None: ...


class HFEngine:
    """Sampling with our own batched KV-cache loop on the same module the broadcast writes into."""

    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        self.model, self.tokenizer = load_asset(assets.student, cfg.actor.device)
        self.model.eval()

    def sample(self, prompts: list[list[int]], generator: torch.Generator) -> list[Sample]:
        s = self.cfg.sampling
        return sample(
            self.model,
            prompts,
            eos_id=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            generator=generator,
        )

    def sync_weights(self, version: int) -> None:
        """Nothing to do: the broadcast writes straight into the parameters this engine samples with."""

    def close(self) -> None:
        pass


def build_engine(cfg: Config, assets: Assets) -> StudentEngine:
    if cfg.actor.engine == "hf":
        return HFEngine(cfg, assets)
    if cfg.actor.engine == "vllm":
        return importlib.import_module("actors.vllm_engine").VLLMEngine(cfg, assets)
    raise NotImplementedError(f"actor.engine: {cfg.actor.engine} has no student engine")
