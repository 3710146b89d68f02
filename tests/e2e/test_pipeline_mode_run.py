"""`pipeline.mode: sync` end to end: a real `opd run` where every sample trains at staleness 0."""

from __future__ import annotations

import json

import pytest

from tests.conftest import opd_run


@pytest.mark.slow
def test_sync_run_trains_every_sample_at_staleness_zero(prepared, tmp_path):
    out_dir, steps, ms = tmp_path / "run", 8, 2.0  # about 4x each tiny stage's real cost per token
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={steps}",
        "learner.eval_every=0",
        "pipeline.mode=sync",
        *(f"pipeline.service_time.{s}_ms_per_token={ms}" for s in ("actor", "scorer", "learner")),
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["staleness_max"] for r in records] == [0] * steps
    # the learner's update took at least its service time, and says how much of it was padding
    for r in records:
        assert r["step_seconds"] >= r["tokens"] * ms / 1000
        assert 0 <= r["service_pad_seconds"] <= r["step_seconds"]
        assert r["wait_seconds"] >= 0 and r["step_seconds"] > 0
    assert sum(r["service_pad_seconds"] for r in records) > 0
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["trajectories_trained"] == steps * 64
    # one batch in flight: the actor made exactly one batch per version it was sent, plus the last one's
    assert s["trajectories_generated"] == steps * 64
    actor, scorer = s["components"]["actor-0"], s["components"]["scorer-0"]
    assert actor["sync_wait_seconds"] > 0
    assert actor["service_pad_seconds"] > 0 and scorer["service_pad_seconds"] > 0
    assert actor["generate_seconds"] >= actor["tokens_generated"] * ms / 1000
    assert scorer["score_seconds"] >= scorer["tokens_scored"] * ms / 1000
