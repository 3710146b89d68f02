"""A vision-language student and teacher through the code the components run: the HF actor engine's behaviour
logprobs with images equal the learner's recomputation (collate with the images + the engine's response rows),
the HF teacher backend's logprobs with images equal a direct forward of the teacher, and a micro-batch keeps its
rows' own images. 0-step tiny VLMs (seconds to build); the images are used: swapping them changes the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.engines.hf import HFEngine
from learner.batching import collate
from learner.engines.base import response_rows
from opd import tasks
from opd.images import ImageBlob
from opd.models import builds, vlm
from opd.models.prompts import prompt_ids as render_prompt
from opd.models.vision import PromptImages, load_vision, pixel_reader
from opd.models.vocab import never_sampled, real_vocab
from opd.protocol import Trajectory
from teacher_scorers.backends.hf import HFTeacher
from tests.vlm_models import untrained_vlm_config

TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    """A config and the assets of a 0-step tiny VLM student and teacher (different seeds: different models)."""
    tmp = tmp_path_factory.mktemp("vlm-run")
    cfg = untrained_vlm_config(
        tmp,
        teacher={"seed": 1},
        sampling={"temperature": TEMPERATURE, "max_new_tokens": 5},
        scorer={"topk": 4},
    )
    return cfg, builds.ensure_assets(cfg, log=lambda *_: None)


def _trajectories(cfg, engine, vision, problems) -> list[Trajectory]:
    prompts = []
    for p in problems:
        blobs = [ImageBlob.of(b) for b in p.images]
        ids, pixels = vision.expand(render_prompt(engine.tokenizer, p), blobs)
        prompts.append((ids, PromptImages(blobs, pixels)))
    samples = engine.sample(
        [i for i, _ in prompts], torch.Generator().manual_seed(0), [im for _, im in prompts]
    )
    return [
        Trajectory(
            run_id="vlm",
            prompt_id=p.prompt_id,
            group_id=str(i),
            sample_index=0,
            prompt_token_ids=np.asarray(ids, np.int32),
            response_token_ids=np.asarray(s.response_ids, np.int32),
            behaviour_logprobs=np.asarray(s.behaviour_logprobs, np.float32),
            teacher_logprobs=np.zeros(len(s.response_ids), np.float32),  # the HF teacher test scores them
            policy_version=0,
            finish_reason=s.finish_reason,
            behaviour_temperature=TEMPERATURE,
            images=im.blobs,
        )
        for i, (p, (ids, im), s) in enumerate(zip(problems, prompts, samples, strict=True))
    ]


def _learner_logprobs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        rows = response_rows(model, batch, real_vocab(model), never_sampled(model))  # as the engine calls it
    return torch.log_softmax(rows / TEMPERATURE, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


def test_behaviour_logprobs_with_images_equal_the_learners_recomputation(vlm_run):
    cfg, assets = vlm_run
    engine = HFEngine(cfg, assets)
    vision = load_vision(assets.student.path)
    problems = tasks.eval_set(cfg.task)[:6]
    trajs = _trajectories(cfg, engine, vision, problems)
    assert all(len(t.response_token_ids) for t in trajs)
    pad = engine.tokenizer.pad_token_id
    batch = collate(trajs, pad, pixels=pixel_reader(vision, cfg.images.max_pixels))
    assert batch.pixel_values.shape == (6, 3, 32, 32) and batch.image_counts.tolist() == [1] * 6
    learner = _learner_logprobs(engine.model, batch)
    mask = batch.mask.bool()
    assert torch.allclose(learner[mask], batch.behaviour[mask], atol=1e-5), (
        (learner - batch.behaviour).abs().max()
    )

    swapped = collate(trajs, pad, pixels=pixel_reader(vision, cfg.images.max_pixels))
    swapped.pixel_values = swapped.pixel_values.flip(0)  # each row sees another row's image
    assert not torch.allclose(_learner_logprobs(engine.model, swapped)[mask], learner[mask], atol=1e-3)

    part = batch.select([4, 1])  # a micro-batch: its rows and their own images
    assert torch.equal(part.pixel_values, batch.pixel_values[[4, 1]])
    assert torch.allclose(
        _learner_logprobs(engine.model, part)[part.mask.bool()], part.behaviour[part.mask.bool()], atol=1e-5
    )
    text_only = collate(trajs, pad)  # without the images the learner would train on other numbers
    assert text_only.pixel_values is None


def test_hf_teacher_logprobs_with_images_equal_a_direct_forward(vlm_run):
    cfg, assets = vlm_run
    engine = HFEngine(cfg, assets)
    vision = load_vision(assets.student.path)
    problems = tasks.eval_set(cfg.task)[:4]
    trajs = _trajectories(cfg, engine, vision, problems)
    teacher = HFTeacher(cfg, assets)
    teacher.score(trajs)
    model, processor = vlm.load_vlm(assets.teacher.path)
    for p, t in zip(problems, trajs, strict=True):
        enc = vlm.model_inputs(processor, [p])
        ids = torch.cat([enc["input_ids"][0], torch.as_tensor(t.response_token_ids, dtype=torch.long)])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[
                0, :, : len(processor.tokenizer)
            ]
        P = enc["input_ids"].shape[1]
        rows = torch.log_softmax(
            logits[P - 1 : P - 1 + len(t.response_token_ids)] / cfg.scorer.temperature, -1
        )
        direct = rows.gather(-1, torch.as_tensor(t.response_token_ids, dtype=torch.long)[:, None])[:, 0]
        assert np.allclose(t.teacher_logprobs, direct.numpy(), atol=1e-5)
        assert np.array_equal(t.teacher_topk_ids, rows.topk(4, -1).indices.numpy())
    blind = [
        Trajectory(**{**t.__dict__, "images": trajs[(i + 1) % 4].images}) for i, t in enumerate(trajs)
    ]  # each with another prompt's image
    teacher.score(blind)
    assert not all(
        np.allclose(a.teacher_logprobs, b.teacher_logprobs, atol=1e-3)
        for a, b in zip(trajs, blind, strict=True)
    )
