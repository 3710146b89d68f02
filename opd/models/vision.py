"""A vision-language model's image inputs from a trajectory's encoded images, checked on the way.

Actors, scorers and the learner all turn `Trajectory.images` (opd/images.py: PNG/JPEG bytes and their sha256)
into the `pixel_values` the model's forward takes, with the model's own processor, so all three see the same
pixels. On the way each image is checked (format, hash, the pixel limit before decoding, a full decode) and the
prompt's image ids are counted against what the processor makes of the images: a prompt whose placeholders and
images disagree would silently misalign the image features, so it is refused with the reason (the scorer and the
learner dead-letter it) instead of being scored or trained on.

The prompt ids on the wire are the expanded ones (each image placeholder already one id per image feature), so
nobody after the actor expands anything: the count check is all that ties ids and images together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from opd.images import DEFAULT_MAX_PIXELS, ImageBlob, ImageError, open_rgb
from opd.tasks import IMAGE_TOKEN


@dataclass
class Vision:
    """A VLM's processor and the id its prompts carry once per image feature."""

    processor: object
    image_token_id: int

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", IMAGE_TOKEN)

    def inputs(
        self, images: list[ImageBlob], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, int]:
        """(pixel_values, image ids the prompt must hold) for one prompt's images, each checked first
        (ImageError with the reason)."""
        pil = [open_rgb(b, max_pixels) for b in images]
        enc = self.processor(images=pil, text=[self.image_token * len(pil)], return_tensors="pt")
        expected = int((enc["input_ids"] == self.image_token_id).sum())
        return enc["pixel_values"], expected

    def expand(
        self, ids: list[int], images: list[ImageBlob], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[list[int], torch.Tensor | None]:
        """An actor's prompt as the model reads it: `ids` rendered from the prompt text (chat template and all),
        each image placeholder one id, become the ids with the k-th placeholder repeated as many times as the
        processor makes features of the k-th image; with the images' pixel_values. ImageError when the
        placeholders and images differ in number or an image is bad."""
        held = sum(1 for i in ids if i == self.image_token_id)
        if held != len(images):
            raise ImageError(
                f"the prompt has {held} image placeholder(s) ({self.image_token}) but {len(images)} image(s): "
                "write one placeholder per image, in order"
            )
        if not images:
            return list(ids), None
        per_image = [self.inputs([b], max_pixels) for b in images]
        out, k = [], 0
        for i in ids:
            if i == self.image_token_id:
                out.extend([i] * per_image[k][1])
                k += 1
            else:
                out.append(i)
        return out, torch.cat([px for px, _ in per_image])

    def prompt_pixels(
        self, prompt_ids: list[int], images: list[ImageBlob] | None, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> torch.Tensor | None:
        """The pixel_values for one prompt, or None for a text-only prompt; ImageError when an image is bad or the
        prompt's image ids do not match its images (the placeholder count)."""
        images = images or []
        held = sum(1 for i in prompt_ids if i == self.image_token_id)
        if not images:
            if held:
                raise ImageError(
                    f"the prompt holds {held} image ids (id {self.image_token_id}) but no images"
                )
            return None
        pixels, expected = self.inputs(images, max_pixels)
        if held != expected:
            raise ImageError(
                f"the prompt holds {held} image ids (id {self.image_token_id}) but its {len(images)} image(s) "
                f"make {expected}: one placeholder per image, in order"
            )
        return pixels


def load_vision(path: str | Path) -> Vision | None:
    """The Vision of a saved vision-language model directory, or None for a text-only model."""
    from opd.models import vlm  # noqa: PLC0415 (transformers' LLaVA classes: only for VLMs)

    if not vlm.is_vlm_dir(path):
        return None
    from transformers import AutoConfig, AutoProcessor  # noqa: PLC0415

    config = AutoConfig.from_pretrained(str(path))
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    return Vision(AutoProcessor.from_pretrained(str(path)), int(token))


def batch_pixels(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Every row's pixel_values in row order (a batch's images, as the model's forward takes them), or None."""
    kept = [r for r in rows if r is not None]
    return torch.cat(kept) if kept else None
