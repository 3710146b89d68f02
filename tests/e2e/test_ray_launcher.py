"""`opd run --launcher ray` on a local Ray (2 CPUs): the components run as processes owned by Ray actors, the run
writes the same directory and summary as `opd run`, `opd scale` works, and nothing is left running afterwards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, opd, wait_for

pytestmark = pytest.mark.slow

RAY_PROCESS_MARKS = (
    b"raylet",
    b"gcs_server",
    b"ray::",
    b"default_worker.py",
    b"ray/dashboard",
    b"log_monitor",
)


def _processes(*needles: bytes) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if state != "Z" and any(n in cmd for n in needles):
            found.add(int(entry.name))
    return found


def _args(prepared, out_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        TINY,
        "--launcher",
        "ray",
        f"run.cache_dir={prepared}",
        f"run.output_dir={out_dir}",
        "run.progress=false",
        "ray.num_cpus=2",
        "learner.batch_size=32",
        "actor.prompts_per_batch=8",
        "learner.eval_every=0",
        *extra,
    ]


def _nothing_left(out_dir: Path, ray_before: set[int]) -> None:
    ours = str(out_dir).encode()
    wait_for(lambda: not _processes(ours), 60, f"the components of {out_dir} to exit")
    wait_for(lambda: not (_processes(*RAY_PROCESS_MARKS) - ray_before), 60, "Ray's processes to exit")


def test_ray_run_trains_and_cleans_up(prepared, tmp_path):
    out_dir = tmp_path / "run"
    ray_before = _processes(*RAY_PROCESS_MARKS)
    proc = opd(*_args(prepared, out_dir, "learner.max_steps=4"))
    try:
        log, _ = proc.communicate(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log
    for name in ("broker", "learner", "actor-0", "scorer-0"):
        assert f"ray: {name} placed" in log, log
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["learner_steps"] == 4 and summary["trajectories_trained"] == 4 * 32
    assert summary["trajectories_generated"] >= 4 * 32 and summary["trajectories_scored"] >= 4 * 32
    assert (out_dir / "student" / "config.json").exists() and (out_dir / "logs" / "scorer-0.log").exists()
    _nothing_left(out_dir, ray_before)


def _scale(config: Path, n: int) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opd", "scale", "--config", str(config), f"scorers={n}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def _events(out_dir: Path) -> list[dict]:
    path = out_dir / "scaling.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_ray_scale_up_and_down(prepared, tmp_path):
    out_dir = tmp_path / "run"
    ray_before = _processes(*RAY_PROCESS_MARKS)
    proc = opd(*_args(prepared, out_dir, "learner.max_steps=100000", "scaling.interval_s=2"))
    try:
        wait_for(lambda: (out_dir / "metrics.jsonl").exists(), 600, "the first learner steps")
        _scale(out_dir / "config.yaml", 2)
        wait_for(
            lambda: any(r.get("scored", {}).get("scorer-1", 0) > 0 for r in _events(out_dir)),
            300,
            "scorer-1 (placed by Ray) to score",
        )
        _scale(out_dir / "config.yaml", 1)
        wait_for(lambda: any(r["event"] == "stopped" for r in _events(out_dir)), 120, "scorer-1 to stop")
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, log
    assert "ray: scorer-1 placed" in log and "exited with code" not in log
    events = [
        (r["event"], r.get("name"), r.get("code")) for r in _events(out_dir) if r["event"] != "interval"
    ]
    assert [e for e in events if e[0] != "decision"] == [
        ("started", "scorer-1", None),
        ("retired", "scorer-1", None),
        ("stopped", "scorer-1", 0),
    ]
    assert json.loads((out_dir / "summary.json").read_text())["learner_steps"] > 0
    _nothing_left(out_dir, ray_before)


def test_ray_two_teacher_run_joins_every_mixture(prepared, tmp_path):
    """Two teachers' pools under Ray, every prompt a 1:1 mixture of both. Ray places the pools one after the other
    (seconds apart), so the first pool scores for a while alone: with one `scored` stream its held copies filled
    the stream and blocked the second pool's scorers until routing.join_timeout_s dead-lettered every mixture
    (the "second pool never scores under Ray" report of issue 18). Each pool's own scored stream keeps both moving:
    every trained trajectory is a full join, nothing dead-lettered."""
    import yaml

    data = yaml.safe_load(Path(TINY).read_text())
    teacher = data.pop("teacher")
    data["teachers"] = {
        "adder": {"model": teacher},
        "speller": {"model": teacher, "scorer": {"num_scorers": 2}},
    }
    data["routing"] = {"default": {"adder": 1, "speller": 1}, "join_timeout_s": 120}
    data.get("broker", {}).pop("max_depth", None)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    out_dir, steps, batch = tmp_path / "run", 4, 16
    ray_before = _processes(*RAY_PROCESS_MARKS)
    args = _args(
        prepared, out_dir, "ray.num_cpus=3", f"learner.max_steps={steps}", f"learner.batch_size={batch}"
    )
    args[1] = str(config)
    proc = opd(*args, "scorer.batch_size=8")
    try:
        log, _ = proc.communicate(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log
    for name in ("scorer-adder-0", "scorer-speller-0", "scorer-speller-1"):
        assert f"ray: {name} placed" in log, log
    learner = json.loads((out_dir / "learner_summary.json").read_text())
    assert learner["learner_steps"] == steps and learner["trajectories_trained"] == steps * batch, learner
    assert (learner["dead_lettered"], learner["partial_joins"], learner["duplicates_skipped"]) == (0, 0, 0)
    scored = {
        name: c.get("trajectories_scored", 0)
        for name, c in json.loads((out_dir / "summary.json").read_text())["components"].items()
        if name.startswith("scorer-")
    }
    # one copy of every trained trajectory from each pool. A scorer Ray placed last may still be loading its
    # teacher when the short run ends: it never reports, so it has no entry (it scored nothing), not a failure
    assert scored.get("scorer-adder-0", 0) >= steps * batch, scored
    assert scored.get("scorer-speller-0", 0) + scored.get("scorer-speller-1", 0) >= steps * batch, scored
    _nothing_left(out_dir, ray_before)
