"""Kill -9 one learner rank (or the one learner) mid-run on Redis: the other rank does not hang, the launcher restarts the whole learner
group from its newest checkpoint and replay log (`supervision.restart: on-failure`), the run finishes its
max_steps, and the books balance by trajectory id with nothing trained twice."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.books import accounting, component_pid, violations
from tests.conftest import opd_run, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
STEPS = 16
RESTART_BOUND_S = (
    120.0  # kill -> the restarted group's first step: backoff, start-up, checkpoint load, replay
)


def _records(out_dir) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("ranks", [2, 1])
def test_kill_a_learner_rank_restarts_the_learner_group_and_the_books_balance(
    ranks, prepared, redis_server, tmp_path
):
    """Rank 1 of 2 (the other rank is killed and both start again), or the one learner (a group of one)."""
    out_dir = tmp_path / "run"
    victim = "learner-1" if ranks == 2 else "learner"
    proc = opd_run(
        prepared,
        out_dir,
        "run.progress=false",
        "broker.type=redis",
        f"broker.url={redis_server.url}",
        "broker.claim_idle_s=1",
        f"learner.num_ranks={ranks}",
        f"learner.max_steps={STEPS}",
        "learner.batch_size=32",
        "actor.prompts_per_batch=8",
        "learner.eval_every=0",
        "learner.checkpoint_every=4",
        "supervision.restart=on-failure",
        "supervision.restart_backoff_s=0.5",
    )
    try:
        # past the first checkpoint and into the replay log after it: the restart needs both
        wait_for(lambda: len(_records(out_dir)) >= 6, 300, "learner steps past the first checkpoint")
        killed_after, killed_at = len(_records(out_dir)), time.time()
        os.kill(component_pid(proc.pid, "learner", 1 if ranks == 2 else None), signal.SIGKILL)
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert f"{victim} exited with code -9" in log and "restarting the learner group" in log, log
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["learner_steps"] == STEPS and summary["restarts"] == {"learner": 1}
    assert summary["resumed_from"].startswith("step-")
    records = _records(out_dir)
    fresh = [r["step"] for r in records if not r.get("replayed")]
    assert len(fresh) == len(set(fresh)), fresh  # no step trained fresh twice
    # every step logged: a step whose record the kill cut off is logged when it is replayed
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1)), [
        (r["step"], bool(r.get("replayed"))) for r in records
    ]
    assert any(r.get("replayed") for r in records) or killed_after % 4 == 0
    back = [r["time"] for r in records if r["time"] > killed_at]  # the restarted group's first (re)play
    assert back and back[0] - killed_at < RESTART_BOUND_S, "no hang: it trains again soon after the kill"
    books = accounting(out_dir, redis_server.url)
    assert books["trained"] == books["trained_unique"] == STEPS * 32, books["line"]  # nothing trained twice
    assert violations(books) == [], books["line"]
    names = [f"learner-{r}" for r in range(ranks)] if ranks > 1 else ["learner"]
    assert all((out_dir / "logs" / f"{n}.log").exists() for n in names)  # the restarted processes log on
    assert (out_dir / "logs" / f"{names[0]}.log").read_text().count("resumed from ") == 1  # rank 0
