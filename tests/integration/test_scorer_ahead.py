"""A scorer scores ahead while the scored stream is full (teacher_scorers/scorer.py `Scorer.run`): it goes on taking
and scoring rollouts until it holds a whole scorer.batch_size, acknowledging none of them, and when the learner
frees the stream it appends them at once. Without it, a scorer that took a group-sized fragment held it while the
stream was full, and the learner then waited while the rest was scored (benchmarks/streaming.py). A real tiny
teacher, the scorer's real loop on a thread, a real redis-server."""

from __future__ import annotations

import threading
import time

import numpy as np

from opd.config import load_config
from opd.protocol import Trajectory, decode, encode
from tests.conftest import wait_for

DEPTH = 8  # broker.max_depth = scorer.batch_size = a learner batch


def _rollout(i: int) -> Trajectory:
    return Trajectory(
        run_id="ahead", prompt_id=f"p{i}", group_id=f"g{i // 4}", sample_index=i % 4,
        prompt_token_ids=np.array([1, 2, 3], np.int32), response_token_ids=np.array([4, 5], np.int32),
        behaviour_logprobs=np.array([-1.0, -1.0], np.float32), policy_version=0, behaviour_temperature=1.0,
        task={"answer": "1", "task": "addition"},
    )  # fmt: skip


def test_a_scorer_holds_a_whole_batch_while_the_scored_stream_is_full(quick_models, redis_server):
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer

    cfg = load_config(
        None,
        [
            *quick_models, "run.run_id=ahead", "broker.type=redis", f"broker.url={redis_server.url}",
            f"broker.max_depth={DEPTH}", f"scorer.batch_size={DEPTH}", f"learner.batch_size={DEPTH}",
        ],
    )  # fmt: skip
    stop = StopFlag()
    scorer = Scorer(cfg, 0, stop)
    broker = scorer.broker
    # the learner's batch in training: the scored stream is full until it is acknowledged
    assert len(broker.publish(scorer.scored, [encode(_rollout(100 + i)) for i in range(DEPTH)])) == DEPTH
    in_training = broker.consume(scorer.scored, "learner", "learner", DEPTH, 1.0)
    thread = threading.Thread(target=scorer.run, daemon=True)
    thread.start()
    try:
        first, second = [_rollout(i) for i in range(4)], [_rollout(i) for i in range(4, 8)]
        broker.publish(scorer.rollouts, [encode(t) for t in first])  # a group arrives
        wait_for(lambda: scorer.reporter.counters.get("score_batches", 0) >= 1, 60, "the first group scored")
        broker.publish(
            scorer.rollouts, [encode(t) for t in second]
        )  # the next group, while the stream is full
        wait_for(lambda: scorer.reporter.counters.get("score_batches", 0) >= 2, 60, "the second group scored")
        time.sleep(0.3)
        # both held: nothing appended, no rollout acknowledged (they still count for the actors' backpressure)
        assert scorer.reporter.counters.get("trajectories_scored", 0) == 0
        assert broker.depth(scorer.rollouts) == 8 and broker.depth(scorer.scored) == DEPTH
        broker.ack(scorer.scored, "learner", [m.id for m in in_training])  # the learner's step ends
        wait_for(lambda: broker.depth(scorer.scored) == DEPTH, 10, "the held batch appended")
        assert scorer.reporter.counters["trajectories_scored"] == 8 and broker.depth(scorer.rollouts) == 0
        got = broker.consume(scorer.scored, "learner", "learner", DEPTH, 1.0)
        assert [decode(m.data, require_scored=True).id for m in got] == [t.id for t in first + second]
    finally:
        stop.set("test over")
        thread.join(30)
    assert not thread.is_alive()
