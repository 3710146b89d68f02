"""Watching a real `opd run`: every component's Prometheus endpoint is scraped while it trains, `opd top` reads
the live run (once, and following it to the end) and the finished one, and the learner's wandb (offline) and
TensorBoard files hold its steps."""

from __future__ import annotations

import json
import os
import urllib.error

import pytest

from tests.conftest import opd, opd_run, wait_for
from tests.integration.test_dashboards import free_port_block, scrape, value, wandb_history

pytestmark = pytest.mark.slow
STEPS, BATCH = 150, 64


def _actor_version(port: int) -> float:
    try:
        return value(scrape(port), "opd_weight_version", component="actor-0")
    except (urllib.error.URLError, ConnectionError, AssertionError):
        return 0.0


def _trained(port: int) -> float:
    try:
        return value(scrape(port), "opd_trajectories_total", stage="trained")
    except (urllib.error.URLError, ConnectionError, AssertionError):
        return 0.0


def _check_live_endpoints(ports: dict[str, int]) -> None:
    learner, actor, scorer = scrape(ports["learner"]), scrape(ports["actor-0"]), scrape(ports["scorer-0"])
    # counters moved, each on the component that owns the stage
    assert value(actor, "opd_trajectories_total", stage="generated", component="actor-0") >= BATCH
    assert value(actor, "opd_tokens_total", stage="generated") > 0
    assert value(scorer, "opd_trajectories_total", stage="scored", component="scorer-0") >= BATCH
    assert value(scorer, "opd_tokens_total", stage="scored") > 0
    assert value(scorer, "opd_busy_seconds_total", stage="score") > 0
    step = value(learner, "opd_learner_step")
    trained = value(learner, "opd_trajectories_total", stage="trained")
    assert trained in (BATCH * step, BATCH * (step + 1))  # a scrape may fall between the count and the record
    # tokens of the recorded steps: at least one per trajectory, at most what was trained (a scrape may fall
    # between the token count and the record)
    assert (
        BATCH * step
        <= value(learner, "opd_lag_versions_count")
        <= value(learner, "opd_tokens_total", stage="trained")
    )
    assert value(learner, "opd_learner_step_seconds_count") == step
    assert 0 <= value(learner, "opd_learner_wait_fraction") <= 1
    assert value(learner, "opd_learner_wall_seconds_total") >= value(
        learner, "opd_learner_wait_seconds_total"
    )
    assert value(learner, "opd_weight_sync_seconds_count") >= 1 and value(learner, "opd_weight_sync_gbps") > 0
    assert value(learner, "opd_reverse_kl") > 0
    assert value(learner, "opd_weight_version", component="learner") >= 1
    assert value(actor, "opd_weight_version", component="actor-0") >= 1
    assert value(actor, "opd_weight_syncs_received_total") >= 1
    for stream in ("rollouts", "scored"):
        assert value(learner, "opd_queue_depth", stream=stream) >= 0
    assert all(value(s, "opd_component_up") == 1 for s in (learner, actor, scorer))


def _top_once(config: str) -> str:
    proc = opd("top", "--config", config, "--once", env={**os.environ, "COLUMNS": "200"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def test_watch_a_run_prometheus_top_wandb_tensorboard(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, out_dir = free_port_block(3), tmp_path / "run"
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={STEPS}",
        "learner.eval_every=50",
        f"metrics.port={base}",
        "metrics.wandb.enabled=true",
        "metrics.tensorboard.enabled=true",
    )
    follow = None
    try:
        wait_for(lambda: (out_dir / "metrics_ports.json").exists(), 300, "the port map")
        ports = json.loads((out_dir / "metrics_ports.json").read_text())["ports"]
        assert ports == {"learner": base, "actor-0": base + 1, "scorer-0": base + 2}
        wait_for(lambda: _trained(base) >= 2 * BATCH, 300, "two trained steps on the learner's endpoint")
        # the actor sets its weight-version gauge when it next reports, which may come after the learner's step
        wait_for(
            lambda: _actor_version(base + 1) >= 1, 60, "the actor's first received weights on its endpoint"
        )
        _check_live_endpoints(ports)
        live = _top_once(str(out_dir / "config.yaml"))
        # the live view (not --once) follows the run and exits by itself when the learner announces the end
        follow = opd("top", "--config", str(out_dir / "config.yaml"), env={**os.environ, "COLUMNS": "200"})
        log, _ = proc.communicate(timeout=600)
        followed, _ = follow.communicate(timeout=120)
    finally:
        for p in (proc, follow):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0, log
    assert f"Prometheus metrics: learner 127.0.0.1:{base}, actor-0 127.0.0.1:{base + 1}" in log
    assert "running" in live and "zmq broker metrics stream" in live
    for name in ("learner", "actor-0", "scorer-0"):
        assert f"│ {name}" in live, live
    assert follow.returncode == 0 and "finished" in followed and f"{STEPS}/{STEPS}" in followed, followed
    # after the run the zmq broker is gone: the view comes from the run directory
    done = _top_once(str(out_dir / "config.yaml"))
    assert "broker gone" in done and "finished" in done and f"{STEPS}/{STEPS}" in done

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    kl = acc.Scalars("reverse_kl")
    assert [e.step for e in kl] == list(range(1, STEPS + 1))
    assert [e.value for e in kl] == pytest.approx([r["reverse_kl"] for r in records], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval_accuracy")] == [50, 100, 150]
    assert {"loss", "staleness_mean", "step_seconds", "wait_seconds", "weight_sync_seconds"} <= set(
        acc.Tags()["scalars"]
    )

    run_id = json.loads((out_dir / "summary.json").read_text())["run_id"]
    (wandb_run,) = (out_dir / "wandb").glob(f"offline-run-*-{run_id}")
    rows = wandb_history(wandb_run)
    assert [int(r["_step"]) for r in rows] == list(range(1, STEPS + 1))
    assert [float(r["reverse_kl"]) for r in rows] == pytest.approx([r["reverse_kl"] for r in records])
    assert sum("eval_accuracy" in r for r in rows) == 3
