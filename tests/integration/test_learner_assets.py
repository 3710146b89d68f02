"""With `teachers:` the learner finds its models as the first pool sees the run: the shipped demo models, at once,
not a build of the unused teacher section's default recipe (minutes before the first step)."""

from __future__ import annotations

from pathlib import Path

import yaml

from learner.learner import student_assets
from opd.config import load_config
from opd.models.builds import ensure_assets
from tests.conftest import TINY


def test_the_learner_finds_the_pools_models_not_the_unused_teacher_section(tmp_path, asset_cache):
    data = yaml.safe_load(Path(TINY).read_text())
    data["teachers"] = {"adder": {"model": data.pop("teacher")}, "speller": {"model": {"seed": 1}}}
    data["routing"] = {"default": "adder"}
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(data))
    cache = [f"run.cache_dir={asset_cache}"]
    got = student_assets(load_config(two, cache))
    want = ensure_assets(load_config(TINY, cache), log=lambda *a: None)
    assert (got.student.path, got.teacher.path) == (want.student.path, want.teacher.path)
