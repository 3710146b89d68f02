"""`opd top` at 80 columns: nothing cut, the reverse KL of summary.json, and a finished run's weight versions."""

from __future__ import annotations

import json

from rich.console import Console

from opd.config import load_config
from opd.launch.top import KL_WINDOW, TopState, render, state_from_files


def _render(state: TopState, cfg) -> str:
    console = Console(width=80, record=True, color_system=None)
    console.print(render(state, cfg))
    return console.export_text()


def _big_state() -> TopState:
    """A long run's figures: the widest values each column will hold."""
    state = TopState(source="zmq broker metrics stream")
    for i in range(12):
        state.ingest({"component": f"actor-{i}", "incarnation": "a", "uptime": 86399.0, "weight_version": 12345,
                      "trajectories_generated": 9_876_543, "tokens_generated": 9_876_543_210,
                      "dead_lettered": 123456})  # fmt: skip
    for kl, step in ((5.0, 9997), (-1.4567, 9998), (0.123456, 9999)):
        state.ingest({"component": "learner", "incarnation": "l", "uptime": float(step), "step": step,
                      "weight_version": 12345, "loss": -1.2345e-05 if step == 9999 else 3.0, "reverse_kl": kl, "staleness_mean": 12.5,
                      "staleness_max": 16, "eval_accuracy": 0.8125, "time": 1000.0 + step,
                      "wait_seconds": 0.5, "step_seconds": 1.5, "weight_sync_seconds": 12.345})  # fmt: skip
    state.depths = {"rollouts": 1_234_567, "scored": 4096}
    return state


def test_every_header_and_value_fits_80_columns_uncut():
    cfg = load_config(None, ["run.run_id=a-rather-long-run-id", "learner.max_steps=10000"])
    text = _render(_big_state(), cfg)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for shown in ("traj/s", "tok/s", "trajs", "tokens", "rev KL", "accuracy", "9999/10000", "-1.23e-05", "12.5/16",
                  "9.88M", "9.88G", "1.23M", "actor-11", "12345", "0.812", "rollouts"):  # fmt: skip
        assert shown in text, (shown, text)


def test_reverse_kl_is_the_summarys_window_mean():
    from learner.state import KL_WINDOW as LEARNER_WINDOW

    assert KL_WINDOW == LEARNER_WINDOW
    kls = [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.2, 0.1, 0.05, 0.0, 0.3, 0.2]
    for n in (1, 3, 12):
        state = TopState()
        for step, kl in enumerate(kls[:n], start=1):
            state.ingest({"component": "learner", "incarnation": "l", "uptime": float(step), "step": step,
                          "reverse_kl": kl})  # fmt: skip
        state.ingest(
            {"component": "learner", "incarnation": "l", "uptime": 99.0, "step": n, "reverse_kl": 9.0}
        )
        w = min(KL_WINDOW, max(1, n // 2))  # learner/state.py summary(): reverse_kl_last
        assert state.reverse_kl() == sum(kls[:n][-w:]) / w


def test_a_finished_run_shows_each_components_weight_version(tmp_path):
    # 8 trajectories, 32 tokens a step (lag_histogram counts tokens); the last record is from before
    # `trajectories` was recorded, when lag_histogram counted trajectories
    records = [{"step": i, "weight_version": i, "time": 10.0 + i, "tokens": 32, "trajectories": 8,
                "lag_histogram": [32], "reverse_kl": 0.5, "wait_seconds": 0.1, "step_seconds": 0.9}
               for i in range(1, 5)]  # fmt: skip
    del records[-1]["trajectories"]
    records[-1]["lag_histogram"] = [8]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "wall_seconds": 9.0,
        "trajectories_generated": 80,
        "trajectories_scored": 40,
        "components": {
            "actor-0": {"weight_version": 3, "uptime": 8.0, "trajectories_generated": 48, "incarnations": 1},
            "actor-1": {"weight_version": 4, "uptime": 8.0, "trajectories_generated": 32, "incarnations": 2},
            "scorer-0": {"uptime": 8.0, "trajectories_scored": 40, "incarnations": 1},
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    cfg = load_config(None, ["run.run_id=done", f"run.output_dir={tmp_path}", "learner.max_steps=4"])
    state = state_from_files(cfg)
    assert state.total("learner", "trajectories_trained") == 32
    assert state.total("learner", "tokens_trained") == 128
    text = _render(state, cfg)
    rows = {line.split()[1]: line.split() for line in text.splitlines() if line.startswith("│ ")}
    assert rows["actor-0"][3] == "3" and rows["actor-1"][3] == "4", text
    assert "48" in rows["actor-0"] and "40" in rows["scorer-0"], text
    assert "actor-all" not in text and "finished" in text


def test_a_run_from_before_components_were_kept_still_shows_role_totals(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.0, "reverse_kl": 1.0}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({"wall_seconds": 5.0, "trajectories_generated": 300}))
    cfg = load_config(None, ["run.run_id=old", f"run.output_dir={tmp_path}"])
    text = _render(state_from_files(cfg), cfg)
    assert "actor-all" in text and "300" in text
    assert "scorer-all" not in text  # no total recorded: no row rather than a crash
