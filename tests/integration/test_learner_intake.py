"""The learner's intake with real messages through a real broker: what it trains, what it dead-letters (with which
reason), what it skips or drops, and when each message is acknowledged."""

from __future__ import annotations

import numpy as np
import pytest

from broker.zmq import ZmqBroker
from learner.intake import Contract, Intake, lag
from learner.state import TrainedLedger
from opd.config import load_config
from opd.protocol import Streams, encode, unpack_control
from opd.runtime.lifecycle import Reporter, StopFlag
from tests.unit.test_protocol import make

RUN_ID = "intake-test"
VOCAB = 16


def scored(**kw):
    """A scored trajectory as our actor and scorer stamp it at temperature 1 (the config's default)."""
    return make(**{"behaviour_temperature": 1.0, "teacher_temperature": 1.0, "policy_version": 0, **kw})


@pytest.fixture
def client(zmq_broker):
    broker = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    yield broker
    broker.close()


def _intake(client, tmp_path, *overrides: str, trained=(), needs_rewards=False, needs_topk=False):
    cfg = load_config(None, [f"run.run_id={RUN_ID}", "learner.batch_timeout_s=20", *overrides])
    reporter = Reporter(client, cfg, "learner", 0.0)
    contract = Contract.of(cfg, VOCAB, needs_rewards=needs_rewards, needs_topk=needs_topk)
    ledger = tmp_path / "ledger" / "learner.dropped_stale"
    intake = Intake(
        client, reporter, Streams(RUN_ID), contract, cfg.learner, TrainedLedger(trained), ledger, StopFlag()
    )
    return intake, reporter


def _publish(client, trajs) -> None:
    payloads = [t if isinstance(t, bytes) else encode(t) for t in trajs]
    assert client.publish(Streams(RUN_ID).scored, payloads) is not None


def _dead_letters(client) -> list[dict]:
    msgs = client.consume(Streams(RUN_ID).dead_letter, "test", "test", 100, 0.0)
    return [unpack_control(m.data) for m in msgs]


def test_a_trajectory_stamped_with_another_temperature_is_dead_lettered_with_the_setting_to_fix(
    client, tmp_path
):
    intake, reporter = _intake(client, tmp_path, "learner.batch_size=2")
    hot_actor = scored(behaviour_temperature=0.7)
    cold_scorer = scored(teacher_temperature=2.0)
    unstamped = scored(teacher_temperature=None)
    good = [scored(), scored(behaviour_temperature=1.0 + 1e-8)]  # float noise within the tolerance is fine
    _publish(client, [hot_actor, cold_scorer, unstamped, *good])

    batch = intake.next_batch(version=0)

    assert [t.id for t in batch.trajectories] == [t.id for t in good]
    dead = {r["trajectory_id"]: r["reason"] for r in _dead_letters(client)}
    assert dead[hot_actor.id] == (
        "behaviour_temperature 0.7 but sampling.temperature 1.0: an actor ran with another config"
    )
    assert (
        dead[cold_scorer.id]
        == "teacher_temperature 2.0 but scorer.temperature 1.0: a scorer ran with another config"
    )
    assert "teacher_temperature missing but scorer.temperature 1.0" in dead[unstamped.id]
    assert reporter.counters["temperature_mismatch"] == 3 and reporter.counters["dead_lettered"] == 3
    # the dead-lettered were acknowledged at once (trimmed), the batch stays pending until the step
    assert client.depth(Streams(RUN_ID).scored) == 2
    intake.ack(batch)
    assert client.depth(Streams(RUN_ID).scored) == 0


def test_temperatures_are_compared_with_the_configured_ones(client, tmp_path):
    """A run configured at 0.7 / 2.0 trains what its actors and scorers stamp, and refuses temperature 1."""
    intake, reporter = _intake(
        client, tmp_path, "learner.batch_size=1", "sampling.temperature=0.7", "scorer.temperature=2.0"
    )
    default = scored()
    fitting = scored(behaviour_temperature=0.7, teacher_temperature=2.0)
    _publish(client, [default, fitting])
    assert [t.id for t in intake.next_batch(version=0).trajectories] == [fitting.id]
    [record] = _dead_letters(client)
    assert record["reason"].startswith("behaviour_temperature 1.0 but sampling.temperature 0.7")
    assert reporter.counters["temperature_mismatch"] == 1


def test_duplicates_are_skipped_within_the_batch_and_against_everything_trained(client, tmp_path):
    trained_before = scored()
    intake, reporter = _intake(client, tmp_path, "learner.batch_size=2", trained=[trained_before.id])
    a, b = scored(), scored()
    _publish(client, [trained_before, a, encode(a), b])  # a twice: e.g. scored again after a scorer restart

    batch = intake.next_batch(version=0)

    assert [t.id for t in batch.trajectories] == [a.id, b.id]
    assert reporter.counters["duplicates_skipped"] == 2 and "dead_lettered" not in reporter.counters
    # the copies acknowledged (and gone: the depth counts unfinished work), a and b pending until the step
    assert client.depth(Streams(RUN_ID).scored) == 2
    intake.ack(batch)
    assert client.depth(Streams(RUN_ID).scored) == 0


def test_too_stale_trajectories_are_dropped_counted_and_ledgered(client, tmp_path):
    intake, reporter = _intake(client, tmp_path, "learner.batch_size=3", "learner.max_staleness=1")
    old = scored(policy_version=1)  # lag 2 at version 3
    # started under version 1, its later tokens sampled by 3 (a streaming actor took new weights in flight): judged
    # by its oldest token, lag 2, though most of it is fresh
    mixed = scored(policy_version=1, token_versions=np.array([1, 3, 3], dtype=np.int32))
    # started under 2 and finished under 3: oldest token lag 1, kept
    crossed = scored(policy_version=2, token_versions=np.array([2, 2, 3], dtype=np.int32))
    fresh = [scored(policy_version=2), crossed, scored(policy_version=3)]
    _publish(client, [old, mixed, *fresh])

    batch = intake.next_batch(version=3)

    assert [t.id for t in batch.trajectories] == [t.id for t in fresh]
    assert [lag(t, 3) for t in batch.trajectories] == [1, 1, 0]
    assert lag(mixed, 3) == 2
    assert reporter.counters["dropped_stale"] == 2
    assert (tmp_path / "ledger" / "learner.dropped_stale").read_text().split() == [old.id, mixed.id]
    assert client.depth(Streams(RUN_ID).scored) == 3


def test_malformed_or_incomplete_messages_are_dead_lettered_with_the_reason(client, tmp_path):
    intake, reporter = _intake(
        client, tmp_path, "learner.batch_size=1", "scorer.topk=2", needs_rewards=True, needs_topk=True
    )
    no_reward = scored()
    no_topk = scored(reward=1.0, teacher_topk_ids=None, teacher_topk_logprobs=None)
    unscored = scored(reward=1.0, teacher_logprobs=None, teacher_topk_ids=None, teacher_topk_logprobs=None)
    good = scored(reward=0.0)
    _publish(client, [b"\x00garbage", no_reward, no_topk, unscored, good])

    assert [t.id for t in intake.next_batch(version=0).trajectories] == [good.id]
    reasons = [r["reason"] for r in _dead_letters(client)]
    assert reasons[0].startswith("not a msgpack message")
    assert reasons[1] == f"reward missing: learner.loss {intake.cfg.loss} needs a verifier reward"
    assert reasons[2].startswith("teacher top-k missing")
    assert "no teacher_logprobs" in reasons[3]
    assert reporter.counters["dead_lettered"] == 4 and "temperature_mismatch" not in reporter.counters


def test_no_data_for_batch_timeout_s_is_an_error_that_names_the_setting(client, tmp_path):
    intake, _ = _intake(client, tmp_path, "learner.batch_timeout_s=1")
    with pytest.raises(RuntimeError, match="learner.batch_timeout_s"):
        intake.next_batch(version=0)


def test_a_stop_returns_the_partial_batch_unacknowledged(client, tmp_path):
    intake, _ = _intake(client, tmp_path, "learner.batch_size=4")
    _publish(client, [scored()])
    calls = []

    def stop_after_two_polls():
        calls.append(1)
        if len(calls) == 2:
            intake.stop.set("test")

    batch = intake.next_batch(version=0, while_waiting=stop_after_two_polls)
    assert len(batch) == 1 and len(calls) == 2
    assert client.depth(Streams(RUN_ID).scored) == 1  # pending: a resumed learner gets it again
