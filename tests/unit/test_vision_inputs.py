"""A trajectory's encoded images become the same pixel_values and expanded prompt ids the model's own processor
makes (opd.models.vision), and a prompt whose image placeholders and images disagree is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from opd import tasks
from opd.images import ImageBlob, ImageError
from opd.models import builds, vlm
from opd.models.prompts import prompt_ids as render_prompt
from opd.models.vision import batch_pixels, load_vision
from tests.vlm_models import untrained_vlm_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlm")
    cfg = untrained_vlm_config(tmp)
    asset = builds.ensure_student_asset(cfg, log=lambda *_: None)
    return cfg, asset


def test_expanded_prompt_and_pixels_equal_the_processors(built):
    cfg, asset = built
    vision = load_vision(asset.path)
    _, tok = builds.load_asset(asset)
    model, processor = vlm.load_vlm(asset.path)
    problem = tasks.eval_set(cfg.task)[0]
    blobs = [ImageBlob.of(b) for b in problem.images]
    ids, pixels = vision.expand(render_prompt(tok, problem), blobs)
    assert ids == vlm.prompt_ids(processor, problem)
    assert torch.equal(pixels, vlm.pixel_values(processor, problem))
    assert torch.equal(vision.prompt_pixels(ids, blobs), pixels)  # what scorers and the learner rebuild
    assert batch_pixels([None, pixels, None, pixels]).shape[0] == 2
    assert batch_pixels([None]) is None


def test_placeholder_count_and_bad_images_are_refused(built):
    cfg, asset = built
    vision = load_vision(asset.path)
    _, tok = builds.load_asset(asset)
    problem = tasks.eval_set(cfg.task)[0]
    blob = ImageBlob.of(problem.images[0])
    ids = render_prompt(tok, problem)
    with pytest.raises(ImageError, match="1 image placeholder"):
        vision.expand(ids, [blob, blob])
    expanded, _ = vision.expand(ids, [blob])
    with pytest.raises(ImageError, match="holds 16 image ids .* make 32"):
        vision.prompt_pixels(expanded, [blob, blob])
    with pytest.raises(ImageError, match="holds 15 image ids"):
        vision.prompt_pixels(expanded[:1] + expanded[2:], [blob])
    with pytest.raises(ImageError, match="but no images"):
        vision.prompt_pixels(expanded, [])
    with pytest.raises(ImageError, match="exceeds the limit"):
        vision.prompt_pixels(expanded, [blob], max_pixels=32 * 32 - 1)
    assert vision.prompt_pixels(expanded, [blob], max_pixels=32 * 32) is not None
    assert vision.prompt_pixels([5, 6], None) is None
    assert load_vision(tasks.__file__.rsplit("/", 1)[0]) is None  # not a model directory
