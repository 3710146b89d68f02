"""A whole run with streaming actors (`actor.generation: stream`, actors/streaming.py) on the embedded zmq broker:
groups enter the run whole, weights land while sequences are in flight (tokens of one trajectory under several
versions), nothing is published twice, and at stop the sequences in flight are finished and published.

The Redis side (kills mid-sequence, the books by id) is tests/e2e/test_random_chaos.py, whose actors stream."""

from __future__ import annotations

import json
from collections import Counter

from tests.conftest import opd_run

N = 4  # sampling.n of configs/tiny.yaml


def test_streaming_actors_publish_whole_groups_and_finish_at_stop(prepared, tmp_path):
    out = tmp_path / "run"
    proc = opd_run(
        prepared,
        out,
        "run.progress=false",
        "actor.num_actors=2",
        "actor.generation=stream",
        "actor.max_inflight=12",
        "actor.on_stop=finish",
        # decode steps padded (as on a slower device): the actors keep sequences in flight until the stop
        "pipeline.service_time.actor_ms_per_token=4",
        "learner.batch_size=32",
        "learner.max_steps=15",
        "learner.eval_every=0",
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    generated = {}
    for i in range(2):
        lines = (out / "ledger" / f"actor-{i}.generated").read_text().splitlines()
        generated.update({tid: group for tid, _, group in (x.split("\t") for x in lines)})
        assert len(lines) == len({x.split("\t")[0] for x in lines})  # never published twice
    assert set(Counter(generated.values()).values()) == {N}  # every group entered the run whole
    trained = (out / "trained_ids.txt").read_text().split()
    assert len(trained) == len(set(trained)) == 15 * 32 and set(trained) <= set(generated)
    summary = json.loads((out / "summary.json").read_text())
    actors = [c for name, c in summary["components"].items() if name.startswith("actor-")]
    assert sum(a["trajectories_generated"] for a in actors) == len(generated)
    # weights landed between decode steps: some trajectories hold tokens of two versions
    assert sum(a["trajectory_versions"] for a in actors) > len(generated)
    # the slots: busy in some decode steps, never more than there are
    assert all(0 < a["slot_busy_steps"] <= a["slot_steps"] for a in actors)
    # on_stop: finish: what was in flight at the stop was generated to the end and published, nothing dropped
    assert sum(a.get("sequences_finished_at_stop", 0) for a in actors) > 0, log[-3000:]
    assert not any(a.get("sequences_dropped_at_stop") for a in actors)
