"""configs/two_teachers.yaml (issue 18's demo) finds its three models shipped in opd/demo_models/, builds nothing,
and the shipped experts are what the config's comment says: each clearly better than the student at its own
task. (The manifest's recipe and file hashes of every shipped model are checked by test_demo_models.py.)"""

from __future__ import annotations

from opd.config import load_config
from opd.models.builds import SHIPPED, ensure_assets, ensure_teacher_assets, shipped_manifest
from tests.conftest import REPO


def test_two_teachers_config_uses_shipped_models_without_building(tmp_path):
    cfg = load_config(REPO / "configs" / "two_teachers.yaml", [f"run.cache_dir={tmp_path}"])
    built = []
    teachers = ensure_teacher_assets(cfg, log=built.append)
    student = ensure_assets(cfg, log=built.append).student
    assert built == [] and list(tmp_path.iterdir()) == []
    for asset in (*teachers.values(), student):
        assert asset.path.startswith(str(SHIPPED)) and asset.eval_accuracy_by_task is not None
    assert teachers["adder"].eval_accuracy_by_task == {"addition": 0.97, "reversal": 0.0}
    assert teachers["reverser"].eval_accuracy_by_task == {"addition": 0.0, "reversal": 1.0}
    assert student.eval_accuracy_by_task == {"addition": 0.07, "reversal": 0.41}
    manifest = shipped_manifest()
    assert [manifest[a.path.rsplit("/", 1)[1]]["recipe"][2]["sft_task"] for a in teachers.values()] == [
        "addition",
        "reversal",
    ]
