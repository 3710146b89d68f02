"""A scorer stopped with SIGTERM (how `opd scale` removes one) on the zmq broker, which never redelivers: it must
hand on the batch it holds, even while the scored stream is full, instead of leaving it pending forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from broker import stream_name
from broker.zmq import ZmqBroker
from opd.protocol import decode, encode
from tests.conftest import REPO, TINY, wait_for
from tests.unit.test_protocol import make

pytestmark = pytest.mark.slow

RUN = "drain-test"
BATCH = 16
DEPTH = 32  # the zmq_broker fixture's max_depth


def test_sigterm_with_a_full_scored_stream_still_hands_on_the_batch(zmq_broker, prepared, tmp_path):
    client = ZmqBroker(zmq_broker, request_timeout_s=5)
    rollouts, scored = stream_name(RUN, "rollouts"), stream_name(RUN, "scored")
    assert client.publish(scored, [b"placeholder"] * DEPTH) is not None  # full: the scorer cannot publish
    trajs = [
        make(
            run_id=RUN,
            prompt_id=f"p{i}",
            teacher_logprobs=None,
            teacher_topk_ids=None,
            teacher_topk_logprobs=None,
            response_token_ids=np.array([7, 8, 2], dtype=np.int32),
        )
        for i in range(BATCH)
    ]
    client.publish(rollouts, [encode(t) for t in trajs])
    log_path = tmp_path / "scorer.log"
    port = zmq_broker.rsplit(":", 1)[1]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd", "scorer", "--config", TINY, f"run.run_id={RUN}",
             f"run.cache_dir={prepared}", f"run.output_dir={tmp_path}", f"broker.port={port}",
             f"scorer.batch_size={BATCH}", "run.shutdown_grace_s=60"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: b"ready" in log_path.read_bytes(), 120, "the scorer to load its teacher")
        # It takes the batch and scores it (well under a second), then waits on the full stream.
        time.sleep(3.0)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(3.0)
        assert proc.poll() is None, log_path.read_text()  # still holding the batch, waiting for room

        taken = client.consume(scored, "learner", "learner", DEPTH, 1.0)  # the learner makes room
        client.ack(scored, "learner", [m.id for m in taken])
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    handed_on = client.consume(scored, "learner", "learner", DEPTH, 1.0)
    assert sorted(decode(m.data, require_scored=True).id for m in handed_on) == sorted(t.id for t in trajs)
    assert client.depth(rollouts) == 0  # acknowledged: nothing left pending with a dead consumer
    assert "SIGTERM" in log_path.read_text()
    client.close()
