"""The models of issue 18's demo (configs/two_teachers.yaml): the student rebuilt from its recipe through the
production build gives the shipped bytes (on the kind of CPU that shipped them; on another, the shipped
accuracy), and each shipped expert teacher, trained on one task of the mixture only,
is clearly better at its own task than the student (which saw a little of both) and better at its own task than at
the other; so routing each task to its expert gives the student something to learn on both. The teachers are not
rebuilt here (5 to 15 minutes on 2 cores): `opd prepare configs/two_teachers.yaml --rebuild` does that and says
whether each is identical to the shipped one; tests/integration/test_demo_model_build.py proves a teacher build
deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd.config import load_config
from opd.models.builds import (
    compare_with_shipped,
    ensure_student_asset,
    ensure_teacher_assets,
    shipped_manifest,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEMO = REPO / "configs" / "two_teachers.yaml"
EXPERTS = {"adder": "addition", "reverser": "reversal"}
MARGIN = 0.3  # held-out accuracy an expert is above the student on its own task, at least


def test_each_expert_beats_the_student_on_its_own_task(tmp_path):
    cfg = load_config(DEMO, [f"run.cache_dir={tmp_path}"])
    student = ensure_student_asset(cfg, rebuild=True)
    assert student.path.startswith(str(tmp_path))
    # Same bytes are promised on the same kind of CPU only (README "Demo models"): another vector instruction set
    # (this session's CPU has AVX512-FP16; the CI that shipped them passed this byte check) picks other kernels.
    # There the recipe must still give the shipped student's held-out accuracy.
    if compare_with_shipped(student) != "identical to":
        shipped = shipped_manifest()[Path(student.path).name]["eval_accuracy"]
        assert abs(student.eval_accuracy - shipped) <= 0.03, (student.eval_accuracy, shipped)
    teachers = ensure_teacher_assets(cfg)  # the shipped ones: nothing is built
    assert set(teachers) == set(EXPERTS)
    student_acc = student.eval_accuracy_by_task
    assert set(student_acc) == {"addition", "reversal"}
    for name, own in EXPERTS.items():
        acc = teachers[name].eval_accuracy_by_task
        other = next(t for t in acc if t != own)
        assert acc[own] >= student_acc[own] + MARGIN, (name, acc, student_acc)
        assert acc[own] > acc[other], (name, acc)
