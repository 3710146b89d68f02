"""Scorers added and removed while a run trains, end to end with real processes: `opd scale` reaches the launcher,
which starts and stops scorer processes; each scorer contributes while it runs; the books balance by id."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, children_of, opd_run, wait_for
from tests.e2e.test_chaos import accounting

pytestmark = pytest.mark.slow

INTERVAL_S = 2.0


def _records(out_dir: Path) -> list[dict]:
    path = out_dir / "scaling.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _scorer_pids(launcher_pid: int) -> dict[int, int]:
    """index -> pid of the launcher's live scorer processes."""
    found = {}
    for pid in children_of(launcher_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if b"scorer" in cmd and state != "Z":
            found[int(cmd[cmd.index(b"--index") + 1])] = pid
    return found


def _scale(config: Path, n: int) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opd", "scale", "--config", str(config), f"scorers={n}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"for {n} scorers" in out.stdout


def _contributed(out_dir: Path, name: str) -> bool:
    return any(r.get("scored", {}).get(name, 0) > 0 for r in _records(out_dir) if r["event"] == "interval")


def test_add_two_scorers_then_remove_one(prepared, redis_server, tmp_path):
    out_dir = tmp_path / "run"
    proc = opd_run(
        prepared,
        out_dir,
        "run.progress=false",
        "broker.type=redis",
        f"broker.url={redis_server.url}",
        "broker.claim_idle_s=2",
        "learner.max_steps=100000",  # the test ends it with Ctrl-C once the scenario is done
        "learner.batch_size=32",
        "learner.eval_every=0",
        "learner.checkpoint_every=20",
        "actor.prompts_per_batch=8",
        "scorer.num_scorers=1",
        "scorer.batch_size=16",
        f"scaling.interval_s={INTERVAL_S}",
    )
    try:
        wait_for(lambda: (out_dir / "metrics.jsonl").exists(), 400, "the first learner steps")
        assert set(_scorer_pids(proc.pid)) == {0}

        _scale(out_dir / "config.yaml", 3)
        wait_for(lambda: set(_scorer_pids(proc.pid)) == {0, 1, 2}, 60, "scorer-1 and scorer-2 processes")
        wait_for(
            lambda: _contributed(out_dir, "scorer-1") and _contributed(out_dir, "scorer-2"),
            300,
            "both new scorers to score",
        )
        time.sleep(3 * INTERVAL_S)  # a few intervals with three scorers

        _scale(out_dir / "config.yaml", 2)
        wait_for(lambda: set(_scorer_pids(proc.pid)) == {0, 1}, 60, "scorer-2 to stop")
        wait_for(
            lambda: any(r["event"] == "stopped" for r in _records(out_dir)), 30, "the launcher to see it stop"
        )
        time.sleep(5 * INTERVAL_S)  # a few intervals with two scorers
        proc.send_signal(signal.SIGINT)  # saves, announces stop, reports
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, log
    assert "scale scorers 1 -> 3" in log and "scale scorers 3 -> 2" in log
    assert "exited with code" not in log  # a scorer removed on purpose is not a failure

    records = _records(out_dir)
    events = [(r["event"], r.get("name")) for r in records if r["event"] in ("started", "retired", "stopped")]
    assert events == [
        ("started", "scorer-1"),
        ("started", "scorer-2"),
        ("retired", "scorer-2"),
        ("stopped", "scorer-2"),
    ]
    stopped = next(r for r in records if r["event"] == "stopped")
    assert stopped["code"] == 0  # it ran its SIGTERM path (finish, publish, ack), not the default death
    intervals = [r for r in records if r["event"] == "interval"]
    for r in intervals:
        print(f"{r['time'] - intervals[0]['time']:6.1f}s active {len(r['active'])} scored {r['scored']}")
    # Only running scorers score: scorer-2 has nothing in intervals that began after it stopped (1 s slack
    # for the launcher to drain its final metrics record), and all three scored within the run.
    after = [r for r in intervals if r["time"] - r["seconds"] > stopped["time"] + 1.0]
    assert after and all("scorer-2" not in r["scored"] for r in after)
    assert any(r["scored"].get("scorer-1", 0) > 0 for r in after)  # the survivor keeps working
    assert {"scorer-0", "scorer-1", "scorer-2"} <= {n for r in intervals for n in r["scored"]}

    summary = json.loads((out_dir / "summary.json").read_text())
    books = accounting(out_dir, redis_server.url)
    assert books["trained"] == books["trained_unique"] == summary["learner_steps"] * 32  # exactly once
    assert books["unaccounted"] == [] and books["trained_not_generated"] == []
    assert summary["trajectories_scored"] >= books["trained"]
