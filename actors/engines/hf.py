"""The Hugging Face student engine: our batched KV-cache sampler on the module the weight broadcast writes into."""

from __future__ import annotations

import torch

from opd.config import Config
from opd.models.builds import Assets, load_asset
from opd.models.prompts import stop_token_ids
from opd.models.sampler import Sample, sample
from opd.models.vision import PromptImages, batch_pixels, load_vision


class HFEngine:
    """Sampling with our own batched KV-cache loop on the same module the broadcast writes into."""

    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        self.model, self.tokenizer = load_asset(assets.student, cfg.actor.device)
        self.model.eval()
        # the chat template's end-of-turn token (EOS without one), and EOS where that is another token:
        # generation stops at the first of them and keeps it
        self.stop_ids = stop_token_ids(self.tokenizer, cfg.task.chat_template == "auto")
        # a vision-language student's image placeholder is never sampled (opd.models.sampler.sample)
        vision = load_vision(assets.student.path)
        self.suppress_ids = (vision.image_token_id,) if vision is not None else ()

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
            suppress_ids=self.suppress_ids,
        )

    def sync_weights(self, version: int) -> None:
        """Nothing to do: the broadcast writes straight into the parameters this engine samples with."""

    def close(self) -> None:
        pass
