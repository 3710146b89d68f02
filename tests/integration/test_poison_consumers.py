"""Messages that stopped a consumer in the issue-14 fault campaign, through the consumers' real paths and real
brokers: each now costs one dead letter with its reason, and the consumer carries on."""

from __future__ import annotations

import numpy as np
import pytest

from actors.actor import _weights_fields
from broker.redis import RedisBroker
from learner.batching import collate
from opd.protocol import ProtocolError, Streams, dead_letter_record, unpack_control
from teacher_scorers.scorer import _topk_mismatch
from tests.integration.test_learner_intake import RUN_ID, _dead_letters, _intake, _publish, client, scored

__all__ = ["client"]  # the fixture, shared with the intake tests


def _width(k: int, **kw):
    """A scored trajectory whose teacher top-k has width k."""
    n = 3
    ids = np.tile(np.arange(k, dtype=np.int32), (n, 1))
    lps = np.full((n, k), -3.0, dtype=np.float32)
    return scored(teacher_topk_ids=ids, teacher_topk_logprobs=lps, **kw)


def test_a_top_k_narrower_than_the_runs_is_dead_lettered_naming_scorer_topk(client, tmp_path):
    """Width 3 in a run using 8 passed validation and crashed `collate` (then every --resume)."""
    intake, reporter = _intake(client, tmp_path, "learner.batch_size=1", "scorer.topk=8", needs_topk=True)
    narrow, good = _width(3), _width(8)
    _publish(client, [narrow, good])
    assert [t.id for t in intake.next_batch(version=0).trajectories] == [good.id]
    (record,) = _dead_letters(client)
    assert record["trajectory_id"] == narrow.id
    assert "top-k width 3 but scorer.topk 8" in record["reason"]
    assert reporter.counters["dead_lettered"] == 1


def test_a_batch_that_cannot_be_collated_loses_only_its_culprit(client, tmp_path):
    """A loss without top-k lets mixed widths through validation; collating them raised RuntimeError and
    stopped the learner. Now the culprit is dead-lettered and acknowledged, and the rest is trained."""
    intake, reporter = _intake(client, tmp_path, "learner.batch_size=3")
    first, odd, third = _width(2), _width(3), _width(2)
    _publish(client, [first, odd, third])
    batch = intake.next_batch(version=0)
    with pytest.raises(RuntimeError):
        collate(batch.trajectories, pad_id=0)  # the failure the campaign hit
    made = intake.collate(batch, lambda ts: collate(ts, pad_id=0))
    assert made is not None and made.size == 2 and made.topk_ids.shape[-1] == 2
    assert [t.id for t in batch.trajectories] == [first.id, third.id] and len(batch.message_ids) == 2
    (record,) = _dead_letters(client)
    assert record["trajectory_id"] == odd.id and "could not collate" in record["reason"]
    intake.ack(batch)
    assert client.depth(Streams(RUN_ID).scored) == 0  # the culprit was acknowledged with the dead letter
    assert reporter.counters["dead_lettered"] == 1


def test_an_odd_message_first_in_the_batch_does_not_cost_the_others(client, tmp_path):
    intake, _ = _intake(client, tmp_path, "learner.batch_size=3")
    odd, second, third = _width(3), _width(2), _width(2)
    _publish(client, [odd, second, third])
    batch = intake.next_batch(version=0)
    made = intake.collate(batch, lambda ts: collate(ts, pad_id=0))
    assert made.size == 2 and [t.id for t in batch.trajectories] == [second.id, third.id]
    assert [r["trajectory_id"] for r in _dead_letters(client)] == [odd.id]


def test_a_batch_of_culprits_only_gives_no_batch(client, tmp_path):
    intake, _ = _intake(client, tmp_path, "learner.batch_size=1")
    _publish(client, [_width(2)])
    batch = intake.next_batch(version=0)

    def never(ts):
        raise ValueError("nothing collates")

    assert intake.collate(batch, never) is None and len(batch) == 0
    assert "ValueError: nothing collates" in _dead_letters(client)[0]["reason"]


def test_the_learners_own_pending_poison_entry_is_dead_lettered_after_max_deliveries(redis_server):
    """A learner that crashes on an entry re-reads it from its own pending list after every --resume (no
    XAUTOCLAIM involved); that path never counted deliveries, so two resumes crashed the same way. Now the
    delivery that exceeds broker.max_deliveries dead-letters it instead."""
    streams = Streams("resume-poison")
    producer = RedisBroker(redis_server.url)
    (poison_id,) = producer.publish(streams.scored, [b"poison"])
    max_deliveries = 3
    seen = 0
    for _incarnation in range(max_deliveries + 1):  # the first run, then one --resume per crash
        learner = RedisBroker(
            redis_server.url,
            claim_idle_s=3600,
            max_deliveries=max_deliveries,
            poison_record=dead_letter_record,
        )
        got = learner.consume(streams.scored, Streams.LEARNER_GROUP, Streams.LEARNER_GROUP, 8, 0.2)
        seen += len(got)
        learner.close()  # "crashed" before acknowledging
    assert seen == max_deliveries  # handed out max_deliveries times, then not again
    assert producer.depth(streams.scored) == 0
    (record,) = [unpack_control(d) for _, d in producer.entries(streams.dead_letter)]
    assert record["message_id"] == poison_id and record["data"] == b"poison"
    assert "broker.max_deliveries=3" in record["reason"]
    producer.close()


def test_a_scorer_refuses_to_publish_a_top_k_of_another_width():
    t = _width(3)
    assert _topk_mismatch(t, 3) is None
    assert "top-k width 3 but scorer.topk gives 8" in str(_topk_mismatch(t, 8))
    assert "top-k width 3 but scorer.topk gives 0" in str(_topk_mismatch(t, 0))  # came with top-k attached
    assert _topk_mismatch(scored(teacher_topk_ids=None, teacher_topk_logprobs=None), 0) is None


@pytest.mark.parametrize(
    "record",
    [
        {"kind": "weights"},
        {"kind": "weights", "version": "3"},
        {"kind": "weights", "version": 2**63},
        {"kind": "weights", "version": -1},
        {"kind": "weights", "version": 1, "epoch": 1.5},
        {"kind": "weights", "version": 1, "members": "actor-0"},
        {"kind": "weights", "version": 1, "members": [1]},
    ],
)
def test_an_actor_refuses_a_weights_record_it_cannot_act_on(record):
    with pytest.raises(ProtocolError, match="weights record"):
        _weights_fields(record)


def test_an_actor_reads_a_well_formed_weights_record():
    assert _weights_fields({"kind": "weights", "version": 4, "epoch": 2, "members": ["actor-0"]}) == (
        4,
        2,
        ["actor-0"],
    )
    assert _weights_fields({"kind": "weights", "version": 4}) == (4, 0, [])
