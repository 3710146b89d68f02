"""Exactly once by construction (issue 14, "Trained twice, with no process killed"), on real brokers: a consumer
never gets its own held entries back, a live one keeps what it holds, a duplicate scored copy is acknowledged and
counted but never trained, every counter counts distinct things, and no number of producers takes a work stream
past broker.max_depth."""

from __future__ import annotations

import threading
import time

from broker import publish_with_backpressure
from broker.redis import RedisBroker
from learner.state import TrainedLedger
from opd.protocol import Streams, dead_letter_record, encode
from tests.integration.test_broker import make
from tests.integration.test_learner_intake import RUN_ID, _intake, scored

__all__ = ["make"]  # the two-broker client factory, shared with the broker semantics tests

CLAIM_IDLE_S = 0.2


def _learner_broker(url: str, **kw) -> RedisBroker:
    """The learner's client as components open it: dead-letters what exceeds max_deliveries."""
    return RedisBroker(
        url, claim_idle_s=CLAIM_IDLE_S, max_deliveries=3, poison_record=dead_letter_record, **kw
    )


def _publish_slowly(url: str, payloads: list[bytes], every_s: float) -> threading.Thread:
    """A scorer that hands on one scored copy every `every_s` (a slow teacher), from its own client."""

    def run():
        producer = RedisBroker(url)
        for p in payloads:
            time.sleep(every_s)
            assert producer.publish(Streams(RUN_ID).scored, [p]) is not None
        producer.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_batch_slower_to_fill_than_claim_idle_gets_each_trajectory_once(redis_server, tmp_path):
    """The claim-idle duplicate: with XAUTOCLAIM the learner took its own pending entries back once idle for
    claim_idle_s while its batch was still filling, so one trajectory came in several times (and its entry,
    "delivered" over max_deliveries times, was dead-lettered while in the batch). Now nothing is redelivered
    to the consumer that holds it, however long the batch takes."""
    learner = _learner_broker(redis_server.url)
    intake, reporter = _intake(learner, tmp_path, "learner.batch_size=8")
    trajs = [scored() for _ in range(8)]
    producer = _publish_slowly(redis_server.url, [encode(t) for t in trajs], every_s=0.15)  # ~6 claim_idle_s

    batch = intake.next_batch(version=0)
    producer.join(10)

    assert [t.id for t in batch.trajectories] == [t.id for t in trajs]  # each once, in order
    assert len(set(batch.message_ids)) == 8
    assert learner.redelivered == 0  # none of its own entries handed back to it
    assert "duplicates_skipped" not in reporter.counters and "dead_lettered" not in reporter.counters
    assert learner.entries(Streams(RUN_ID).dead_letter) == []
    time.sleep(3 * CLAIM_IDLE_S)  # a long optimiser step: still held, still fresh
    pending = learner.redis.xpending_range(Streams(RUN_ID).scored, Streams.LEARNER_GROUP, "-", "+", 20)
    assert {int(p["times_delivered"]) for p in pending} == {1} and len(pending) == 8
    intake.ack(batch)
    assert learner.depth(Streams(RUN_ID).scored) == 0
    learner.close()


def test_a_dead_consumers_entries_go_to_another_but_a_live_ones_stay(redis_server):
    """Another consumer of the group still takes over a dead consumer's idle entries; a live one that is slow
    (a large teacher scoring for longer than claim_idle_s, making no broker call meanwhile) keeps its own."""
    slow = RedisBroker(redis_server.url, claim_idle_s=CLAIM_IDLE_S)
    other = RedisBroker(redis_server.url, claim_idle_s=CLAIM_IDLE_S)
    slow.publish("r:rollouts", [b"a", b"b", b"c"])
    held = slow.consume("r:rollouts", "scorers", "scorer-0", 3, 0.1)
    assert [m.data for m in held] == [b"a", b"b", b"c"]

    time.sleep(5 * CLAIM_IDLE_S)  # scoring, alive
    assert other.consume("r:rollouts", "scorers", "scorer-1", 10, 0.1) == []
    slow.ack("r:rollouts", "scorers", [held[0].id])  # done with a; b and c still in hand
    slow.close()  # then it dies: nothing refreshes b and c any more

    time.sleep(2 * CLAIM_IDLE_S)
    back = other.consume("r:rollouts", "scorers", "scorer-1", 10, 0.1)
    assert [m.data for m in back] == [b"b", b"c"] and other.redelivered == 2
    other.ack("r:rollouts", "scorers", [m.id for m in back])
    assert other.depth("r:rollouts") == 0
    other.close()


def test_a_consumer_gets_back_what_it_released_not_what_it_holds(redis_server):
    """A single scorer retries a trajectory its teacher failed on (released) after claim_idle_s, counted as a
    delivery, while the rest of what it holds stays with it."""
    b = RedisBroker(redis_server.url, claim_idle_s=CLAIM_IDLE_S)
    b.publish("r:rollouts", [b"failed", b"in hand"])
    failed, in_hand = b.consume("r:rollouts", "scorers", "scorer-0", 2, 0.1)
    b.release("r:rollouts", "scorers", [failed.id])
    time.sleep(2 * CLAIM_IDLE_S)
    assert [m.data for m in b.consume("r:rollouts", "scorers", "scorer-0", 10, 0.1)] == [b"failed"]
    assert b.consume("r:rollouts", "scorers", "scorer-0", 10, 0.1) == []  # in hand: not handed back
    [p] = b.redis.xpending_range("r:rollouts", "scorers", failed.id, failed.id, 1)
    assert p["times_delivered"] == 2
    b.close()


def test_duplicate_scored_copies_are_acknowledged_and_counted_never_trained(redis_server, tmp_path):
    """Two scored copies of one trajectory (a scorer restarted under the same index re-scored it), handed on
    slowly, and a third after it was trained: trained once, every copy acknowledged, each copy counted once
    (an entry delivered again is not another copy)."""
    learner = _learner_broker(redis_server.url)
    trained = TrainedLedger()
    intake, reporter = _intake(learner, tmp_path, "learner.batch_size=2")
    intake.trained = trained
    a, b, c, d = scored(), scored(), scored(), scored()
    stream = Streams(RUN_ID).scored
    producer = _publish_slowly(redis_server.url, [encode(a), encode(a), encode(b)], every_s=0.3)

    batch = intake.next_batch(version=0)
    producer.join(10)
    assert [t.id for t in batch.trajectories] == [a.id, b.id]
    trained.extend(t.id for t in batch.trajectories)  # what the learner's step records
    intake.ack(batch)
    assert learner.depth(stream) == 0  # the copy too: acknowledged at once
    learner.publish(stream, [encode(a), encode(c), encode(d)])  # a late copy after a was trained
    batch = intake.next_batch(version=0)
    assert [t.id for t in batch.trajectories] == [c.id, d.id]
    intake.ack(batch)
    assert learner.depth(stream) == 0
    assert reporter.counters["duplicates_skipped"] == 2  # two copies, each counted once
    assert "dead_lettered" not in reporter.counters and learner.redelivered == 0
    learner.close()


def test_late_copies_of_a_stale_trajectory_count_it_once_across_a_resume(redis_server, tmp_path):
    """A scorer paused for a minute publishes its copies late, after another scorer's copies of the same
    trajectories were already dropped as stale: each id is counted and ledgered as stale once (the campaign
    counted 128 for 65 ids), the late copies are duplicates, and a resumed learner keeps the count."""
    learner = _learner_broker(redis_server.url)
    intake, reporter = _intake(learner, tmp_path, "learner.batch_size=1", "learner.max_staleness=1")
    old, fresh = scored(policy_version=0), scored(policy_version=3)
    stream = Streams(RUN_ID).scored
    learner.publish(stream, [encode(old), encode(old), encode(fresh)])

    assert [t.id for t in intake.next_batch(version=3).trajectories] == [fresh.id]
    assert reporter.counters["dropped_stale"] == 1 and reporter.counters["duplicates_skipped"] == 1
    ledger = tmp_path / "ledger" / "learner.dropped_stale"
    assert ledger.read_text().split() == [old.id]
    assert learner.depth(stream) == 1  # only `fresh` is pending (until the step)

    resumed, counts = _intake(learner, tmp_path, "learner.batch_size=1", "learner.max_staleness=1")
    assert counts.counters["dropped_stale"] == 1  # the ledger's ids, not a second count
    learner.publish(stream, [encode(old), encode(scored(policy_version=3))])
    resumed.next_batch(version=3)
    assert counts.counters["dropped_stale"] == 1 and counts.counters["duplicates_skipped"] == 1
    assert ledger.read_text().split() == [old.id]
    learner.close()


def _fill(client, stream: str, batch: int, out: list[int], lock) -> None:
    """Publish batches until the stream refuses one; record how many entries each publish appended."""
    while True:
        ids = client.publish(stream, [b"x"] * batch)
        if ids is None:
            return
        with lock:
            out.append(len(ids))


def test_concurrent_producers_never_take_a_work_stream_past_max_depth(make):
    """Eight producers (batches of 1 to 4 entries) publish at once into a stream bounded at 32: the length
    check and the append are one step (the campaign saw 127 entries with max_depth 64), and a batch takes only
    the room left."""
    stream, lock, appended = "depth:scored", threading.Lock(), []
    clients = [make() for _ in range(8)]
    threads = [
        threading.Thread(target=_fill, args=(c, stream, 1 + i % 4, appended, lock))
        for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert make().depth(stream) == sum(appended) == 32


def test_producers_and_a_consumer_keep_the_bound_and_lose_nothing(make):
    """Producers with batches larger than the room left, a consumer acknowledging as it goes: every entry is
    consumed exactly once, and the stream never held more than max_depth (sampled all along)."""
    stream, per, batch = "flow:rollouts", 60, 7
    sampled, done = [], threading.Event()

    def produce(tag: str) -> None:
        c = make(10.0)
        for k in range(0, per, batch):
            payloads = [f"{tag}-{i}".encode() for i in range(k, min(k + batch, per))]
            assert len(publish_with_backpressure(c, stream, payloads, poll_s=0.01)) == len(payloads)

    def sample() -> None:
        c = make(10.0)
        while not done.is_set():
            sampled.append(c.depth(stream))

    producers = [threading.Thread(target=produce, args=(f"p{i}",)) for i in range(4)]
    sampler = threading.Thread(target=sample)
    for t in [*producers, sampler]:
        t.start()
    consumer, seen = make(10.0), []
    deadline = time.monotonic() + 60
    while len(seen) < 4 * per and time.monotonic() < deadline:
        msgs = consumer.consume(stream, "workers", "c0", 5, 0.2)
        seen += [m.data for m in msgs]
        consumer.ack(stream, "workers", [m.id for m in msgs])
    done.set()
    for t in [*producers, sampler]:
        t.join(30)
    assert sorted(seen) == sorted(f"p{i}-{k}".encode() for i in range(4) for k in range(per))
    assert sampled and max(sampled) <= 32


def test_a_producer_stopped_with_part_of_its_batch_sent_learns_which_part(make):
    """A batch bigger than the room left goes out a prefix at a time; asked to stop meanwhile, the producer gets
    the ids of what went out (an actor records just those as generated), None when nothing did."""
    b = make()
    assert len(b.publish("part:rollouts", [b"x"] * 30)) == 30
    sent = publish_with_backpressure(b, "part:rollouts", [b"a", b"b", b"c", b"d"], should_stop=lambda: True)
    assert len(sent) == 2 and b.depth("part:rollouts") == 32
    assert publish_with_backpressure(b, "part:rollouts", [b"e"], should_stop=lambda: True) is None
