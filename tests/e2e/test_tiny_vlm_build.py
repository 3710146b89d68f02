"""The tiny vision-language models at their default recipes: the teacher learns the visual task, the student is
clearly weaker, and a build is deterministic (the same recipe gives the same bytes). Minutes on one thread,
hence the slow tier."""

from __future__ import annotations

import pytest

from opd import tasks
from opd.config import Config
from opd.models import builds, vlm

pytestmark = pytest.mark.slow


def _cfg(cache, **student) -> Config:
    return Config.model_validate(
        {
            "run": {"cache_dir": str(cache)},
            "task": {"kind": "visual_digits"},
            "student": {"kind": "tiny_vlm", **student},
            "teacher": {"kind": "tiny_vlm"},
        }
    )


def test_default_teacher_learns_the_visual_task_and_the_student_is_weaker(tmp_path):
    cfg = _cfg(tmp_path)
    assets = builds.ensure_assets(cfg, log=lambda *_: None)
    assert assets.teacher.eval_accuracy >= 0.9, assets.teacher.eval_accuracy
    assert assets.student.eval_accuracy <= assets.teacher.eval_accuracy - 0.2, assets.student.eval_accuracy
    # the saved accuracy is what the loaded model scores
    model, processor = vlm.load_vlm(assets.teacher.path)
    again = vlm.accuracy(model, processor, tasks.eval_set(cfg.task), cfg.sampling.max_new_tokens)
    assert again == assets.teacher.eval_accuracy


def test_the_same_recipe_builds_the_same_bytes(tmp_path):
    paths = []
    for run in ("a", "b"):
        cfg = _cfg(tmp_path / run, sft_steps=20)
        paths.append(builds.ensure_student_asset(cfg, log=lambda *_: None).path)
    first, second = (builds.file_digests(p) for p in paths)
    assert first == second
    assert "model.safetensors" in first and "processor_config.json" in first
