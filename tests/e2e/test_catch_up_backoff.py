"""A learner whose weight catch-ups keep failing does not re-send every second for ever (issue 14, multi-host
finding 4: 253 re-sends of one version in 8 minutes to actors that read every announcement but could not join)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from broker.zmq import ZmqBroker
from learner.publishing import WeightPublisher, record_layout
from opd.protocol import Streams, unpack_control
from tests.conftest import free_port, wait_for
from tests.e2e.test_learner_publishing import RUN_ID, _config
from weight_sync import make_store
from weight_sync.elastic import Heartbeat, mark_seen, register


def _reads_but_never_joins(address: str, store, signer, index: int, announced: list, done: threading.Event):
    """An actor that reads every announcement (so it is no suspect for long) but never enters the group."""
    broker = ZmqBroker(address, request_timeout_s=10.0)
    control = Streams(RUN_ID).control
    try:
        while not done.is_set():
            for msg in broker.consume(control, "reader", "reader", 16, 0.1):
                record = unpack_control(msg.data)
                broker.ack(control, "reader", [msg.id])
                if record["kind"] == "weights":
                    announced.append(list(record["members"]))
                    mark_seen(store, signer, index, record["epoch"])
    finally:
        broker.close()


def test_a_catch_up_that_keeps_failing_backs_off(zmq_broker, tmp_path, caplog):
    port = free_port()
    cfg = _config(port, tmp_path)
    cfg.weight_sync.join_timeout_s = 0.5
    client = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    publisher = WeightPublisher(
        cfg.weight_sync,
        record_layout(torch.nn.Linear(8, 8), cfg.weight_sync),
        contextlib.nullcontext,
        client,
        Streams(RUN_ID).control,
        RUN_ID,
        tmp_path,
        ("cpu", "cpu"),
        version=5,
    )
    publisher.sync.attempts = 1  # one 0.5 s attempt per try: the tries' rate is the catch-up's alone
    store = make_store("127.0.0.1", port, 1, None, 30)
    signer = publisher.sync.signer
    index = register(store, signer, "actor-0")
    beat = Heartbeat("127.0.0.1", port, index, signer, 0.2, 30)
    announced: list = []
    done = threading.Event()
    reader = threading.Thread(
        target=_reads_but_never_joins, args=(zmq_broker, store, signer, index, announced, done), daemon=True
    )
    reader.start()
    try:
        wait_for(lambda: publisher.sync.membership.alive() == ["actor-0"], 30, "the actor's heartbeat")
        end = time.monotonic() + 8
        with caplog.at_level(logging.INFO, logger="opd"):
            while time.monotonic() < end:  # what Intake.next_batch does while nothing trainable comes
                publisher.catch_up(5)
                time.sleep(0.1)
    finally:
        done.set()
        beat.stop()
        reader.join(5)
        client.close()
    tries = [r for r in caplog.records if "sending them weight version 5" in r.getMessage()]
    assert ["actor-0"] in announced  # it was sent to, and it read the announcements
    # each try costs ~0.5 s; tried again 1 s after each one failed (as before) that is ~6 tries in 8 s; backing
    # off 2, 4 s: 3
    assert 2 <= len(tries) <= 4, [r.getMessage() for r in tries]
