"""The join deadlock found in the last CI of issue 18 (not fixed yet: xfail, strict, so the fix must remove it).

A pool of several scorers finishes its batches out of order. Here teacher alpha's copies of mixtures 0..31 fill its
scored stream (broker.max_depth 32) while teacher beta's copies of mixtures 16..47 fill beta's. The learner holds
every copy unacknowledged for its join, and the broker counts held entries against the depth, so only mixtures
16..31 join (16, fewer than the batch of 32); alpha's copies of 32..47 and beta's of 0..15 wait for room that only
a step would make. Backpressure should count what the learner has not read, not what it holds for a join (those
are bounded by the actors' backpressure on the rollouts streams); see /work/notes/state-after-18.md.
"""

from __future__ import annotations

import threading

from broker.base import publish_with_backpressure
from broker.zmq import ZmqBroker
from learner.intake import Contract, Intake
from learner.state import TrainedLedger
from opd.config import load_config
from opd.protocol import Streams, encode
from opd.runtime.lifecycle import Reporter, StopFlag
from tests.unit.test_join import copies_of

RUN_ID = "join-out-of-order"
VOCAB = 16
BATCH = 32  # = the zmq_broker fixture's max_depth


def _publish(address: str, teacher: str, copies: list, stop) -> threading.Thread:
    def run():
        client = ZmqBroker(address, request_timeout_s=10.0)
        publish_with_backpressure(
            client, Streams(RUN_ID).scored_for(teacher), [encode(t) for t in copies], should_stop=stop
        )
        client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_pools_that_finish_out_of_order_still_fill_a_batch(zmq_broker, tmp_path):
    cfg = load_config(
        None,
        [f"run.run_id={RUN_ID}", f"learner.batch_size={BATCH}", "learner.batch_timeout_s=8"]
        + ["routing.join_timeout_s=300", "routing.on_join_timeout=dead_letter"],
    )
    client = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    intake = Intake(
        client,
        Reporter(client, cfg, "learner", 0.0),
        Streams(RUN_ID),
        Contract.of(cfg, VOCAB, needs_rewards=False, needs_topk=False),
        cfg.learner,
        TrainedLedger(),
        tmp_path / "ledger" / "learner.dropped_stale",
        StopFlag(),
        routing=cfg.routing,
        teachers=["alpha", "beta"],
    )
    mixtures = [copies_of({"alpha": 0.5, "beta": 0.5}) for _ in range(48)]
    stopped = threading.Event()
    alpha = [m["alpha"] for m in mixtures]  # in order
    beta = [m["beta"] for m in mixtures[16:] + mixtures[:16]]  # its later scorers finished first
    threads = [
        _publish(zmq_broker, "alpha", alpha, stopped.is_set),
        _publish(zmq_broker, "beta", beta, stopped.is_set),
    ]
    try:
        batch = intake.next_batch(version=3)
    finally:
        stopped.set()
        for t in threads:
            t.join(timeout=10)
        client.close()
    assert len(batch.trajectories) == BATCH
