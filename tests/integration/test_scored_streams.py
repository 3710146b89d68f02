"""One scored stream per teacher, on real brokers (zmq and Redis): a fast teacher cannot block the copies that
the learner's held mixtures wait for.

Here one teacher's copies of a whole batch all arrive before any of the other's, and the batch's copies (2 x 20)
are more than max_depth (32). The learner holds each early copy for its join in the join spool and acknowledges
it, so the first teacher's stream empties while the second's fills with the copies that complete the joins,
pending until the step; each copy is acknowledged on its own teacher's stream.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from broker.base import publish_with_backpressure
from broker.redis import RedisBroker
from broker.zmq import ZmqBroker
from learner.intake import Contract, Intake
from learner.state import TrainedLedger
from opd.config import load_config
from opd.protocol import Streams, encode
from opd.runtime.lifecycle import Reporter, StopFlag
from tests.unit.test_join import copies_of

RUN_ID = "scored-streams"
VOCAB = 16
MAX_DEPTH = 32  # the zmq_broker fixture's
BATCH = 20  # each teacher's copies of the batch fit in its own stream; both together (40) exceed MAX_DEPTH
TEACHERS = ("alpha", "beta")


def mixture_intake(client, tmp_path, run_id: str, batch: int, teachers, batch_timeout_s: float) -> Intake:
    """The learner's intake over the scored streams of `teachers`, for batches of `batch` mixtures, joining
    without a timeout in sight (routing.join_timeout_s 300, dead_letter)."""
    cfg = load_config(
        None,
        [f"run.run_id={run_id}", f"learner.batch_size={batch}", f"learner.batch_timeout_s={batch_timeout_s}"]
        + ["routing.join_timeout_s=300", "routing.on_join_timeout=dead_letter"],
    )
    return Intake(
        client,
        Reporter(client, cfg, "learner", 0.0),
        Streams(run_id),
        Contract.of(cfg, VOCAB, needs_rewards=False, needs_topk=False),
        cfg.learner,
        TrainedLedger(),
        tmp_path / "ledger" / "learner.dropped_stale",
        StopFlag(),
        routing=cfg.routing,
        teachers=list(teachers),
    )


def scorer_thread(
    connect,
    teacher: str,
    copies: list,
    after: threading.Event | None,
    done: threading.Event,
    stop,
    run_id=RUN_ID,
) -> threading.Thread:
    """A teacher's scorer publishing its copies as a scorer does (backpressure while its stream is full), once
    `after` is set (None: at once)."""

    def run():
        client = connect()
        if after is not None:
            after.wait()
        stream = Streams(run_id).scored_for(teacher)
        publish_with_backpressure(client, stream, [encode(t) for t in copies], should_stop=stop)
        done.set()

    thread = threading.Thread(target=run, name=f"scorer-{teacher}", daemon=True)
    thread.start()
    return thread


def test_a_fast_teachers_copies_do_not_block_the_joins_of_a_batch(broker_clients, tmp_path):
    connect = broker_clients
    client = connect()
    intake = mixture_intake(client, tmp_path, RUN_ID, BATCH, TEACHERS, batch_timeout_s=10)
    reporter, trained = intake.reporter, intake.trained
    mixtures = [copies_of({"alpha": 0.5, "beta": 0.5}) for _ in range(BATCH)]
    stopped = threading.Event()
    alpha_done, beta_done = threading.Event(), threading.Event()
    threads = [
        scorer_thread(connect, "alpha", [m["alpha"] for m in mixtures], None, alpha_done, stopped.is_set),
        scorer_thread(connect, "beta", [m["beta"] for m in mixtures], alpha_done, beta_done, stopped.is_set),
    ]
    try:
        batch = intake.next_batch(version=3)
    finally:
        stopped.set()
        for t in threads:
            t.join(timeout=10)

    assert alpha_done.is_set() and beta_done.is_set()
    assert sorted(t.id for t in batch.trajectories) == sorted(m["alpha"].id for m in mixtures)
    assert all(t.teacher_weights == {"alpha": 0.5, "beta": 0.5} for t in batch.trajectories)
    streams = [Streams(RUN_ID).scored_for(n) for n in TEACHERS]
    # alpha's copies waited (spooled, acknowledged); beta's completed the joins and are pending until the step
    assert {s for s, _ in batch.message_ids} == {streams[1]} and len(batch.message_ids) == BATCH
    assert [client.depth(s) for s in streams] == [0, BATCH] and batch.joined_copies == BATCH
    trained.extend(t.id for t in batch.trajectories)
    intake.ack(batch)  # each copy acknowledged on its own teacher's stream
    assert [client.depth(s) for s in streams] == [0, 0]
    assert reporter.counters["joined_copies"] == BATCH


def test_the_learners_queue_depths_sum_the_teachers_streams_and_name_each(zmq_broker):
    """What the learner writes into each step record (`queue_<kind>`, opd_queue_depth): the sum over the teachers'
    streams, and each teacher's own (`<kind>:<teacher>`), so a pool falling behind shows as its own queue."""
    teachers = "teachers={adder: {model: {sft_steps: 0}}, speller: {model: {sft_steps: 0}}}"
    cfg = load_config(None, [f"run.run_id={RUN_ID}", teachers, "routing.default={adder: 1, speller: 1}"])
    client = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    streams = Streams(RUN_ID)
    client.publish(streams.scored_for("adder"), [b"a"] * 3)
    client.publish(streams.scored_for("speller"), [b"s"])
    client.publish(streams.rollouts_for("speller"), [b"r"] * 2)
    depths = Reporter(client, cfg, "learner", 0.0).queue_depths()
    assert depths == {
        "rollouts": 2, "scored": 4, "rollouts:adder": 0, "rollouts:speller": 2, "scored:adder": 3,
        "scored:speller": 1,
    }  # fmt: skip
    assert Reporter(client, load_config(None, [f"run.run_id={RUN_ID}"]), "learner", 0.0).queue_depths() == {
        "rollouts": 0,
        "scored": 0,
    }  # fmt: skip  (without teachers: the one teacher's `rollouts` and `scored`, as before)
    client.close()


def test_a_dead_lettered_copy_is_replayed_to_its_teachers_own_stream(redis_server, tmp_path):
    """`opd dead-letter replay` re-publishes a record to the stream it came from: a copy the learner refused on
    teacher beta's stream goes back there, where the learner reads it again (not to a `scored` nobody reads)."""
    import io

    from opd.launch.deadletter import replay_dead_letters

    cfg = load_config(
        None,
        [f"run.run_id={RUN_ID}", "broker.type=redis", f"broker.url={redis_server.url}"]
        + ["learner.batch_size=1", "learner.batch_timeout_s=10"],
    )
    client = RedisBroker(redis_server.url, max_depth=MAX_DEPTH, request_timeout_s=10.0)
    reporter = Reporter(client, cfg, "learner", 0.0)
    intake = Intake(
        client, reporter, Streams(RUN_ID), Contract.of(cfg, VOCAB, needs_rewards=False, needs_topk=False),
        cfg.learner, TrainedLedger(), tmp_path / "ledger" / "learner.dropped_stale", StopFlag(),
        routing=cfg.routing, teachers=list(TEACHERS),
    )  # fmt: skip
    beta = Streams(RUN_ID).scored_for("beta")
    # routed to alpha, scored by beta: refused on beta's stream
    stray = replace(copies_of({"alpha": 1.0})["alpha"], teacher_name="beta")
    client.publish(beta, [encode(stray)])
    intake.stop = lambda: reporter.counters.get("dead_lettered", 0) >= 1
    assert len(intake.next_batch(version=3)) == 0
    assert client.depth(beta) == 0  # dead-lettered, so acknowledged on beta's stream
    assert replay_dead_letters(cfg, None, out=io.StringIO()) == 1
    assert client.depth(beta) == 1 and client.depth(Streams(RUN_ID).scored) == 0
    [(_, data)] = client.entries(beta)
    assert data == encode(stray)
    client.close()
