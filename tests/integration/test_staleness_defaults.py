"""Sensible starting points: broker.max_depth follows learner.batch_size where unset, and the learner warns when
most samples arrive at learner.max_staleness (issue 15: own_models.yaml had 95% of samples trained at the limit,
and 6,048 of 70,368 dropped, without a word)."""

from __future__ import annotations

import logging

from learner import intake as intake_module
from opd.config import load_config
from tests.integration.test_learner_intake import _intake, _publish, client, scored  # noqa: F401 (fixture)

OWN_MODELS = "configs/own_models.yaml"


def test_the_queue_depth_follows_the_batch_size_unless_set():
    assert load_config(None, ["learner.batch_size=64"]).broker.max_depth == 64
    assert load_config(None, ["learner.batch_size=8", "broker.type=redis"]).broker.max_depth == 8
    assert load_config(None, ["learner.batch_size=8", "broker.max_depth=100"]).broker.max_depth == 100
    # the shipped config for one's own models: queues no deeper than the learner's batch
    cfg = load_config(OWN_MODELS, [])
    assert cfg.broker.max_depth <= cfg.learner.batch_size


def test_most_samples_at_the_staleness_limit_are_warned_about(client, tmp_path, caplog, monkeypatch):  # noqa: F811
    """Trained at exactly learner.max_staleness (none dropped): the queues are too deep for the learner."""
    monkeypatch.setattr(intake_module, "STALE_WINDOW", 8)
    intake, _ = _intake(client, tmp_path, "learner.batch_size=8", "learner.max_staleness=2")
    _publish(
        client, [scored(policy_version=3) for _ in range(6)] + [scored(policy_version=5) for _ in range(2)]
    )
    with caplog.at_level(logging.WARNING, logger="opd"):
        batch = intake.next_batch(version=5)
    assert len(batch) == 8  # all trainable: lag 2 is allowed
    warned = [r.getMessage() for r in caplog.records if "hit learner.max_staleness" in r.getMessage()]
    assert warned and "6 trained at that lag" in warned[0] and "broker.max_depth" in warned[0], caplog.text


def test_fresh_samples_are_not_warned_about(client, tmp_path, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setattr(intake_module, "STALE_WINDOW", 8)
    intake, _ = _intake(client, tmp_path, "learner.batch_size=8", "learner.max_staleness=2")
    _publish(client, [scored(policy_version=4) for _ in range(8)])
    with caplog.at_level(logging.WARNING, logger="opd"):
        assert len(intake.next_batch(version=5)) == 8
    assert not [r for r in caplog.records if "max_staleness" in r.getMessage()], caplog.text
