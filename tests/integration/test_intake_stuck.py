"""A learner fed only samples it cannot train ends with an error that says what arrived, rather than waiting
forever: learner.batch_timeout_s counts time without a *usable* trajectory (issue 14, multi-host finding 4: actors
that never received weights sent only too-stale samples, each of which reset the clock, for 8 minutes)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from learner import intake as intake_module
from tests.integration.test_learner_intake import _intake, _publish, client, scored  # noqa: F401 (fixture)


def _feed(client, stop: threading.Event, make, every_s: float = 0.2, for_s: float = 12) -> threading.Thread:  # noqa: F811
    """Publish one message from `make()` every `every_s` until `stop` or for `for_s` (so that a learner that
    waits as long as messages come fails the test instead of hanging it)."""

    def run() -> None:
        end = time.monotonic() + for_s
        while not stop.wait(every_s) and time.monotonic() < end:
            _publish(client, [make()])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_only_too_stale_samples_for_batch_timeout_s_is_an_error_saying_so(zmq_broker, tmp_path):
    from broker.zmq import ZmqBroker

    reader, writer = (
        ZmqBroker(zmq_broker, request_timeout_s=10.0),
        ZmqBroker(zmq_broker, request_timeout_s=10.0),
    )
    intake, reporter = _intake(reader, tmp_path, "learner.batch_timeout_s=3", "learner.max_staleness=1")
    done = threading.Event()
    feeder = _feed(writer, done, lambda: scored(policy_version=0))  # the actors never got weights past 0
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as raised:
            intake.next_batch(version=5)
    finally:
        done.set()
        feeder.join(5)
        reader.close()
        writer.close()
    took = time.monotonic() - t0
    message = str(raised.value)
    assert "learner.batch_timeout_s" in message and "too stale" in message, message
    assert "actors are not receiving weights" in message, message
    assert 3 <= took < 10, took
    assert reporter.counters["dropped_stale"] >= 5  # they kept coming all along, and none reset the clock


def test_usable_samples_keep_the_clock_from_running_out(zmq_broker, tmp_path):
    """The other side of the rule: a trickle of trainable samples fills a batch however long it takes."""
    from broker.zmq import ZmqBroker

    reader, writer = (
        ZmqBroker(zmq_broker, request_timeout_s=10.0),
        ZmqBroker(zmq_broker, request_timeout_s=10.0),
    )
    intake, _ = _intake(reader, tmp_path, "learner.batch_timeout_s=1.5", "learner.batch_size=4")
    done = threading.Event()
    feeder = _feed(writer, done, scored, every_s=0.8)  # over 3 s to fill, one usable sample every 0.8 s
    try:
        batch = intake.next_batch(version=0)
    finally:
        done.set()
        feeder.join(5)
        reader.close()
        writer.close()
    assert len(batch) == 4


def test_a_mostly_stale_stream_is_warned_about(client, tmp_path, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setattr(intake_module, "STALE_WINDOW", 8)
    intake, _ = _intake(client, tmp_path, "learner.batch_size=2", "learner.max_staleness=1")
    _publish(
        client, [scored(policy_version=0) for _ in range(6)] + [scored(policy_version=5) for _ in range(2)]
    )
    with caplog.at_level(logging.WARNING, logger="opd"):
        batch = intake.next_batch(version=5)
    assert len(batch) == 2
    assert any("too stale to train" in r.getMessage() for r in caplog.records), caplog.text
