import threading

import pytest

from broker import publish_with_backpressure
from broker.zmq_broker import ZmqBroker


def test_publish_consume_ack_depth(zmq_broker):
    b = ZmqBroker(zmq_broker, 5.0)
    ids = b.publish("r:rollouts", [b"a", b"b", b"c"])
    assert len(ids) == 3 and b.depth("r:rollouts") == 3
    got = b.consume("r:rollouts", "g", "c0", 2, 0.1)
    assert [m.data for m in got] == [b"a", b"b"]
    assert b.depth("r:rollouts") == 3  # pending until acknowledged
    b.ack("r:rollouts", "g", [m.id for m in got])
    assert b.depth("r:rollouts") == 1
    assert [m.data for m in b.consume("r:rollouts", "g", "c1", 10, 0.1)] == [b"c"]
    assert b.consume("r:rollouts", "g", "c1", 10, 0.1) == []


def test_work_stream_backpressure_and_log_stream_trimming(zmq_broker):
    b = ZmqBroker(zmq_broker, 5.0)  # fixture: max_depth=32, log_maxlen=64
    assert b.publish("r:scored", [b"x"] * 32) is not None
    assert b.publish("r:scored", [b"y"]) is None  # full: the producer must wait
    msgs = b.consume("r:scored", "learner", "l", 8, 0.1)
    b.ack("r:scored", "learner", [m.id for m in msgs])
    assert b.publish("r:scored", [b"y"]) is not None
    for _ in range(3):
        assert b.publish("r:control", [b"v"] * 40) is not None  # never refused
    assert b.depth("r:control") == 64


def test_each_group_sees_every_entry(zmq_broker):
    b = ZmqBroker(zmq_broker, 5.0)
    b.publish("r:control", [b"v1", b"v2"])
    for group in ("actor-0", "actor-1"):
        assert [m.data for m in b.consume("r:control", group, group, 10, 0.1)] == [b"v1", b"v2"]


def test_long_poll_returns_when_data_arrives(zmq_broker):
    consumer = ZmqBroker(zmq_broker, 5.0)
    result = []
    t = threading.Thread(target=lambda: result.extend(consumer.consume("r:rollouts", "g", "c", 5, 5.0)))
    t.start()
    ZmqBroker(zmq_broker, 5.0).publish("r:rollouts", [b"late"])
    t.join(5)
    assert [m.data for m in result] == [b"late"]


def _producer(address, n, tag, stream):
    b = ZmqBroker(address, 10.0)
    for i in range(n):
        publish_with_backpressure(b, stream, [f"{tag}-{i}".encode()])
    b.close()


def _consumer(address, stream, name, out, total, lock):
    b = ZmqBroker(address, 10.0)
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
def test_conservation_n_producers_m_consumers(zmq_broker, producers, consumers):
    """Every message consumed exactly once, none lost, through a bounded (depth 32) stream."""
    per = 150
    stream = f"cons{producers}{consumers}:rollouts"
    out, lock = [], threading.Lock()
    threads = [
        threading.Thread(target=_producer, args=(zmq_broker, per, f"p{i}", stream)) for i in range(producers)
    ]
    threads += [
        threading.Thread(target=_consumer, args=(zmq_broker, stream, f"c{j}", out, producers * per, lock))
        for j in range(consumers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    expected = {f"p{i}-{k}".encode() for i in range(producers) for k in range(per)}
    assert len(out) == len(expected) and set(out) == expected
    assert ZmqBroker(zmq_broker, 5.0).depth(stream) == 0


def test_oversized_message_refused_by_client(zmq_broker):
    b = ZmqBroker(zmq_broker, 5.0, max_message_bytes=1000)
    with pytest.raises(ValueError, match="max_message_mb"):
        b.publish("r:rollouts", [b"x" * 2000])
