"""The tiny vision-language demo models: the shipped teacher and student of configs/tiny_vlm.yaml are found without
building, the teacher reads the visual task, the student is clearly weaker, and each scores what its build
recorded when loaded back; a build is deterministic (the same recipe gives the same bytes). Building the default
teacher takes about 4 minutes on one thread, so the shipped models are checked instead (seconds) and the
determinism check builds a 20-step student twice (seconds). Slow tier: it loads and evaluates two models."""

from __future__ import annotations

import subprocess
import sys

import pytest

from opd import tasks
from opd.config import Config, load_config
from opd.models import builds, vlm
from opd.runtime.threads import BUILD_THREADS, threads
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEMO = REPO / "configs" / "tiny_vlm.yaml"
JSONL_DEMO = REPO / "configs" / "tiny_vlm_jsonl.yaml"


def _cfg(cache, **student) -> Config:
    return Config.model_validate(
        {
            "run": {"cache_dir": str(cache)},
            "task": {"kind": "visual_digits"},
            "student": {"kind": "tiny_vlm", **student},
            "teacher": {"kind": "tiny_vlm"},
        }
    )


def test_shipped_teacher_reads_the_task_and_the_student_is_weaker(tmp_path):
    cfg = load_config(DEMO, [f"run.cache_dir={tmp_path}"])
    built = []
    assets = builds.ensure_assets(cfg, log=built.append)
    assert built == [] and list(tmp_path.iterdir()) == []  # shipped: nothing built, nothing cached
    teacher, student = assets.teacher, assets.student
    for asset in (teacher, student):
        assert asset.path.startswith(str(builds.SHIPPED)) and "-vlm-" in asset.path, asset.path
    assert teacher.eval_accuracy >= 0.9, teacher.eval_accuracy
    assert student.eval_accuracy <= teacher.eval_accuracy - 0.2, student.eval_accuracy
    # the recorded accuracy is what the loaded model scores (greedy, at the build's thread count)
    problems = tasks.eval_set(cfg.task)
    with threads(BUILD_THREADS):
        for asset in (teacher, student):
            model, processor = vlm.load_vlm(asset.path)
            again = vlm.accuracy(model, processor, problems, cfg.sampling.max_new_tokens)
            assert again == asset.eval_accuracy, (asset.path, again)


def test_the_jsonl_demo_uses_the_demos_shipped_models_and_the_default_student_ships(tmp_path):
    files = tmp_path / "jsonl"
    out = subprocess.run(
        [sys.executable, "scripts/make_visual_jsonl.py", str(files), "--train-size", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cache = tmp_path / "cache"
    overrides = [f"task.{s}_path={files / s}.jsonl" for s in ("train", "eval")]
    cfg = load_config(JSONL_DEMO, [f"run.cache_dir={cache}", *overrides])
    built = []
    assets = builds.ensure_assets(cfg, log=built.append)
    assert built == [] and not cache.exists()
    demo = builds.ensure_assets(load_config(DEMO, [f"run.cache_dir={cache}"]), log=built.append)
    assert (assets.teacher.path, assets.student.path) == (
        demo.teacher.path,
        demo.student.path,
    )  # the same models
    assert assets.student.path.startswith(str(builds.SHIPPED)) and "student-vlm-" in assets.student.path
    # a user's `student: {kind: tiny_vlm}` (the defaults) is shipped too: weaker than the teacher, not useless
    default = builds.ensure_assets(
        load_config(DEMO, [f"run.cache_dir={cache}", "student={kind: tiny_vlm}"]), log=built.append
    )
    assert built == [] and default.student.path.startswith(str(builds.SHIPPED))
    assert 0.1 < default.student.eval_accuracy <= default.teacher.eval_accuracy - 0.2


def test_the_same_recipe_builds_the_same_bytes(tmp_path):
    paths = []
    for run in ("a", "b"):
        cfg = _cfg(tmp_path / run, sft_steps=20)
        paths.append(builds.ensure_student_asset(cfg, log=lambda *_: None).path)
    first, second = (builds.file_digests(p) for p in paths)
    assert first == second
    assert "model.safetensors" in first and "processor_config.json" in first
