"""A scorer on Redis gives back (releases) a trajectory its teacher fails on instead of just leaving it pending:
a consumer no longer takes back entries it still holds, so without the release a single scorer would never retry
it. Through the scorer's real handling path, a remote teacher whose reply for one trajectory is always broken,
and a real redis-server."""

from __future__ import annotations

import time

from opd.protocol import Streams, decode, encode, unpack_control
from tests.integration.test_remote_teacher import _cfg, _fresh, assets, server, trajs

__all__ = ["assets", "server", "trajs"]  # fixtures, shared with the remote teacher tests


def test_a_single_scorer_retries_what_its_teacher_failed_on_then_the_broker_dead_letters_it(
    quick_models, server, trajs, redis_server
):
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer

    cfg = _cfg(
        quick_models,
        server.url,
        "broker.type=redis",
        f"broker.url={redis_server.url}",
        "broker.claim_idle_s=0.2",
        "broker.max_deliveries=2",
        "run.run_id=release-t",
    )
    bad = trajs[2]
    server.poison[tuple(bad.prompt_token_ids.tolist() + bad.response_token_ids.tolist())] = "nan"
    scorer = Scorer(cfg, 0, StopFlag())
    broker = scorer.broker
    broker.publish(scorer.rollouts, [encode(t) for t in _fresh(trajs)])
    deadline = time.monotonic() + 30
    while broker.depth(scorer.rollouts) and time.monotonic() < deadline:
        msgs = broker.consume(scorer.rollouts, Streams.SCORERS_GROUP, scorer.name, 16, 0.3)
        if msgs:
            assert scorer.handle(msgs)
    assert broker.depth(scorer.rollouts) == 0  # nothing left pending with a live scorer
    out = broker.consume(scorer.scored, "learner", "learner", 64, 0.0)
    assert sorted(decode(m.data).id for m in out) == sorted(t.id for t in trajs if t.id != bad.id)
    assert scorer.reporter.counters["score_failures"] == 2  # tried twice: max_deliveries
    [record] = [unpack_control(d) for _, d in broker.entries(scorer.reporter.dead_stream)]
    assert record["source"] == "broker/scorers" and "broker.max_deliveries=2" in record["reason"]
    assert decode(record["data"]).id == bad.id
    broker.close()
