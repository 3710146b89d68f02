"""The HF student engine's stream generation (actors/engines/hf.py over opd/models/slots.py) as the streaming actor
drives it: requests with their own seeds, decode steps, a weight broadcast written into the engine's module between
two steps and `sync_weights` applying `actor.on_new_weights`; text and vision-language students."""

from __future__ import annotations

import copy

import pytest
import torch

from actors.engines.hf import HFEngine
from actors.engines.request import Request
from opd import tasks
from opd.config import load_config
from opd.images import ImageBlob
from opd.models.builds import ensure_assets
from opd.models.prompts import prompt_ids
from opd.models.sampler import response_logprobs
from opd.models.vision import PromptImages, load_vision
from tests.conftest import TINY


def drive(engine: HFEngine, requests: list[Request], max_inflight: int, update=None) -> dict:
    """Admit while slots are free, step until everything ended; `update(step)` may land weights between steps."""
    waiting, done, step = list(requests), {}, 0
    while waiting or engine.inflight():
        while waiting and engine.inflight() < max_inflight:
            engine.start(waiting.pop(0))
        if update is not None:
            update(step)
        done.update(engine.step())
        step += 1
    return done


def text_requests(engine: HFEngine, cfg, n: int) -> list[Request]:
    problems = tasks.training_stream(cfg.task, seed=5)
    return [Request(str(i), prompt_ids(engine.tokenizer, next(problems)), None, 100 + i) for i in range(n)]


@pytest.mark.parametrize("mode", ["recompute", "restart"])
def test_a_weight_update_between_steps_stamps_versions_and_logprobs_are_each_versions(quick_models, mode):
    cfg = load_config(
        TINY,
        [
            *quick_models,
            "actor.generation=stream",
            f"actor.on_new_weights={mode}",
            "sampling.max_new_tokens=8",
        ],
    )
    engine = HFEngine(cfg, ensure_assets(cfg, log=lambda *_: None))
    old = copy.deepcopy(engine.model)
    requests = text_requests(engine, cfg, 12)

    def update(step: int) -> None:
        if step == 3:  # what the broadcast does: write the new version into the module's parameters
            with torch.no_grad():
                g = torch.Generator().manual_seed(3)
                for p in engine.model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std().clamp(min=1e-3))
            engine.sync_weights(1)

    out = drive(engine, requests, max_inflight=8, update=update)
    assert sorted(out, key=int) == [r.key for r in requests]
    crossed = 0
    for r in requests:
        smp = out[r.key]
        v = smp.token_versions
        assert v == sorted(v) and set(v) <= {0, 1}  # non-decreasing, the versions held
        crossed += len(set(v)) == 2
        if mode == "restart":  # in flight at the update: started again, every token by version 1
            assert len(set(v)) == 1
        exact = {
            version: response_logprobs(
                model, [(r.prompt_ids, smp.response_ids)], pad_id=engine.tokenizer.pad_token_id
            )[0][0]
            for version, model in ((0, old), (1, engine.model))
        }
        want = torch.stack([exact[version][t] for t, version in enumerate(v)])
        torch.testing.assert_close(torch.tensor(smp.behaviour_logprobs), want, atol=2e-5, rtol=0)
    assert crossed > 0 if mode == "recompute" else crossed == 0


def test_streaming_a_vision_language_student_samples_what_one_batch_samples(tmp_path):
    """Newcomers are prefilled with their images while others decode: the same samples as all at once."""
    cfg = load_config(
        None,
        [
            f"run.cache_dir={tmp_path}",
            "task.kind=visual_digits",
            "task.eval_size=8",
            "student.kind=tiny_vlm",
            "student.sft_steps=0",
            "teacher.kind=tiny_vlm",
            "teacher.sft_steps=0",
            "actor.generation=stream",
            "sampling.max_new_tokens=6",
        ],
    )
    assets = ensure_assets(cfg, log=lambda *_: None)
    engine = HFEngine(cfg, assets)
    vision = load_vision(assets.student.path)
    problems = tasks.training_stream(cfg.task, seed=1, images=cfg.images)
    requests = []
    for i in range(6):
        p = next(problems)
        blobs = [ImageBlob.of(b) for b in p.images]
        ids, pixels = vision.expand(prompt_ids(engine.tokenizer, p), blobs, cfg.images.max_pixels)
        requests.append(Request(str(i), ids, PromptImages(blobs, pixels), 7 + i))
    whole = drive(engine, requests, max_inflight=6)
    refilled = drive(engine, requests, max_inflight=2)
    assert (
        len({len(s.response_ids) for s in whole.values()}) > 1
        or len({tuple(s.response_ids) for s in whole.values()}) > 1
    )
    for key, s in whole.items():
        assert refilled[key].response_ids == s.response_ids
        torch.testing.assert_close(
            torch.tensor(refilled[key].behaviour_logprobs),
            torch.tensor(s.behaviour_logprobs),
            atol=1e-5,
            rtol=0,
        )
