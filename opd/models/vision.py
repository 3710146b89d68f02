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

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd.images import DEFAULT_MAX_PIXELS, ImageBlob, ImageError, open_rgb
from opd.tasks import IMAGE_TOKEN

_ATTR = "_opd_vision"  # a loaded VLM keeps its Vision, as it keeps its real vocabulary (opd.models.vocab)
RECENT_PROMPTS = (
    64  # prompts' pixel values kept (a prompt's n samples and the learner's check + collate share them)
)


@dataclass(frozen=True)
class PromptImages:
    """One prompt's images for a student engine: the encoded blobs (what vLLM and servers take, and what travels)
    and the processor's pixel_values of them (what a Hugging Face forward takes), computed once per prompt."""

    blobs: list[ImageBlob]
    pixel_values: torch.Tensor


@dataclass
class Vision:
    """A VLM's processor and the id its prompts carry once per image feature."""

    processor: object
    image_token_id: int
    _recent: dict = field(default_factory=dict, repr=False)  # (hashes, limit) -> inputs(): see `inputs`

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", IMAGE_TOKEN)

    def inputs(
        self, images: list[ImageBlob], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[torch.Tensor, int]:
        """(pixel_values, image ids the prompt must hold) for one prompt's images, each checked first
        (ImageError with the reason). The n samples of a prompt carry the same images, and the learner's intake
        check and its collate both ask: the last few answers are kept, by the images' hashes and the limit."""
        key = (tuple(b.sha256 for b in images), max_pixels)
        if (hit := self._recent.get(key)) is not None:
            return hit
        pil = [open_rgb(b, max_pixels) for b in images]
        enc = self.processor(images=pil, text=[self.image_token * len(pil)], return_tensors="pt")
        out = enc["pixel_values"], int((enc["input_ids"] == self.image_token_id).sum())
        self._recent[key] = out
        while len(self._recent) > RECENT_PROMPTS:
            self._recent.pop(next(iter(self._recent)))
        return out

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
    """The Vision of a saved vision-language model directory, or None for a text-only model. One per directory
    in a process: a scorer's receipt check and its teacher share one cache of pixel values (`Vision.inputs`),
    so each prompt's images are decoded once there."""
    return _load_vision(str(Path(path).resolve()))


@functools.cache
def _load_vision(path: str) -> Vision | None:
    config = Path(path) / "config.json"
    if not config.is_file() or "vision_config" not in json.loads(config.read_text()):
        return (
            None  # a vision-language model's config nests its vision tower's (LLaVA, Qwen2-VL, Gemma 3, ...)
        )
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


def image_problem(vision: Vision | None, traj, max_pixels: int, max_per_prompt: int) -> str | None:
    """Why a received trajectory's images cannot be used (the dead-letter reason), or None: too many, a bad image
    (format, hash, pixel limit, decode), images for a text-only student, or image ids that do not match the
    images. Scorers and the learner both ask, so nothing unchecked is scored or trained on."""
    images = traj.images or []
    if len(images) > max_per_prompt:
        return (
            f"bad image: {len(images)} images in one prompt; at most images.max_per_prompt={max_per_prompt}"
        )
    if vision is None:
        return (
            "bad image: the trajectory carries images but the student is a text-only model"
            if images
            else None
        )
    if (traj.response_token_ids == vision.image_token_id).any():
        return "bad image: the response holds the image placeholder id, which only a prompt may hold"
    try:
        vision.prompt_pixels(traj.prompt_token_ids.tolist(), images, max_pixels)
    except ImageError as exc:
        return f"bad image: {exc}"
    return None


def _probe_image() -> ImageBlob:
    """A small non-square colour PNG: what two processors are compared on (resizing, cropping, channels and
    normalisation all show in its pixel values)."""
    import io  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    y, x = np.mgrid[0:23, 0:37]
    rgb = np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return ImageBlob.of(buf.getvalue())


def check_same_vision(student: Vision | None, teacher: Vision | None, where: str = "teacher") -> None:
    """Refuse a teacher that would read the student's images differently: another image placeholder id, another
    count of image ids per image, or other pixel values for the same image (a different resize, crop or
    normalisation). Compared by running both processors on one probe image, so any processor class is covered."""
    if student is None:
        return
    if teacher is None:
        raise ValueError(
            f"{where}: the student reads images but the teacher model is text-only: prompts with images could "
            "not be scored; use a vision-language teacher with the student's processor"
        )
    if (student.image_token_id, student.image_token) != (teacher.image_token_id, teacher.image_token):
        raise ValueError(
            f"{where}: image placeholder {teacher.image_token!r} (id {teacher.image_token_id}) differs from the "
            f"student's {student.image_token!r} (id {student.image_token_id}): the image ids on the wire would not "
            "be the teacher's"
        )
    probe = [_probe_image()]
    (s_px, s_n), (t_px, t_n) = student.inputs(probe), teacher.inputs(probe)
    if s_n != t_n:
        raise ValueError(
            f"{where}: its processor makes {t_n} image ids of an image where the student's makes {s_n} (another "
            "patch size or feature selection): use the student's processor settings"
        )
    if s_px.shape != t_px.shape or not torch.allclose(s_px, t_px, atol=1e-6):
        raise ValueError(
            f"{where}: its image processor gives other pixel values than the student's (pixel_values "
            f"{tuple(t_px.shape)} vs {tuple(s_px.shape)}: resize, crop or normalisation differ): use the student's "
            "image processor settings"
        )


def pixel_reader(vision: Vision | None, max_pixels: int):
    """The learner's `collate(pixels=...)`: a trajectory's pixel_values by the student's processor (ImageError on
    a bad image), or None for a text-only student."""
    if vision is None:
        return None
    return lambda t: vision.prompt_pixels(t.prompt_token_ids.tolist(), t.images, max_pixels)


def image_checker(vision: Vision | None, images_cfg):
    """The learner intake's check of a trajectory's images (`image_problem` with the run's limits)."""
    return lambda t: image_problem(vision, t, images_cfg.max_pixels, images_cfg.max_per_prompt)


# Parameter-name parts of a vision-language model's image side: LLaVA's vision tower and projector (in memory
# `model.vision_tower.*`, `model.multi_modal_projector.*`), Qwen2-VL's `visual.*`, other towers' `vision_model.*`.
VISION_PARTS = ("vision_tower", "multi_modal_projector", "visual.", "vision_model")


def is_vision_param(name: str) -> bool:
    return any(part in name for part in VISION_PARTS)


def synced_parameters(model: torch.nn.Module, freeze_vision: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the learner trains and broadcasts, and the actors receive: all of them, or with
    `student.freeze_vision` the language model's only (the image side stays as built on every component, so
    sending it would move bytes that never change). Both ends call this, so their manifests agree."""
    named = list(model.named_parameters())
    if not freeze_vision:
        return named
    kept = [(n, p) for n, p in named if not is_vision_param(n)]
    if len(kept) == len(named):
        raise ValueError(
            "student.freeze_vision: the student has no vision tower or projector parameters (a text-only model?): "
            "set it to false"
        )
    return kept


def freeze_vision(model: torch.nn.Module) -> int:
    """Stop gradients to the image side (student.freeze_vision); the number of parameters frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if is_vision_param(name):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def attach_vision(model: torch.nn.Module, vision: Vision) -> None:
    """Keep `vision` on the loaded model, so code that holds only the model and tokenizer (the greedy
    evaluations) can read its images."""
    setattr(model, _ATTR, vision)


def vision_of(model: torch.nn.Module) -> Vision | None:
    return getattr(model, _ATTR, None)
