"""A tiny vision-language model built from its config section (0 SFT steps: seconds) is a LLaVA that loads back
offline with its processor, and a forward with the processor's inputs sees the image: one image id per patch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from opd import tasks
from opd.config import Config, VisualDigitsTask
from opd.models import builds, vlm


def _cfg(tmp_path, **student) -> Config:
    return Config.model_validate(
        {
            "run": {"cache_dir": str(tmp_path)},
            "task": {"kind": "visual_digits", "eval_size": 8},
            "student": {"kind": "tiny_vlm", "sft_steps": 0, **student},
            "teacher": {"kind": "tiny_vlm", "sft_steps": 0},
        }
    )


def test_built_vlm_loads_back_with_its_processor_and_sees_the_image(tmp_path):
    cfg = _cfg(tmp_path)
    asset = builds.ensure_student_asset(cfg, log=lambda *_: None)
    meta = json.loads((Path(asset.path) / "opd_asset.json").read_text())
    assert meta["image_tokens"] == vlm.image_tokens(32, 8) == 16
    assert 0.0 <= asset.eval_accuracy <= 1.0
    assert vlm.is_vlm_dir(asset.path)

    processor = AutoProcessor.from_pretrained(asset.path)  # offline: all in the directory
    model = AutoModelForImageTextToText.from_pretrained(asset.path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    problems = tasks.eval_set(cfg.task)[:2]
    enc = vlm.model_inputs(processor, problems)
    image_id = model.config.image_token_id
    assert image_id == processor.tokenizer.convert_tokens_to_ids(tasks.IMAGE_TOKEN)
    assert (enc["input_ids"] == image_id).sum(-1).tolist() == [16, 16]
    assert enc["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert tuple(enc["pixel_values"].shape) == (2, 3, 32, 32)
    assert vlm.prompt_ids(processor, problems[1]) == enc["input_ids"][1].tolist()
    assert torch.equal(vlm.pixel_values(processor, problems[1]), enc["pixel_values"][1:])
    with torch.no_grad():
        logits = model(**enc).logits
        swapped = model(**{**enc, "pixel_values": enc["pixel_values"].flip(0)}).logits
    assert logits.shape[:2] == enc["input_ids"].shape
    assert logits.shape[-1] >= len(processor.tokenizer)
    assert not torch.allclose(logits[:, -1], swapped[:, -1])  # the answer position depends on the image

    loaded, tok = builds.load_asset(asset)  # what a component gets: the LLaVA and the processor's tokenizer
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert tok.get_vocab() == processor.tokenizer.get_vocab()


def test_processor_keeps_the_task_images_pixels():
    """The task's images are already image_size: the processor's resize and crop change no pixel."""
    processor = vlm.build_processor(vlm.build_vlm_tokenizer(), 32, 8)
    p = next(tasks.training_stream(VisualDigitsTask(), seed=0))
    enc = vlm.model_inputs(processor, [p])
    raw = torch.tensor(np.asarray(vlm.decode_images(p)[0]), dtype=torch.float32)
    expected = (raw / 255 - 0.5) / 0.5
    for channel in range(3):
        assert torch.allclose(enc["pixel_values"][0, channel], expected, atol=1e-6)


def test_behaviour_logprobs_with_images_equal_the_learners_recomputation(tmp_path):
    """The sampler (the HF actor's) records behaviour logprobs with the images given to the prefill only; one
    right-padded forward of prompt + response with the same images (what the learner recomputes) gives the same
    values. Prompts of two lengths, so padding is exercised; and other images give other values."""
    from opd.models.sampler import response_logprobs, sample

    cfg = _cfg(tmp_path)
    asset = builds.ensure_student_asset(cfg, log=lambda *_: None)
    processor = AutoProcessor.from_pretrained(asset.path)
    model = AutoModelForImageTextToText.from_pretrained(asset.path).eval()
    problems = tasks.eval_set(cfg.task)[:2]
    prompts = [vlm.prompt_ids(processor, p) for p in problems]
    prompts[1] = prompts[1] + prompts[1][-2:]  # another length
    pixels = torch.cat([vlm.pixel_values(processor, p) for p in problems])
    tok = processor.tokenizer
    out = sample(
        model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=4,
        generator=torch.Generator().manual_seed(0), pixel_values=pixels,
    )  # fmt: skip
    with torch.no_grad():
        seqs = [(p, o.response_ids) for p, o in zip(prompts, out, strict=True)]
        again, _, _ = response_logprobs(model, seqs, pad_id=tok.pad_token_id, pixel_values=pixels)
        other, _, _ = response_logprobs(model, seqs, pad_id=tok.pad_token_id, pixel_values=pixels.flip(0))
    for o, lp in zip(out, again, strict=True):
        np.testing.assert_allclose(np.asarray(o.behaviour_logprobs), lp.numpy(), atol=1e-5)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(again, other, strict=True))
