"""One teacher's pool killed while the other keeps scoring (issue 18): `opd run` of the two-teacher demo
(configs/two_teachers.yaml: addition routed to adder, reversal to reverser, no mixture) on Redis; every scorer of
the reverser pool is SIGKILLed mid-run, and the launcher's restart policy brings one back only after a long
backoff. Meanwhile the actor, once reverser's stream has taken nothing for supervision.liveness_s, treats that
pool as down and keeps generating addition prompts (actors/routing.py), so adder's trajectories keep training;
the entries the killed scorer held (pending in Redis) and those queued behind them are redelivered to the
restarted scorer, scored and trained; the books balance by trajectory id.

Without the actor's per-pool handling this fails: reverser's stream fills to broker.max_depth, the actor blocks
publishing into it, and no trajectory is generated (so no step trained) until the pool returns."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from opd.protocol import decode
from tests.books import accounting, run_id_of, violations
from tests.conftest import REPO, children_of, opd, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

DEMO = REPO / "configs" / "two_teachers.yaml"
BATCH = 16
DEPTH = 16  # broker.max_depth: each teacher's streams hold one learner batch
LIVENESS_S = 4.0  # the actor treats a pool as down after its stream took nothing for this long
DOWN_S = 30.0  # supervision.restart_backoff_s: how long the killed pool stays down
INTERVAL_S = 1.0
# the killed pool's rollouts wait out the outage (~1 step/s for 30-60 s here): trained, not dropped as stale. Not
# larger: the learner's lag histogram has max_staleness + 1 bins (100000 made the report take minutes)
STALENESS = 400
MIN_STEPS_DOWN = 6  # steps trained while the pool is down (the old design: at most ~3, then none)


def _records(out_dir: Path, name: str) -> list[dict]:
    path = out_dir / name
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def _pool_scorers(launcher_pid: int, teacher: str) -> list[int]:
    """Pids of the launcher's live scorers of `teacher` (`opd scorer ... --teacher <teacher>`)."""
    found = []
    for pid in children_of(launcher_pid):
        try:
            cmd = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if (
            "scorer" in cmd
            and "--teacher" in cmd
            and cmd[cmd.index("--teacher") + 1] == teacher
            and state != "Z"
        ):
            found.append(pid)
    return found


def _stream_ids(client: redis.Redis, stream: str) -> tuple[set[str], set[str]]:
    """Trajectory ids in `stream`: those pending (delivered to a scorer, not acknowledged) and all of them."""
    pending = {e["message_id"] for e in client.xpending_range(stream, "scorers", "-", "+", 10_000)}
    every, held = set(), set()
    for entry_id, fields in client.xrange(stream):
        tid = decode(fields[b"d"]).id
        every.add(tid)
        if entry_id in pending:
            held.add(tid)
    return held, every


def _ids(client: redis.Redis, streams: list[str]) -> set[str]:
    return {decode(fields[b"d"]).id for s in streams for _, fields in client.xrange(s)}


def test_a_killed_pool_leaves_the_other_training_and_its_work_is_redelivered(
    asset_cache, redis_server, tmp_path
):
    out_dir = tmp_path / "run"
    proc = opd(
        "run",
        str(DEMO),
        f"run.cache_dir={asset_cache}",
        f"run.output_dir={out_dir}",
        "run.progress=false",
        "broker.type=redis",
        f"broker.url={redis_server.url}",
        "broker.claim_idle_s=1",
        f"broker.max_depth={DEPTH}",
        "learner.max_steps=100000",  # ended with Ctrl-C once the scenario is done
        f"learner.batch_size={BATCH}",
        "learner.eval_every=0",
        f"learner.max_staleness={STALENESS}",  # the killed pool's old rollouts are trained, not dropped as stale
        "actor.prompts_per_batch=4",  # x sampling.n 4 = one learner batch
        "scorer.batch_size=8",
        "pipeline.service_time.scorer_ms_per_token=5",  # a scorer holds its entries a while: some are pending
        "supervision.restart=on-failure",
        f"supervision.restart_backoff_s={DOWN_S}",
        "supervision.role_grace_s=300",
        f"supervision.liveness_s={LIVENESS_S}",
        f"scaling.interval_s={INTERVAL_S}",
    )
    try:
        wait_for(lambda: len(_records(out_dir, "metrics.jsonl")) >= 5, 400, "the first learner steps")
        client = redis.Redis.from_url(redis_server.url)
        stream = f"{run_id_of(out_dir)}:rollouts:reverser"
        (victim,) = _pool_scorers(proc.pid, "reverser")
        wait_for(
            lambda: client.xpending(stream, "scorers")["pending"] > 0, 60, "reverser's scorer to hold work"
        )
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        # the stream as the dead scorer left it (its pending entries), plus what queued behind them
        time.sleep(0.5)
        held, queued = _stream_ids(client, stream)
        wait_for(lambda: _pool_scorers(proc.pid, "reverser"), DOWN_S + 60, "the restarted reverser scorer")
        back_at = time.time()
        scored = f"{run_id_of(out_dir)}:scored:reverser"
        # scored by the new scorer, then trained: the learner acknowledges (deletes) scored copies after its step
        wait_for(
            lambda: not _ids(client, [stream, scored]) & queued, 120, "the killed pool's work to be trained"
        )
        time.sleep(2)  # a few steps more with both pools
        proc.send_signal(signal.SIGINT)  # saves, announces stop, reports
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, log
    assert "scorer-reverser-0 exited with code -9" in log and "restarting it in" in log, log
    assert held, "the killed scorer held no entries: nothing to redeliver"

    # the pool was down for the whole window, and the other pool kept the learner training
    window = (killed_at + LIVENESS_S + 2, back_at)
    assert window[1] - window[0] > DOWN_S / 2, window
    steps = [r for r in _records(out_dir, "metrics.jsonl") if window[0] <= r["time"] <= window[1]]
    intervals = [r for r in _records(out_dir, "scaling.jsonl") if r["event"] == "interval"]
    # an interval's `active` is read at its end: the last ones before the restart seen may already hold it
    down = [
        r for r in intervals if window[0] <= r["time"] - r["seconds"] and r["time"] < back_at - 2 * INTERVAL_S
    ]
    assert down and all(r["teachers"]["reverser"]["active"] == [] for r in down)
    assert sum(r["scored"].get("scorer-adder-0", 0) for r in down) >= MIN_STEPS_DOWN * BATCH
    assert len(steps) >= MIN_STEPS_DOWN, [r["time"] for r in _records(out_dir, "metrics.jsonl")]
    assert all(r["queue_rollouts:reverser"] == DEPTH for r in steps)  # its stream full, nobody taking
    books = accounting(out_dir, redis_server.url)
    born = [t for t, when in books["generated_at"].items() if window[0] <= when <= window[1]]
    assert len(born) >= MIN_STEPS_DOWN * BATCH, books["line"]  # the actor went on, for adder alone
    actor_log = (out_dir / "logs" / "actor-0.log").read_text()
    assert "teacher reverser: its rollouts stream has taken no copy" in actor_log
    assert "teacher reverser takes copies again" in actor_log

    # the killed pool's work: its pending entries redelivered, everything queued for it scored and trained
    trained = set((out_dir / "trained_ids.txt").read_text().split())
    assert held <= trained and queued <= trained, (len(held - trained), len(queued - trained))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["restarts"] == {"scorer-reverser-0": 1}, summary["restarts"]
    assert summary["components"]["actor-0"]["prompts_skipped"] > 0
    assert books["trained"] == books["trained_unique"] == summary["learner_steps"] * BATCH, books["line"]
    assert violations(books) == [], books["line"]
    assert books["dropped_stale"] == 0 and books["dead_lettered"] == 0, books["line"]
