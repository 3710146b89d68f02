"""Several teachers through `opd prepare` and `opd run` (issue 18): every teacher's model is found or built and
its accuracy measured on its own; a run starts a scorer pool per teacher under its own names, warns about a
teacher no route reaches, scales one pool from 1 to 3 scorers and back to 2 with `opd scale scorers.<teacher>=N`
while it trains (refusing `scorers=N`), the new scorers score, the other pool stays as it was, and its summary
names every pool's scorers and each teacher's accuracy."""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opd.config import load_config
from tests.conftest import REPO, TINY, children_of, opd, wait_for

pytestmark = pytest.mark.slow

INTERVAL_S = 2.0


def _config(tmp_path: Path, teachers: dict, routing: dict) -> Path:
    """configs/tiny.yaml with `teachers:` and `routing:` in place of its one `teacher:` section."""
    data = yaml.safe_load(Path(TINY).read_text())
    data.pop("teacher")
    data.update(teachers=teachers, routing=routing)
    data.get("broker", {}).pop("max_depth", None)  # derived: one learner batch per teacher's stream
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _demo_teacher() -> dict:
    return dict(yaml.safe_load(Path(TINY).read_text())["teacher"])


def test_prepare_finds_or_builds_every_teacher_and_measures_each(asset_cache, tmp_path):
    untrained = {**_demo_teacher(), "sft_steps": 0, "num_layers": 2}
    path = _config(
        tmp_path,
        {"adder": {"model": _demo_teacher()}, "speller": {"model": untrained}},
        {"default": {"adder": 1, "speller": 1}},
    )
    proc = opd("prepare", str(path), f"run.cache_dir={asset_cache}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "teacher adder: shipped with the code" in out, out
    assert "teacher speller: " in out and "student: shipped with the code" in out, out

    from opd.launch.report import accuracy_before

    logged: list[str] = []
    cfg = load_config(str(path), [f"run.cache_dir={asset_cache}"])
    acc = accuracy_before(cfg, lambda *a, **_: logged.append(" ".join(map(str, a))))
    assert set(acc["teachers"]) == {"adder", "speller"} and acc["teacher"] == acc["teachers"]["adder"]
    assert all(isinstance(a, float) for a in (*acc["teachers"].values(), acc["student"])), acc
    assert any(
        line.startswith("teachers' held-out accuracy: adder ") and "speller" in line for line in logged
    )


def _scorer_pools_unmerged() -> bool:
    from teacher_scorers.scorer import main

    return "teacher" not in inspect.signature(main).parameters


def _scorers(launcher_pid: int) -> dict[str, int]:
    """`--teacher` (default if none) and `--index` of the launcher's live scorers: name -> pid."""
    found = {}
    for pid in children_of(launcher_pid):
        try:
            cmd = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if "scorer" in cmd and state != "Z":
            teacher = cmd[cmd.index("--teacher") + 1] if "--teacher" in cmd else None
            index = cmd[cmd.index("--index") + 1]
            found[f"scorer-{teacher}-{index}" if teacher else f"scorer-{index}"] = pid
    return found


def _scale(config: Path, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd", "scale", "--config", str(config), *targets],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _records(out_dir: Path) -> list[dict]:
    path = out_dir / "scaling.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _contributed(out_dir: Path, name: str) -> bool:
    return any(r.get("scored", {}).get(name, 0) > 0 for r in _records(out_dir) if r["event"] == "interval")


@pytest.mark.skipif(
    _scorer_pools_unmerged(),
    reason="needs branch i18-route (the scorer's --teacher: teacher_scorers.scorer.main(cfg, index, teacher=...), "
    "the actors' routing) and i18-join (the learner joins a mixture's copies)",
)
def test_two_teachers_run_with_a_pool_each_scaled_on_its_own(prepared, tmp_path):
    teacher = _demo_teacher()
    path = _config(
        tmp_path,
        {
            "adder": {"model": teacher},
            "speller": {"model": teacher},
            "idle": {"model": teacher},
        },
        {"default": {"adder": 1, "speller": 1, "idle": 0}},
    )
    out_dir = tmp_path / "run"
    proc = opd(
        "run",
        str(path),
        f"run.cache_dir={prepared}",
        f"run.output_dir={out_dir}",
        "run.progress=false",
        "learner.max_steps=100000",  # ended with Ctrl-C once the scenario is done
        "learner.batch_size=16",
        "learner.eval_every=0",
        "actor.prompts_per_batch=8",
        "scorer.batch_size=8",
        f"scaling.interval_s={INTERVAL_S}",
    )
    try:
        wait_for(lambda: (out_dir / "metrics.jsonl").exists(), 400, "the first learner steps")
        first = {"scorer-adder-0", "scorer-speller-0", "scorer-idle-0"}
        assert set(_scorers(proc.pid)) == first

        refused = _scale(out_dir / "config.yaml", "scorers=2")
        assert refused.returncode == 2 and "several teachers (adder, speller, idle)" in refused.stderr
        grown = _scale(out_dir / "config.yaml", "scorers.speller=3")  # 1 -> 3 while it trains
        assert grown.returncode == 0, grown.stderr
        pools = first | {"scorer-speller-1", "scorer-speller-2"}
        wait_for(lambda: set(_scorers(proc.pid)) == pools, 60, "scorer-speller-1 and -2 processes")
        wait_for(
            lambda: _contributed(out_dir, "scorer-speller-1") and _contributed(out_dir, "scorer-speller-2"),
            300,
            "both new speller scorers to score",
        )
        asked = _scale(out_dir / "config.yaml", "scorers.speller=2")
        assert asked.returncode == 0, asked.stderr
        wait_for(lambda: "scorer-speller-2" not in _scorers(proc.pid), 60, "scorer-speller-2 to stop")
        wait_for(
            lambda: any(r["event"] == "stopped" for r in _records(out_dir)), 30, "the launcher to see it stop"
        )
        time.sleep(3 * INTERVAL_S)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, log
    assert "warning: teacher idle is reached by no route" in log
    assert "scale scorers.speller 1 -> 3" in log and "scale scorers.speller 3 -> 2" in log
    assert "exited with code" not in log
    events = [
        (r["event"], r.get("teacher"), r.get("name"))
        for r in _records(out_dir)
        if r["event"] in ("started", "retired", "stopped")
    ]
    assert events == [
        ("started", "speller", "scorer-speller-1"),
        ("started", "speller", "scorer-speller-2"),
        ("retired", "speller", "scorer-speller-2"),
        ("stopped", "speller", "scorer-speller-2"),
    ]
    intervals = [r for r in _records(out_dir) if r["event"] == "interval"]
    assert intervals and set(intervals[-1]["teachers"]) == {"adder", "speller", "idle"}
    assert intervals[-1]["teachers"]["speller"]["active"] == ["scorer-speller-0", "scorer-speller-1"]
    assert any(len(r["teachers"]["speller"]["active"]) == 3 for r in intervals)
    # the other pool as it was throughout: its one scorer, scoring before and after the change
    assert all(r["teachers"]["adder"]["active"] == ["scorer-adder-0"] for r in intervals)
    grown_at = next(r["time"] for r in _records(out_dir) if r["event"] == "started")
    assert any(r["scored"].get("scorer-adder-0", 0) > 0 for r in intervals if r["time"] > grown_at)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert pools <= set(summary["components"])
    assert summary["components"]["scorer-adder-0"]["trajectories_scored"] > 0
    assert summary["components"]["scorer-speller-0"]["trajectories_scored"] > 0
    assert summary["components"]["scorer-idle-0"].get("trajectories_scored", 0) == 0
    assert set(summary["teacher_accuracies"]) == {"adder", "speller", "idle"}
