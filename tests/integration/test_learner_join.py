"""Several teachers at the learner's intake, with real scored copies through real brokers (zmq, and a Redis server
across a learner restart): a mixture is held, unacknowledged, until every teacher of its route has sent its copy,
then trained as one trajectory; duplicates, foreign teachers, the join timeout in both modes, and the books."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from broker.zmq import ZmqBroker
from learner.batching import collate
from learner.checkpoint import CheckpointStore
from learner.engines.torch import TorchEngine
from learner.intake import JOIN_LEDGER, Contract, Intake
from learner.join import combine
from learner.state import TrainedLedger
from opd.config import load_config
from opd.protocol import Streams, decode, encode, unpack_control
from opd.runtime.lifecycle import Reporter, StopFlag
from tests.scored import tiny_model
from tests.unit.test_join import copies_of

RUN_ID = "join-test"
VOCAB = 16
STREAM = Streams(RUN_ID).scored


@pytest.fixture
def client(zmq_broker):
    broker = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    yield broker
    broker.close()


def _intake(client, tmp_path, *overrides: str, topk=False):
    cfg = load_config(
        None,
        [f"run.run_id={RUN_ID}", "learner.batch_timeout_s=20", "learner.batch_size=1", *overrides]
        + (["scorer.topk=2"] if topk else []),
    )
    reporter = Reporter(client, cfg, "learner", 0.0)
    contract = Contract.of(cfg, VOCAB, needs_rewards=False, needs_topk=topk)
    ledger = tmp_path / "ledger" / "learner.dropped_stale"
    trained = TrainedLedger()
    intake = Intake(
        client,
        reporter,
        Streams(RUN_ID),
        contract,
        cfg.learner,
        trained,
        ledger,
        StopFlag(),
        routing=cfg.routing,
    )
    return intake, reporter, trained


def _publish(client, *trajs) -> None:
    assert client.publish(STREAM, [encode(t) for t in trajs]) is not None


def _dead_letters(client) -> list[dict]:
    return [unpack_control(m.data) for m in client.consume(Streams(RUN_ID).dead_letter, "t", "t", 100, 0.0)]


def _train(intake, trained, batch) -> None:
    """What the learner does after the optimiser step: the ledger, then the acknowledgement."""
    trained.extend(t.id for t in batch.trajectories)
    intake.reporter.add(trajectories_trained=len(batch))
    intake.ack(batch)


def test_a_mixture_is_held_until_every_teacher_then_trained_once_and_replayable(client, tmp_path):
    intake, reporter, trained = _intake(client, tmp_path, "learner.batch_size=2", topk=True)
    scored = copies_of()
    single = copies_of({"alpha": 1.0})["alpha"]
    _publish(client, scored["alpha"], single, scored["alpha"], scored["beta"])

    batch = intake.next_batch(version=3)

    assert [t.id for t in batch.trajectories] == [single.id, scored["alpha"].id]
    joined = batch.trajectories[1]
    assert joined.teacher_weights == {"alpha": 0.25, "beta": 0.75} and joined.mixture_topk_ids.shape == (
        2,
        3,
        2,
    )
    assert reporter.counters["duplicates_skipped"] == 1  # the second copy from alpha
    # alpha's copy waited for beta's: spooled and acknowledged at once; the other two are pending until the step
    assert len(batch.message_ids) == 2 and client.depth(STREAM) == 2 and batch.joined_copies == 1
    assert intake.spool.holds(joined.id)
    # what the replay log keeps and rank 0 sends the other ranks: one message per trajectory, the joined one
    log = CheckpointStore(tmp_path, 2)
    log.log_step(1, batch.payloads)
    [(step, payloads)] = log.replay_after(0)
    assert step == 1
    replayed = [decode(p, vocab_size=VOCAB, require_scored=True) for p in payloads]
    assert [t.id for t in replayed] == [single.id, joined.id]
    want, got = collate(batch.trajectories, 0), collate(replayed, 0)
    for name in ("teacher", "topk_ids", "topk_logprobs", "teacher_tail", "topk_weights"):
        assert torch.equal(getattr(want, name), getattr(got, name)), name
    _train(intake, trained, batch)
    assert client.depth(STREAM) == 0 and reporter.counters["joined_copies"] == 1
    assert not intake.spool.holds(joined.id) and intake.spool.load() == []  # settled: never read back
    _publish(client, scored["beta"])  # a late re-score of a trained mixture
    intake.stop = lambda: client.depth(STREAM) == 0
    assert len(intake.next_batch(version=3)) == 0
    assert reporter.counters["duplicates_skipped"] == 2


def test_the_batch_timeout_names_the_teachers_a_held_mixture_waits_for(client, tmp_path):
    intake, _, _ = _intake(client, tmp_path, "learner.batch_timeout_s=0.5")
    _publish(client, copies_of()["alpha"])
    with pytest.raises(RuntimeError, match=r"1 mixture copies held waiting for teacher\(s\) beta \(1 traj"):
        intake.next_batch(version=3)


def test_a_copy_from_a_teacher_outside_its_route_is_dead_lettered_naming_both(client, tmp_path):
    intake, reporter, _ = _intake(client, tmp_path)
    stray = replace(copies_of({"alpha": 1.0})["alpha"], teacher_name="beta")
    good = copies_of({"alpha": 1.0})["alpha"]
    _publish(client, stray, good)
    assert [t.id for t in intake.next_batch(version=3).trajectories] == [good.id]
    [dead] = _dead_letters(client)
    assert "teacher 'beta'" in dead["reason"] and "['alpha']" in dead["reason"]
    assert reporter.counters["dead_lettered"] == 1


def test_a_timed_out_join_trains_on_the_teachers_present_renormalised(client, tmp_path):
    intake, reporter, trained = _intake(
        client, tmp_path, "routing.join_timeout_s=0.2", "routing.on_join_timeout=train_present"
    )
    route = {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}
    scored = copies_of(route)
    _publish(client, scored["alpha"], scored["gamma"])

    batch = intake.next_batch(version=3)

    [t] = batch.trajectories
    assert t.teacher_weights == pytest.approx({"alpha": 0.2 / 0.7, "gamma": 0.5 / 0.7})
    # both copies waited, so both are in the spool and acknowledged: nothing left for the step to acknowledge
    assert batch.partial == [True] and batch.message_ids == [] and batch.joined_copies == 1
    _train(intake, trained, batch)
    assert reporter.counters["partial_joins"] == 1 and reporter.counters["joined_copies"] == 1
    assert client.depth(STREAM) == 0


def test_a_timed_out_join_is_dead_lettered_once_naming_the_missing_teachers(client, tmp_path):
    intake, reporter, _ = _intake(
        client, tmp_path, "routing.join_timeout_s=0.2", "routing.on_join_timeout=dead_letter"
    )
    scored = copies_of({"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    later = copies_of({"alpha": 1.0})["alpha"]
    _publish(client, scored["alpha"], scored["gamma"])
    intake.stop = lambda: bool(intake.dead_joins)
    assert len(intake.next_batch(version=3)) == 0
    dead = _dead_letters(client)
    assert len(dead) == 2 and all("['beta']" in d["reason"] and "join_timeout_s" in d["reason"] for d in dead)
    assert {d["trajectory_id"] for d in dead} == {scored["alpha"].id} and all(d["data"] for d in dead)
    assert reporter.counters["dead_lettered"] == 1 and reporter.counters["joined_copies"] == 1
    assert client.depth(STREAM) == 0
    assert (tmp_path / "ledger" / JOIN_LEDGER).read_text().split() == [scored["alpha"].id]
    # the missing copy arriving late, even at a resumed learner, is a duplicate, never a new join
    resumed, counts, _ = _intake(client, tmp_path)
    _publish(client, scored["beta"], later)
    assert [t.id for t in resumed.next_batch(version=3).trajectories] == [later.id]
    assert counts.counters["duplicates_skipped"] == 1


def test_a_stale_mixture_is_dropped_once_with_all_its_copies(client, tmp_path):
    intake, reporter, _ = _intake(client, tmp_path, "learner.max_staleness=1")
    scored = copies_of()  # policy_version 3
    fresh = copies_of({"alpha": 1.0}, policy_version=9)["alpha"]
    _publish(client, scored["beta"], scored["alpha"], fresh)
    assert [t.id for t in intake.next_batch(version=9).trajectories] == [fresh.id]
    assert reporter.counters["dropped_stale"] == 1 and reporter.counters["joined_copies"] == 1
    assert client.depth(STREAM) == 1  # only the batch's entry is still pending


def test_the_books_balance_every_scored_message(client, tmp_path):
    """Published copies = trained + dead-lettered + duplicates + dropped as stale + joined copies, and every id
    ends as exactly one of trained, dead-lettered or dropped as stale."""
    intake, reporter, trained = _intake(
        client, tmp_path, "learner.batch_size=3", "learner.max_staleness=2", "routing.join_timeout_s=0.3"
    )
    two, three = copies_of(), copies_of({"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    stale, timed_out = copies_of(policy_version=1), copies_of()
    single = copies_of({"alpha": 1.0})["alpha"]
    msgs = [
        timed_out["beta"],
        stale["alpha"],
        two["alpha"],
        three["gamma"],
        two["alpha"],  # a duplicate
        replace(single, teacher_name="gamma"),  # a foreign teacher: dead-lettered
        replace(timed_out["alpha"], policy_version=2),  # another rollout under the same id: dead-lettered
        stale["beta"],
        three["alpha"],
        two["beta"],
        three["beta"],
        single,
    ]
    _publish(client, *msgs)
    batch = intake.next_batch(version=5)
    _train(intake, trained, batch)
    intake.stop = lambda: client.depth(STREAM) == 0 and len(intake.joiner) == 0
    assert len(intake.next_batch(version=5)) == 0  # the rest, down to the timed-out join
    c = reporter.counters
    assert c["trajectories_trained"] == 3 and c["dead_lettered"] == 3 and c["duplicates_skipped"] == 1
    assert c["dropped_stale"] == 1 and c["joined_copies"] == 4  # two: 1, three: 2, the stale mixture: 1
    assert sum(
        c[k] for k in ("trajectories_trained", "dead_lettered", "duplicates_skipped", "dropped_stale")
    ) + c["joined_copies"] == len(msgs)
    assert sorted(trained.ordered) == sorted([two["alpha"].id, three["alpha"].id, single.id])
    assert intake.dropped_stale == {stale["alpha"].id} and intake.dead_joins == {timed_out["beta"].id}
    assert len(intake.joiner) == 0 and client.depth(STREAM) == 0


def _step(trajs):
    cfg = load_config(None, ["learner.batch_size=1", "learner.warmup_steps=0", "learner.lr=0.05"])
    model = tiny_model(0, torch.float64)
    TorchEngine(model, cfg).step(collate(trajs, 0))
    return [p.detach().clone() for p in model.parameters()]


def test_a_route_with_a_zero_weight_trains_as_that_teacher_alone(client, tmp_path):
    cfg = load_config(
        None,
        ["teachers={a: {}, b: {}}", "routing.routes={arith: {a: 1, b: 0}}", "routing.default=b"],
    )
    route = cfg.routing.route({"task": "arith"}, ["a", "b"])
    assert route == {"a": 1.0}
    alone = copies_of({"alpha": 1.0})["alpha"]
    routed = replace(alone, teacher_weights=route, teacher_name="a")
    plain = replace(alone, teacher_weights=None, teacher_name=None, id="plain")
    intake, _, _ = _intake(client, tmp_path, "learner.batch_size=2")
    _publish(client, routed, plain)
    batch = intake.next_batch(version=3)
    assert [t.id for t in batch.trajectories] == [routed.id, "plain"]
    for got, want in zip(_step(batch.trajectories[:1]), _step(batch.trajectories[1:]), strict=True):
        assert torch.equal(got, want)


def test_a_held_mixture_survives_a_learner_restart(broker_clients, tmp_path):
    """The first incarnation holds alpha's copy (spooled and acknowledged: the broker forgets it) and dies; the next
    reads it back from the join spool, joins it with beta's copy and trains the mixture once. On zmq, which never
    redelivers, only the spool can bring it back."""
    scored = copies_of()
    first = broker_clients()
    intake, _, _ = _intake(first, tmp_path)
    _publish(first, scored["alpha"])
    intake.stop = lambda: intake.joiner.held != {}  # "dies" once the copy is held
    assert len(intake.next_batch(version=3)) == 0 and len(intake.joiner) == 1
    assert first.depth(STREAM) == 0  # acknowledged once on disk
    first.close()

    second = broker_clients()
    resumed, reporter, trained = _intake(second, tmp_path)
    _publish(second, scored["beta"])
    batch = resumed.next_batch(version=3)
    [t] = batch.trajectories
    assert t.id == scored["alpha"].id and np.array_equal(
        t.mixture_topk_ids[0], scored["alpha"].teacher_topk_ids
    )
    _train(resumed, trained, batch)
    assert reporter.counters["joined_copies"] == 1 and second.depth(STREAM) == 0
    third, _, _ = _intake(second, tmp_path)  # settled: a later incarnation reads nothing back
    assert third.spool.load() == []


def test_a_copy_spooled_but_not_acknowledged_before_a_crash_is_a_duplicate_when_delivered_again(
    client, tmp_path
):
    """A crash between the spool's write and the acknowledgement: the copy is in the spool and the broker delivers
    it again. The copy read back joins; the delivered one is a duplicate, acknowledged, never trained twice."""
    scored = copies_of()
    crashed, _, _ = _intake(client, tmp_path)
    crashed.spool.add(STREAM, "41", scored["alpha"].id, encode(scored["alpha"]))
    crashed.spool.sync()
    _publish(client, scored["alpha"], scored["beta"])  # the unacknowledged copy, delivered again; then beta's
    resumed, reporter, trained = _intake(client, tmp_path)
    batch = resumed.next_batch(version=3)
    assert [t.id for t in batch.trajectories] == [scored["alpha"].id] and batch.joined_copies == 1
    assert reporter.counters["duplicates_skipped"] == 1
    _train(resumed, trained, batch)
    assert client.depth(STREAM) == 0 and resumed.spool.load() == []


def test_a_spooled_copy_of_a_trajectory_trained_since_is_not_joined_again(client, tmp_path):
    """A resume re-trains a joined mixture from the replay log (its id is trained) while its waiting copy is still
    in the spool: read back, it is settled, not held and not joined into a second trajectory."""
    scored = copies_of()
    first, _, _ = _intake(client, tmp_path)
    first.spool.add(STREAM, "7", scored["alpha"].id, encode(scored["alpha"]))
    first.spool.sync()
    resumed, _, trained = _intake(client, tmp_path)
    trained.extend([scored["alpha"].id])  # what the replay re-trained
    resumed.stop = lambda: True
    resumed.next_batch(version=3)
    assert len(resumed.joiner) == 0 and resumed.spool.load() == []


def test_a_joined_mixture_replayed_from_the_dead_letters_is_trained_as_it_is(client, tmp_path):
    """`opd dead-letter replay` of a mixture dead-lettered at collate re-injects the joined message itself."""
    intake, _, _ = _intake(client, tmp_path, topk=True)
    joined = combine(copies_of(), {"alpha": 0.25, "beta": 0.75})
    _publish(client, joined)
    [t] = intake.next_batch(version=3).trajectories
    assert t.id == joined.id and np.array_equal(t.mixture_topk_ids, joined.mixture_topk_ids)
