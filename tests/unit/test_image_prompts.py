"""Collapsing an expanded prompt back to one image id per image (what SGLang and vLLM take): adjacent images are
split by each image's own count, and ids that were not expanded from these images are refused."""

from __future__ import annotations

import pytest

from opd.images import ImageError
from opd.models.image_prompts import collapse

IMG = 28


def test_runs_collapse_by_each_images_count():
    ids = [
        1,
        *[IMG] * 3,
        5,
        6,
        *[IMG] * 2,
        *[IMG] * 4,
        7,
    ]  # a 3-id image, text, two adjacent images (2 and 4 ids)
    assert collapse(ids, IMG, [3, 2, 4]) == [1, IMG, 5, 6, IMG, IMG, 7]
    assert collapse([1, 5, 6], IMG, []) == [1, 5, 6]


@pytest.mark.parametrize(
    ("ids", "counts", "message"),
    [
        ([1, IMG, IMG, 5], [3], "image 0 of the prompt has 2 image ids"),  # a run too short
        ([1, IMG, IMG, IMG, 5], [2], "beyond its 1 image"),  # too long: the extra id has no image
        ([1, IMG, IMG, 5], [2, 2], "holds 1 expanded image placeholder"),  # an image without ids
        ([1, IMG, 5], [], "beyond its 0 image"),  # image ids, no images
    ],
)
def test_ids_not_expanded_from_these_images_are_refused(ids, counts, message):
    with pytest.raises(ImageError, match=message):
        collapse(ids, IMG, counts)
