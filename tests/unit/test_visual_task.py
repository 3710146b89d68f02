"""The built-in visual task (task.kind: visual_digits) and the tiny VLM's config: deterministic images as PNG
bytes, a held-out split training never draws from, and sections refused with a message naming the fix."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from opd import tasks
from opd.config import Config, VisualDigitsTask


def _pixels(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_same_seed_same_images_and_other_seeds_others():
    task = VisualDigitsTask()
    first = tasks.eval_set(task)
    again = tasks.eval_set(task)
    assert [(p.prompt_id, p.images) for p in first] == [(p.prompt_id, p.images) for p in again]
    assert len(first) == task.eval_size == len({p.prompt_id for p in first})
    run = [(p.prompt_id, p.images) for p in itertools.islice(tasks.training_stream(task, seed=7), 50)]
    assert run == [(p.prompt_id, p.images) for p in itertools.islice(tasks.training_stream(task, seed=7), 50)]
    other = [p.prompt_id for p in itertools.islice(tasks.training_stream(task, seed=8), 50)]
    assert other != [pid for pid, _ in run]
    moved = tasks.eval_set(task.model_copy(update={"eval_seed": 1}))
    assert {p.prompt_id for p in moved} != {p.prompt_id for p in first}


def test_training_never_draws_a_held_out_image():
    task = VisualDigitsTask(eval_size=300)
    held = {p.prompt_id for p in tasks.eval_set(task)}
    held_bytes = {p.images[0] for p in tasks.eval_set(task)}
    drawn = list(itertools.islice(tasks.training_stream(task, seed=0), 3000))
    assert not held & {p.prompt_id for p in drawn}
    assert not held_bytes & {p.images[0] for p in drawn}  # the same picture never under another id
    assert {p.answer for p in drawn} == set("0123456789")


@pytest.mark.parametrize(("size", "digits", "scale"), [(32, 1, 2), (48, 2, 3)])
def test_each_problem_is_one_png_of_the_configured_size_showing_its_answer(size, digits, scale):
    task = VisualDigitsTask(image_size=size, max_digits=digits, scale=scale)
    for p in itertools.islice(tasks.training_stream(task, seed=3), 40):
        assert p.prompt.count(tasks.IMAGE_TOKEN) == len(p.images) == 1
        assert p.prompt == tasks.IMAGE_TOKEN + tasks.VISUAL_QUESTION
        assert isinstance(p.images[0], bytes) and p.images[0].startswith(b"\x89PNG\r\n\x1a\n")
        img = _pixels(p.images[0])
        assert (img.format, img.mode, img.size) == ("PNG", "L", (size, size))
        assert 1 <= len(p.answer) <= digits and p.answer.isdigit()
        # every dot of the answer's glyphs is drawn in ink, nothing else is
        _, _, x, y, ink, background = p.prompt_id.split(":")
        dots = sum(row.count("1") for d in p.answer for row in tasks.DIGIT_FONT[d])
        inked = int((np.asarray(img) == int(ink)).sum())
        assert inked == dots * scale * scale
        assert img.getpixel((0, 0)) == int(background)
        assert tasks.verify(p.answer, p.answer, tasks.verifier_mode(task))
        assert not tasks.verify(p.answer, p.answer + "=", tasks.verifier_mode(task))
    assert set(tasks.VISUAL_QUESTION) <= set(tasks.VISUAL_ALPHABET)


def test_a_number_too_wide_for_the_image_is_refused_naming_the_fields():
    with pytest.raises(
        ValidationError, match=r"lower task.scale or task.max_digits, or raise task.image_size"
    ):
        VisualDigitsTask(image_size=16, max_digits=2, scale=2)


def test_tiny_vlm_models_need_the_visual_task_and_patches_that_tile_its_images():
    ok = Config.model_validate(
        {"task": {"kind": "visual_digits"}, "student": {"kind": "tiny_vlm"}, "teacher": {"kind": "tiny_vlm"}}
    )
    assert ok.teacher.num_layers > ok.student.num_layers  # the teacher's defaults are a bigger model
    with pytest.raises(
        ValidationError, match=r"student.kind: tiny_vlm models are built for task.kind: visual"
    ):
        Config.model_validate({"student": {"kind": "tiny_vlm"}, "teacher": {"kind": "tiny_vlm"}})
    with pytest.raises(ValidationError, match=r"teacher.patch_size 5 does not divide task.image_size 32"):
        Config.model_validate(
            {
                "task": {"kind": "visual_digits"},
                "student": {"kind": "tiny_vlm"},
                "teacher": {"kind": "tiny_vlm", "patch_size": 5},
            }
        )
    with pytest.raises(
        ValidationError, match=r"student.kind: tiny models are built .* set student: {kind: tiny_vlm}"
    ):
        Config.model_validate({"task": {"kind": "visual_digits"}, "teacher": {"kind": "tiny_vlm"}})
