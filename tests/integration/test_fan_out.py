"""The actor's fan-out (actors/routing.py Outbox) on a real zmq broker process with max_depth 32: backpressure
holds per stream (no stream ever exceeds max_depth), a full stream does not hold back the copies bound for a
stream with room, a trajectory enters the run (ledger) once, with its first copy out; a stream that takes nothing
for stall_s makes its teacher down, and one copy taken makes it up again."""

from __future__ import annotations

import time

import numpy as np

from actors.routing import Outbox, Router
from broker.base import dead_letter_stream, is_work_stream
from broker.zmq import ZmqBroker
from opd import tasks
from opd.config import load_config
from opd.protocol import Streams, Trajectory, encode

DEPTH = 32  # the zmq_broker fixture's max_depth
STALL_S = 0.3
CFG = [
    "run.run_id=r",
    "teachers={fast: {}, slow: {}}",
    "routing.routes={f: {fast: 1}, s: {slow: 1}, both: {fast: 1, slow: 1}}",
    "routing.default=fast",
]


def _trajs(router: Router, tags: list[str]) -> list[Trajectory]:
    out = []
    for i, tag in enumerate(tags):
        p = tasks.Problem(prompt_id=f"p{i}", prompt="1+2=", answer="3", metadata={"task": tag})
        t = Trajectory(
            run_id="r", prompt_id=p.prompt_id, group_id=f"g{i}", sample_index=0,
            prompt_token_ids=np.array([1, 2], np.int32), response_token_ids=np.array([3], np.int32),
            behaviour_logprobs=np.array([-1.0], np.float32), policy_version=0, task=router.metadata(p),
        )  # fmt: skip
        router.stamp(t)
        out.append(t)
    return out


def test_a_full_stream_waits_alone_then_its_teacher_is_down_until_it_takes_a_copy(zmq_broker):
    broker = ZmqBroker(zmq_broker, 5.0)
    router = Router(load_config(None, CFG))
    full, free = router.streams["slow"], router.streams["fast"]
    assert len(broker.publish(full, [b"old"] * DEPTH)) == DEPTH  # the slow pool's stream is full
    outbox = Outbox(broker, router, STALL_S)
    trajs = _trajs(router, ["s", "f", "both", "s", "f"])
    outbox.add(trajs, [encode(t) for t in trajs])
    entered, copies = outbox.flush()
    # the stream with room got all its copies; the mixture entered with its first copy, slow-only ones did not
    assert [t.prompt_id for t in entered] == ["p1", "p2", "p4"] and copies == 3
    assert broker.depth(full) == DEPTH and broker.depth(free) == 3 and outbox.held() == 3
    assert outbox.blocking() == {"slow"} and outbox.down() == set()  # backpressure: the actor waits a while
    time.sleep(STALL_S)
    assert outbox.flush() == ([], 0) and outbox.down() == {"slow"} and outbox.blocking() == set()
    assert set(outbox.waiting) == {"slow"}
    # room again on the slow stream (its pool took two): two copies out, in order, the teacher up again
    taken = broker.consume(full, "scorers", "s", 2, 1.0)
    broker.ack(full, "scorers", [m.id for m in taken])
    entered, copies = outbox.flush()
    assert [t.prompt_id for t in entered] == ["p0"] and copies == 2  # p0, then the mixture's slow copy
    assert broker.depth(full) == DEPTH and outbox.held() == 1 and outbox.down() == set()
    assert outbox.blocking() == {"slow"}
    taken = broker.consume(full, "scorers", "s", 5, 1.0)
    broker.ack(full, "scorers", [m.id for m in taken])
    entered, copies = outbox.flush()
    assert [t.prompt_id for t in entered] == ["p3"] and copies == 1 and outbox.held() == 0
    assert outbox.waiting == {} and outbox.unsent == {}
    broker.close()


def test_a_teachers_rollouts_stream_is_a_work_stream_of_its_run():
    """Bounded, deleted when acknowledged, redelivered (Redis), its poison records in the run's dead_letter."""
    streams = Streams("run-1")
    for stream in (
        streams.rollouts,
        streams.rollouts_for("adder"),
        streams.scored,
        streams.scored_for("adder"),
    ):
        assert is_work_stream(stream) and dead_letter_stream(stream) == streams.dead_letter
    for stream in (
        streams.control,
        streams.metrics,
        streams.dead_letter,
        "run-1:rollouts:Not-A-Teacher",
        "run-1:scored:X",
    ):
        assert not is_work_stream(stream)
