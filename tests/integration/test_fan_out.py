"""The actor's fan-out (actors/routing.py publish_fan_out) on a real zmq broker process with max_depth 32:
backpressure holds per stream (no stream ever exceeds max_depth), a full stream does not hold back the copies
bound for a stream with room, and a stop while one is still full reports exactly the prefix each stream took."""

from __future__ import annotations

from actors.routing import publish_fan_out
from broker.base import dead_letter_stream, is_work_stream
from broker.zmq import ZmqBroker
from opd.protocol import Streams

DEPTH = 32  # the zmq_broker fixture's max_depth


def test_a_full_stream_waits_alone_and_a_stop_reports_what_each_stream_took(zmq_broker):
    broker = ZmqBroker(zmq_broker, 5.0)
    full, free = "r:rollouts:slow", "r:rollouts:fast"
    assert len(broker.publish(full, [b"old"] * DEPTH)) == DEPTH  # the slow pool's stream is full
    waits = []

    def should_stop() -> bool:
        return len(waits) >= 3  # asked after each round without progress

    sent = publish_fan_out(
        broker,
        {full: [b"m0", b"m1"], free: [b"a", b"b", b"c"]},
        should_stop=should_stop,
        while_waiting=lambda: waits.append(1),
        poll_s=0.01,
    )
    assert sent == {full: 0, free: 3}  # the stream with room got all its copies
    assert broker.depth(full) == DEPTH and broker.depth(free) == 3
    # room again on the slow stream (its pool took two): the rest goes out, no more than fits
    taken = broker.consume(full, "scorers", "s", 2, 1.0)
    broker.ack(full, "scorers", [m.id for m in taken])
    sent = publish_fan_out(broker, {full: [b"m0", b"m1"]}, poll_s=0.01)
    assert sent == {full: 2} and broker.depth(full) == DEPTH
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
