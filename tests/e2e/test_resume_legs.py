"""`opd run` then `opd run --resume` with an override (issue 15): the resume continues from the run's own
config.yaml (an edited YAML on the command line changes nothing), the override is applied and recorded as leg 2,
and summary.json counts the whole run, each leg listed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, opd

pytestmark = pytest.mark.slow


def test_resume_with_an_override_continues_the_run_and_sums_its_legs(quick_models, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(Path(TINY).read_text())
    out = tmp_path / "run"
    common = [*quick_models, f"run.output_dir={out}"]
    first = opd("run", str(mine), *common, "learner.max_steps=3")
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log
    leg1 = json.loads((out / "summary.json").read_text())

    data = yaml.safe_load(mine.read_text())
    data["learner"]["lr"] = 0.5  # edited after the start: not the run's config
    mine.write_text(yaml.safe_dump(data))
    resumed = opd("run", str(mine), *common, "--resume", "learner.max_steps=5")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["learner"]["max_steps"] == 5 and config["learner"]["lr"] != 0.5
    assert yaml.safe_load((out / "legs" / "1.config.yaml").read_text())["learner"]["max_steps"] == 3
    whole = json.loads((out / "summary.json").read_text())
    assert whole["learner_steps"] == 5
    assert [leg["leg"] for leg in whole["legs"]] == [1, 2]
    assert whole["legs"][1]["changed"]["learner.max_steps"] == [3, 5]
    assert "learner.max_steps=5" in whole["legs"][1]["overrides"]
    leg2 = whole["legs"][1]
    assert whole["trajectories_generated"] == leg1["trajectories_generated"] + leg2["trajectories_generated"]
    assert whole["wall_seconds"] == pytest.approx(leg1["wall_seconds"] + leg2["wall_seconds"])
