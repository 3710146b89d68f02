"""The images section: limits every component applies to the images prompts carry (opd/images.py checks them)."""

from __future__ import annotations

from pydantic import Field

from opd.config.base import Strict

DEFAULT_MAX_PIXELS = 4096 * 4096


class ImagesConfig(Strict):
    """What an image may be, checked wherever one is read: a JSONL task's file at load, and every trajectory's
    images on receipt by scorers and the learner (a bad one dead-letters its trajectory with the reason)."""

    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Largest width x height accepted, read from the image header before any pixel is decoded: "
        "a decompression bomb (a small file that decodes to gigabytes) is refused on its header.",
    )
    max_per_prompt: int = Field(
        16, ge=1, le=64, description="Most images one prompt may carry (the wire's own bound is 64)."
    )
