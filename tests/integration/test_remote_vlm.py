"""A vision-language teacher behind SGLang's `/generate` (tests/fake_sglang.py: a real HTTP server, a real tiny
LLaVA): the scorer sends each trajectory's images as `image_data` data URIs with one image id per image in
`input_ids`; the server expands them with the model's processor. The client's logprobs are compared with a direct
Hugging Face forward of the same model on the trajectory's expanded ids and pixel values."""

from __future__ import annotations

import base64
import functools
import re

import httpx
import numpy as np
import pytest

from opd import tasks
from opd.config import Config
from opd.images import ImageBlob
from opd.models import builds, vlm
from opd.models.sampler import response_logprobs
from opd.models.vision import load_vision
from opd.protocol import Trajectory
from teacher_scorers.backends import PartlyScored, TeacherError
from teacher_scorers.backends.sglang import SGLangTeacher
from tests.fake_sglang import FakeSGLang
from tests.vlm_models import image_trajectory

TOPK = 4
ATOL = 1e-5  # the server runs one unpadded forward per request, as the reference below does


def _cfg(cache, url: str = "http://127.0.0.1:1", api: str = "sglang") -> Config:
    return Config.model_validate(
        {
            "run": {"cache_dir": str(cache)},
            "task": {"kind": "visual_digits", "eval_size": 6},
            "student": {"kind": "tiny_vlm", "sft_steps": 0},
            "teacher": {"kind": "tiny_vlm", "sft_steps": 0},
            "scorer": {
                "engine": "remote",
                "topk": TOPK,
                "remote": {
                    "url": url,
                    "api": api,
                    "backoff_s": 0.01,
                    **({"model": "m"} if api != "sglang" else {}),
                },
            },
        }
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vlm")
    assets = builds.ensure_assets(_cfg(cache), log=lambda *_: None)
    server = FakeSGLang(assets.teacher.path).start()
    yield cache, assets, server
    server.stop()


_trajectory = image_trajectory


@pytest.fixture(scope="module")
def trajs(built) -> list[Trajectory]:
    """Held-out visual prompts (expanded ids, as actors send them) with responses of mixed lengths."""
    cache, assets, _ = built
    _, processor = vlm.load_vlm(assets.student.path)
    tok = processor.tokenizer
    out = []
    for i, p in enumerate(tasks.eval_set(_cfg(cache).task)[:4]):
        response = tok(p.answer, add_special_tokens=False)["input_ids"] * (1 + i % 3) + [tok.eos_token_id]
        out.append(
            _trajectory(i, vlm.prompt_ids(processor, p), response, [ImageBlob.of(b) for b in p.images])
        )
    return out


@functools.cache
def _teacher(path: str):
    return vlm.load_vlm(path)


def _reference(assets, t: Trajectory, images: list[ImageBlob] | None):
    """The teacher's logprobs and top-k for `t` from one HF forward with the pixel values of `images`."""
    model, processor = _teacher(assets.teacher.path)
    pixels = load_vision(assets.teacher.path).prompt_pixels(t.prompt_token_ids.tolist(), images)
    seq = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist())]
    lp, ids, vals = response_logprobs(
        model, seq, pad_id=processor.tokenizer.pad_token_id, topk=TOPK, pixel_values=pixels
    )
    return lp[0].numpy(), ids[0].numpy(), vals[0].numpy()


def test_images_go_as_image_data_and_logprobs_equal_hf(built, trajs):
    cache, assets, server = built
    teacher = SGLangTeacher(_cfg(cache, server.url), assets)
    first = len(server.requests)
    teacher.score(trajs)
    image_id = load_vision(assets.student.path).image_token_id
    for t in trajs:
        lp, ids, vals = _reference(assets, t, t.images)
        np.testing.assert_allclose(t.teacher_logprobs, lp, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(t.teacher_topk_ids, ids)
        np.testing.assert_allclose(t.teacher_topk_logprobs, vals, atol=ATOL, rtol=0)
        # swapped images: the same ids score differently, so the server used the images it was sent
        other = trajs[(trajs.index(t) + 1) % len(trajs)].images
        swapped = _reference(assets, t, other)[0]
        assert np.abs(swapped - lp).max() > 1e-3
    # SGLang's wire format: one image id per image in input_ids, the images as data URIs of their own bytes,
    # logprob positions counted in the expanded prompt (the server expands before it scores)
    bodies = [r["body"] for r in server.requests[first:]]
    assert len(bodies) == len(trajs)
    for body in bodies:
        t = next(t for t in trajs if body["image_data"] == [_uri(b) for b in t.images])
        prompt = t.prompt_token_ids.tolist()
        assert body["input_ids"].count(image_id) == 1 and prompt.count(image_id) == 16
        assert body["input_ids"] == [
            i for j, i in enumerate(prompt) if i != image_id or prompt[j - 1] != image_id
        ] + (t.response_token_ids.tolist())
        assert body["logprob_start_len"] == len(prompt) - 1
        assert base64.b64decode(body["image_data"][0].split(",", 1)[1]) == t.images[0].data
        assert body["image_data"][0].startswith("data:image/png;base64,")


def _uri(blob: ImageBlob) -> str:
    return f"data:image/{blob.format};base64,{base64.b64encode(blob.data).decode()}"


def test_a_text_trajectory_to_a_vlm_server_still_works(built, trajs):
    cache, assets, server = built
    tok = vlm.load_vlm(assets.student.path)[1].tokenizer
    text = _trajectory(9, tok("What number?")["input_ids"], trajs[0].response_token_ids.tolist(), None)
    SGLangTeacher(_cfg(cache, server.url), assets).score([text])
    assert "image_data" not in server.requests[-1]["body"]
    lp, ids, _ = _reference(assets, text, None)
    np.testing.assert_allclose(text.teacher_logprobs, lp, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(text.teacher_topk_ids, ids)


def test_placeholders_and_images_that_disagree_are_refused(built, trajs):
    """By the server, as SGLang does (HTTP 400), and by the client before sending (not retried)."""
    cache, assets, server = built
    t = trajs[0]
    uri = _uri(t.images[0])
    prompt = t.prompt_token_ids.tolist()
    image_id = load_vision(assets.student.path).image_token_id
    one = [i for j, i in enumerate(prompt) if i != image_id or prompt[j - 1] != image_id]
    base = {
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": len(one) - 1,
    }
    cases = [
        (
            {"input_ids": prompt, "image_data": [uri]},
            "prompt has 16 image placeholder token\\(s\\) but 1 image",
        ),
        (
            {"input_ids": one, "image_data": [uri, uri]},
            "prompt has 1 image placeholder token\\(s\\) but 2 image",
        ),
        ({"input_ids": one, "image_data": [t.images[0].data.hex()]}, "not a data:image/png"),
        (
            {"input_ids": one, "image_data": ["data:image/jpeg;base64," + uri.split(",")[1]]},
            "holds png bytes",
        ),
    ]
    for req, message in cases:
        resp = httpx.post(f"{server.url}/generate", json={**base, **req})
        assert resp.status_code == 400
        assert re.search(message, resp.json()["error"]["message"])
    ok = httpx.post(f"{server.url}/generate", json={**base, "input_ids": one, "image_data": [uri]})
    assert ok.status_code == 200
    teacher = SGLangTeacher(_cfg(cache, server.url), assets)
    sent = len(server.requests)
    bad = [
        _trajectory(0, prompt, t.response_token_ids.tolist(), t.images * 2),  # 16 ids, 2 images
        _trajectory(1, prompt[:-20] + prompt[-19:], t.response_token_ids.tolist(), t.images),  # 15 ids
        _trajectory(2, prompt, t.response_token_ids.tolist(), None),  # image ids, no images
    ]
    with pytest.raises(PartlyScored) as e:
        teacher.score(bad)
    assert sorted(e.value.failures) == [0, 1, 2] and len(server.requests) == sent
    reasons = [e.value.failures[i] for i in range(3)]
    assert all(isinstance(r, TeacherError) and not r.retryable for r in reasons)
    assert "holds 1 expanded image placeholder(s) (id 28) but has 2 image(s)" in str(reasons[0])
    assert "has 15 image ids" in str(reasons[1]) and "no images" in str(reasons[2])


def test_an_api_without_images_refuses_them(built, trajs):
    """OpenAI-style /v1/completions takes ids only: a trajectory with images is refused, not scored blind."""
    from teacher_scorers.backends.openai import OpenAITeacher

    cache, assets, _ = built
    teacher = OpenAITeacher.__new__(OpenAITeacher)  # only the image refusal is exercised: no server
    teacher.cfg, teacher.vision = _cfg(cache, api="openai"), load_vision(assets.student.path)
    with pytest.raises(TeacherError, match="api: openai sends token ids only"):
        teacher._image_prompt(trajs[0].prompt_token_ids.tolist(), trajs[0].images, "x")
