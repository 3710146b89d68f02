"""A scorer of one teacher's pool (teacher_scorers/scorer.py Scorer(cfg, i, stop, teacher=NAME)) through its real
handling path, a real tiny teacher and a real zmq broker process: it consumes its teacher's own rollouts stream,
scores what is routed to it (a mixture included), stamps its name on the copy and publishes it on its teacher's own
scored stream, and dead-letters a rollout routed
elsewhere or not routed at all, with the reason; the other teacher's stream is left alone."""

from __future__ import annotations

import numpy as np

from opd.config import load_config
from opd.protocol import Streams, Trajectory, decode, encode, unpack_control


def _rollout(weights: dict[str, float] | None) -> Trajectory:
    return Trajectory(
        run_id="pools", prompt_id="p", group_id="g", sample_index=0,
        prompt_token_ids=np.array([1, 2, 3], np.int32), response_token_ids=np.array([4, 5], np.int32),
        behaviour_logprobs=np.array([-1.0, -1.0], np.float32), policy_version=0, behaviour_temperature=1.0,
        task={"answer": "1", "task": "addition"}, teacher_weights=weights,
    )  # fmt: skip


def test_a_pools_scorer_scores_its_routes_and_dead_letters_the_rest(quick_models, zmq_broker):
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer

    cache = quick_models[0]  # run.cache_dir=...: both teachers are the quick teacher, built already
    cfg = load_config(
        None,
        [
            cache, "student.sft_steps=0", "run.run_id=pools", "broker.type=zmq",
            f"broker.port={zmq_broker.rsplit(':', 1)[1]}",
            "teachers={adder: {model: {sft_steps: 0}}, speller: {model: {sft_steps: 0}, scorer: {batch_size: 8}}}",
            "routing.default=adder",
        ],
    )  # fmt: skip
    scorer = Scorer(cfg, 1, StopFlag(), teacher="speller")
    assert scorer.name == "scorer-speller-1" and scorer.cfg.scorer.batch_size == 8  # the pool's own settings
    streams, broker = Streams("pools"), scorer.broker
    assert scorer.rollouts == streams.rollouts_for("speller")
    assert scorer.scored == streams.scored_for("speller") == "pools:scored:speller"  # its teacher's own
    mine, mixed = _rollout({"speller": 1.0}), _rollout({"adder": 0.25, "speller": 0.75})
    theirs, unrouted = _rollout({"adder": 1.0}), _rollout(None)
    broker.publish(scorer.rollouts, [encode(t) for t in (mine, theirs, mixed, unrouted)])
    broker.publish(streams.rollouts_for("adder"), [encode(_rollout({"adder": 1.0}))])
    msgs = broker.consume(scorer.rollouts, Streams.SCORERS_GROUP, scorer.name, 8, 1.0)
    assert len(msgs) == 4 and scorer.handle(msgs)
    scored = [
        decode(m.data, require_scored=True)
        for m in broker.consume(streams.scored_for("speller"), "learner", "l", 8, 1.0)
    ]
    assert broker.depth(streams.scored) == 0 and broker.depth(streams.scored_for("adder")) == 0
    assert sorted(t.id for t in scored) == sorted([mine.id, mixed.id])
    assert {t.teacher_name for t in scored} == {"speller"} and mixed.id in {t.id for t in scored}
    assert broker.depth(scorer.rollouts) == 0 and broker.depth(streams.rollouts_for("adder")) == 1
    dead = {}
    for m in broker.consume(streams.dead_letter, "t", "t", 8, 1.0):
        record = unpack_control(m.data)
        dead[record["trajectory_id"]] = record["reason"]
    assert set(dead) == {theirs.id, unrouted.id}
    assert "routed to ['adder'], not to teacher 'speller'" in dead[theirs.id]
    assert "has no route (teacher_weights) but this run has several teachers" in dead[unrouted.id]
    broker.close()
