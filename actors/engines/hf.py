"""The Hugging Face student engine: our KV-cache samplers on the module the weight broadcast writes into.

Batch generation uses opd.models.sampler.sample; stream generation (`actor.generation: stream`) the slot sampler
of opd.models.slots, which sequences join and leave between decode steps. The broadcast writes straight into the
parameters both sample with, between steps (the actor applies it there), so a new version is in use from the next
step on; `actor.on_new_weights` says what the sequences already in flight do about the tokens they hold.
"""

from __future__ import annotations

import torch

from actors.engines.request import Request
from opd.config import Config
from opd.models.builds import Assets, load_asset
from opd.models.prompts import stop_token_ids
from opd.models.sampler import Sample, sample
from opd.models.slots import SlotSampler
from opd.models.vision import PromptImages, batch_pixels


class HFEngine:
    """Sampling with our own batched KV-cache loop on the same module the broadcast writes into."""

    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        self.model, self.tokenizer = load_asset(assets.student, cfg.actor.device)
        self.model.eval()
        # the chat template's end-of-turn token (EOS without one), and EOS where that is another token:
        # generation stops at the first of them and keeps it
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.task.chat_template == "auto")
        s = cfg.sampling
        self.slots = SlotSampler(
            self.model,
            eos_ids=list(self.stop_ids),
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
        )
        self.version = 0  # the asset's weights are version 0
        self.tokens_dropped = 0  # tokens thrown away by on_new_weights: restart

    def sample(
        self,
        prompts: list[list[int]],
        generator: torch.Generator,
        images: list[PromptImages | None] | None = None,
    ) -> list[Sample]:
        """Behaviour logprobs as for text: with images, the prompts' pixel_values (in prompt order) go to the
        prefill, where the model merges them at the image ids."""
        s = self.cfg.sampling
        return sample(
            self.model,
            prompts,
            eos_id=self.stop_ids,
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            generator=generator,
            pixel_values=batch_pixels([i.pixel_values if i else None for i in images or ()]),
        )

    def sync_weights(self, version: int) -> None:
        """The broadcast wrote straight into the parameters both samplers use; sequences in flight (stream
        generation) keep, rebuild or drop what they hold as `actor.on_new_weights` says."""
        if version == self.version:
            return
        self.version = version
        mode = self.cfg.actor.on_new_weights
        if mode == "recompute":
            self.slots.recompute()
        elif mode == "restart":
            self.tokens_dropped += self.slots.restart()

    def start(self, request: Request) -> None:
        pixels = request.images.pixel_values if request.images is not None else None
        self.slots.start(request.key, request.prompt_ids, request.seed, pixels)

    def step(self) -> list[tuple[str, Sample]]:
        return self.slots.step(self.version)

    def inflight(self) -> int:
        return self.slots.inflight()

    def abort(self) -> int:
        return self.slots.abort()

    def close(self) -> None:
        pass
