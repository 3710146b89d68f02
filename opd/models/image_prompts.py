"""A trajectory's expanded prompt as an engine that expands placeholders itself wants it: one id per image.

Our wire carries the EXPANDED prompt ids (each image placeholder repeated once per image feature, opd.models.vision),
which is what a Hugging Face forward takes. SGLang's `/generate` and vLLM's multimodal processor both expand the
placeholders themselves from the images they are given (SGLang: one placeholder token per `image_data` entry;
vLLM: a prompt replacement of each `<image>` id by the image's feature ids), so sending them our expanded ids
would make them expand every one of the 16 ids again, or refuse the request: they must get one placeholder per
image. `collapse` undoes the expansion exactly, checking each run holds as many ids as the processor makes of
its image, so a prompt whose ids and images disagree is refused here (ImageError) instead of being misread there.
"""

from __future__ import annotations

from opd.images import DEFAULT_MAX_PIXELS, ImageBlob, ImageError
from opd.models.vision import Vision


def image_counts(vision: Vision, blobs: list[ImageBlob], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[int]:
    """How many image ids the model's processor makes of each image (each checked on the way: ImageError)."""
    return [vision.inputs([b], max_pixels)[1] for b in blobs]


def collapse(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """`ids` with the k-th run of `counts[k]` image ids replaced by one image id. ImageError when the ids do not
    hold exactly those runs in order (a run too short or too long, or image ids with no image left)."""
    out: list[int] = []
    i, k = 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out.append(ids[i])
            i += 1
            continue
        if k == len(counts):
            raise ImageError(
                f"the prompt holds image ids (id {image_token_id}) at position {i} beyond its "
                f"{len(counts)} image(s): one placeholder per image, in order"
            )
        run = ids[i : i + counts[k]]
        if len(run) != counts[k] or any(t != image_token_id for t in run):
            held = next((j for j, t in enumerate(run) if t != image_token_id), len(run))
            raise ImageError(
                f"image {k} of the prompt has {held} image ids (id {image_token_id}) at position {i}, but its "
                f"image makes {counts[k]}: the prompt's ids were not expanded from these images"
            )
        out.append(image_token_id)
        i += counts[k]
        k += 1
    if k != len(counts):
        raise ImageError(
            f"the prompt holds {k} expanded image placeholder(s) (id {image_token_id}) but has {len(counts)} "
            "image(s): one placeholder per image, in order"
        )
    return out


def collapsed_prompt(
    vision: Vision, ids: list[int], blobs: list[ImageBlob] | None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[int]:
    """A trajectory's expanded prompt ids with one image id per image (text prompts unchanged, but refused if
    they hold image ids without images)."""
    return collapse(ids, vision.image_token_id, image_counts(vision, blobs or [], max_pixels))
