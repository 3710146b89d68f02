"""Broker semantics, the same for the embedded ZeroMQ broker and Redis Streams (each against a real server)."""

import threading

import pytest

from broker import publish_with_backpressure
from broker.redis import RedisBroker
from broker.zmq import ZmqBroker


@pytest.fixture(params=["zmq", "redis"])
def make(request):
    """A factory of clients to a fresh broker with max_depth 32 and log streams capped at 64 entries."""
    if request.param == "zmq":
        address = request.getfixturevalue("zmq_broker")
        return lambda timeout=5.0, **kw: ZmqBroker(address, timeout, **kw)
    server = request.getfixturevalue("redis_server")
    return lambda timeout=5.0, **kw: RedisBroker(
        server.url, max_depth=32, log_maxlen=64, request_timeout_s=timeout, **kw
    )


def test_publish_consume_ack_depth(make):
    b = make()
    ids = b.publish("r:rollouts", [b"a", b"b", b"c"])
    assert len(ids) == 3 and b.depth("r:rollouts") == 3
    got = b.consume("r:rollouts", "g", "c0", 2, 0.1)
    assert [m.data for m in got] == [b"a", b"b"]
    assert b.depth("r:rollouts") == 3  # pending until acknowledged
    b.ack("r:rollouts", "g", [m.id for m in got])
    assert b.depth("r:rollouts") == 1
    assert [m.data for m in b.consume("r:rollouts", "g", "c1", 10, 0.1)] == [b"c"]
    assert b.consume("r:rollouts", "g", "c1", 10, 0.1) == []


def test_work_stream_backpressure_and_log_stream_trimming(make):
    b = make()
    assert b.publish("r:scored", [b"x"] * 32) is not None
    assert b.publish("r:scored", [b"y"]) is None  # full: the producer must wait
    msgs = b.consume("r:scored", "learner", "l", 8, 0.1)
    b.ack("r:scored", "learner", [m.id for m in msgs])
    assert b.publish("r:scored", [b"y"]) is not None
    for _ in range(3):
        assert b.publish("r:control", [b"v"] * 40) is not None  # never refused
    assert b.depth("r:control") == 64


def test_each_group_sees_every_entry(make):
    b = make()
    b.publish("r:control", [b"v1", b"v2"])
    for group in ("actor-0", "actor-1"):
        assert [m.data for m in b.consume("r:control", group, group, 10, 0.1)] == [b"v1", b"v2"]


def test_long_poll_returns_when_data_arrives(make):
    consumer = make()
    result = []
    t = threading.Thread(target=lambda: result.extend(consumer.consume("r:rollouts", "g", "c", 5, 5.0)))
    t.start()
    make().publish("r:rollouts", [b"late"])
    t.join(5)
    assert [m.data for m in result] == [b"late"]


def _producer(make, n, tag, stream):
    b = make(10.0)
    for i in range(n):
        publish_with_backpressure(b, stream, [f"{tag}-{i}".encode()])
    b.close()


def _consumer(make, stream, name, out, total, lock):
    b = make(10.0)
    while True:
        with lock:
            if len(out) >= total:
                break
        msgs = b.consume(stream, "workers", name, 4, 0.2)
        with lock:
            out.extend(m.data for m in msgs)
        b.ack(stream, "workers", [m.id for m in msgs])
    b.close()


@pytest.mark.parametrize(("producers", "consumers"), [(1, 1), (3, 2), (4, 4)])
def test_conservation_n_producers_m_consumers(make, producers, consumers):
    """Every message consumed exactly once, none lost, through a bounded (depth 32) stream."""
    per = 150
    stream = f"cons{producers}{consumers}:rollouts"
    out, lock = [], threading.Lock()
    threads = [
        threading.Thread(target=_producer, args=(make, per, f"p{i}", stream)) for i in range(producers)
    ]
    threads += [
        threading.Thread(target=_consumer, args=(make, stream, f"c{j}", out, producers * per, lock))
        for j in range(consumers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = {f"p{i}-{k}".encode() for i in range(producers) for k in range(per)}
    assert len(out) == len(expected) and set(out) == expected
    assert make().depth(stream) == 0


def test_oversized_message_refused_by_client(make):
    b = make(max_message_bytes=1000)
    with pytest.raises(ValueError, match="max_message_mb"):
        b.publish("r:rollouts", [b"x" * 2000])
