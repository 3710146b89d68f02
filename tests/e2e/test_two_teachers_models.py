"""The models of issue 18's demo (configs/two_teachers.yaml), built through the production build: each expert
teacher, trained on one task of the mixture only, is clearly better at its own task than the student (which saw
a little of both), and worse at the other task than at its own; so routing each task to its expert gives the
student something to learn on both. Three builds take minutes on 2 cores (cached in the session's asset cache
afterwards), hence the slow tier."""

from __future__ import annotations

import pytest

from opd.config import load_config
from opd.models.builds import ensure_assets, ensure_teacher_assets
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEMO = REPO / "configs" / "two_teachers.yaml"
EXPERTS = {"adder": "addition", "reverser": "reversal"}
MARGIN = 0.3  # held-out accuracy an expert is above the student on its own task, at least


def test_each_expert_beats_the_student_on_its_own_task(asset_cache):
    cfg = load_config(DEMO, [f"run.cache_dir={asset_cache}"])
    teachers = ensure_teacher_assets(cfg)
    student = ensure_assets(cfg).student.eval_accuracy_by_task
    assert set(student) == {"addition", "reversal"}
    for name, own in EXPERTS.items():
        acc = teachers[name].eval_accuracy_by_task
        other = next(t for t in acc if t != own)
        assert acc[own] >= student[own] + MARGIN, (name, acc, student)
        assert acc[own] > acc[other], (name, acc)
