"""The join deadlock found in the fresh-clone CI of issue 18, reproduced deterministically (it failed, as an
xfail(strict), until the join spool: learner/spool.py).

A pool of several scorers finishes its batches out of order. Here teacher alpha's copies of mixtures 0..31 and
teacher beta's of 16..47 arrive first (broker.max_depth 32 each). Had the learner kept every copy that waits for
its join unacknowledged, the broker would count them against the depth: only 16..31 would join (fewer than the
batch of 32), alpha's 32..47 and beta's 0..15 would wait for room only a step could make, and nothing would train.
With the spool, each waiting copy is on disk and acknowledged, the streams drain and the batch fills.
"""

from __future__ import annotations

import threading

from broker.zmq import ZmqBroker
from tests.integration.test_scored_streams import mixture_intake, scorer_thread
from tests.unit.test_join import copies_of

RUN_ID = "join-out-of-order"
VOCAB = 16
BATCH = 32  # = the zmq_broker fixture's max_depth


def test_pools_that_finish_out_of_order_still_fill_a_batch(zmq_broker, tmp_path):
    client = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    intake = mixture_intake(client, tmp_path, RUN_ID, BATCH, ["alpha", "beta"], batch_timeout_s=8)
    mixtures = [copies_of({"alpha": 0.5, "beta": 0.5}) for _ in range(48)]
    stopped = threading.Event()
    alpha = [m["alpha"] for m in mixtures]  # in order
    beta = [m["beta"] for m in mixtures[16:] + mixtures[:16]]  # its later scorers finished first

    def connect():
        return ZmqBroker(zmq_broker, request_timeout_s=10.0)

    threads = [
        scorer_thread(connect, name, copies, None, threading.Event(), stopped.is_set, run_id=RUN_ID)
        for name, copies in (("alpha", alpha), ("beta", beta))
    ]
    try:
        batch = intake.next_batch(version=3)
    finally:
        stopped.set()
        for t in threads:
            t.join(timeout=10)
        client.close()
    assert len(batch.trajectories) == BATCH
