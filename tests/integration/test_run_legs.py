"""A run's legs (the first `opd run`, then each `--resume`): the resumed config, the record of what changed, the
summary across legs, and a run directory left by a start that failed before its first step.

These drive the launcher's own parts (rundir, report, Launcher) in this process; whole `opd run`s are in e2e."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import yaml

from opd.launch import report
from opd.launch.checks import load_run_config
from opd.launch.launcher import Launcher
from opd.launch.monitor import RunState
from opd.launch.rundir import LaunchError, prepare_run_dir, resolve_resume, resolve_run
from tests.conftest import TINY


def _first_leg(tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """A copy of the demo YAML and a run started from it (directory and config only)."""
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text(Path(TINY).read_text())
    out = tmp_path / "run"
    cfg = resolve_run(load_run_config(yaml_path, [f"run.output_dir={out}", *overrides]))
    prepare_run_dir(cfg, resume=False)
    return yaml_path, out


def test_resume_continues_from_the_runs_own_config_with_the_overrides_on_top(tmp_path):
    yaml_path, out = _first_leg(tmp_path, "learner.max_steps=200", "learner.lr=0.001")
    first = (out / "config.yaml").read_text()
    # The YAML named on the command line changes after the start: the resume must not pick that up.
    data = yaml.safe_load(yaml_path.read_text())
    data["learner"]["lr"] = 0.5
    yaml_path.write_text(yaml.safe_dump(data))

    overrides = [f"run.output_dir={out}", "learner.max_steps=300"]
    cfg = resolve_resume(yaml_path, overrides)
    assert cfg.learner.max_steps == 300  # the resume's override, on top
    assert cfg.learner.lr == 0.001  # the run's own value, not the edited YAML's
    assert cfg.run.run_id == yaml.safe_load(first)["run"]["run_id"]
    prepare_run_dir(cfg, resume=True, overrides=overrides)

    legs = json.loads((out / "legs.json").read_text())
    assert [leg["leg"] for leg in legs] == [1, 2]
    assert legs[1]["changed"]["learner.max_steps"] == [200, 300]
    assert legs[1]["overrides"] == overrides  # as typed
    assert "learner.lr" not in legs[1]["changed"]
    assert (out / "legs" / "1.config.yaml").read_text() == first  # the original config is kept
    assert yaml.safe_load((out / "config.yaml").read_text())["learner"]["max_steps"] == 300
    assert yaml.safe_load((out / legs[1]["config"]).read_text())["learner"]["max_steps"] == 300


def test_resume_needs_the_named_yaml_only_to_find_the_run(tmp_path):
    yaml_path, out = _first_leg(tmp_path, "learner.max_steps=7")
    yaml_path.write_text("learner: {max_stepz: 1}\n")  # since broken: the run's own config is what counts
    assert resolve_resume(yaml_path, [f"run.output_dir={out}"]).learner.max_steps == 7


def test_resume_refuses_a_directory_without_a_run(tmp_path):
    try:
        resolve_resume(TINY, [f"run.output_dir={tmp_path / 'nothing'}"])
    except LaunchError as exc:
        assert "nothing to resume" in str(exc)
    else:
        raise AssertionError("resumed a run that does not exist")


def _leg_summary(out: Path, cfg, generated: int, steps: int, wall_s: float) -> dict:
    """What the launcher writes at the end of one leg, from the records its components sent."""
    (out / "learner_summary.json").write_text(json.dumps({"learner_steps": steps, "weight_version": steps}))
    state = RunState()
    state.ingest({"component": "actor-0", "incarnation": "a", "trajectories_generated": generated}, 0.0)
    state.ingest({"component": "scorer-0", "incarnation": "s", "trajectories_scored": generated}, 0.0)
    before = {"teacher": None, "student": None}
    return report.write_summary(cfg, out, state, before, time.time() - wall_s, False)


def test_the_summary_covers_every_leg(tmp_path):
    yaml_path, out = _first_leg(tmp_path, "learner.max_steps=3")
    first = _leg_summary(out, load_run_config(out / "config.yaml"), 1000, 3, 60.0)
    assert first["trajectories_generated"] == 1000

    cfg = resolve_resume(yaml_path, [f"run.output_dir={out}", "learner.max_steps=4"])
    prepare_run_dir(cfg, resume=True)
    whole = _leg_summary(out, cfg, 64, 4, 15.0)

    assert whole["trajectories_generated"] == 1064
    assert whole["trajectories_scored"] == 1064
    assert 74.0 <= whole["wall_seconds"] < 80.0
    assert whole["learner_steps"] == 4  # the learner's own count is the run's already
    assert [(leg["leg"], leg["trajectories_generated"]) for leg in whole["legs"]] == [(1, 1000), (2, 64)]
    assert whole["legs"][1]["changed"]["learner.max_steps"] == [3, 4]
    assert json.loads((out / "summary.json").read_text()) == whole
    assert json.loads((out / "legs" / "2.summary.json").read_text())["trajectories_generated"] == 64


def test_a_run_that_fails_before_its_first_step_leaves_a_reusable_directory(tmp_path, quick_models):
    """Interrupted while its components start (the learner saves a student and checkpoint of 0 steps on
    SIGTERM): the directory keeps config and logs, is marked failed, and the next run may use it."""
    out = tmp_path / "run"
    cfg = resolve_run(
        load_run_config(TINY, [*quick_models, f"run.output_dir={out}", "run.shutdown_grace_s=30"])
    )
    launcher = Launcher(cfg)

    def interrupt_once_the_learner_runs():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sup = launcher.supervisor
            if sup is not None and any(c.role == "learner" for c in sup.components):
                break
            time.sleep(0.05)
        launcher.interrupted = True  # what Ctrl-C does

    threading.Thread(target=interrupt_once_the_learner_runs, daemon=True).start()
    launcher.run()

    failed = json.loads((out / "failed.json").read_text())
    assert failed["steps"] == 0
    assert (out / "logs").is_dir() and (out / "config.yaml").exists()
    assert not (out / "student").exists() and not (out / "checkpoints").exists()
    again = resolve_run(load_run_config(TINY, [*quick_models, f"run.output_dir={out}"]))
    prepare_run_dir(again, resume=False)  # reusable: not refused as another run's
    assert not (out / "failed.json").exists() and not (out / "logs" / "learner.log").exists()


def test_a_student_and_checkpoint_of_0_steps_do_not_block_the_next_run(tmp_path):
    """What a learner stopped before its first step leaves (issue 15 found six such directories): once the
    launcher has released it, the next run into the directory starts; one with a trained step is refused."""
    from opd.launch.rundir import has_trained, mark_failed

    _yaml, out = _first_leg(tmp_path)
    (out / "student").mkdir()
    (out / "checkpoints" / "step-000000").mkdir(parents=True)
    assert not has_trained(out)
    mark_failed(out, "scorer-0 exited")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "failed.json",
        "legs",
        "legs.json",
        "logs",
    ]
    prepare_run_dir(resolve_run(load_run_config(TINY, [f"run.output_dir={out}"])), resume=False)

    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a step was trained: never released, never reused
    assert has_trained(out)
    try:
        prepare_run_dir(resolve_run(load_run_config(TINY, [f"run.output_dir={out}"])), resume=False)
    except LaunchError as exc:
        assert "already holds a run" in str(exc)
    else:
        raise AssertionError("a trained run directory was reused")
