"""The join of a mixture's scored copies (learner/join.py) and the joined message on the wire: complete, duplicate,
foreign teacher, a copy that contradicts its siblings, the timeout, and a combination that depends on the set of
copies alone (so a restarted learner re-joins the same trajectory)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from learner.join import Copy, Joiner, combine, foreign_teacher, is_mixture, joined_copies
from opd.protocol import ProtocolError, decode, encode
from tests.unit.test_protocol import VOCAB, make

ROUTE = {"alpha": 0.25, "beta": 0.75}


def copies_of(route=ROUTE, **kw):
    """One rollout scored by each teacher of `route`: each its own q, top-k and tail."""
    base = make(teacher_weights=dict(route), behaviour_temperature=1.0, teacher_temperature=1.0, **kw)
    out = {}
    for j, name in enumerate(sorted(route)):
        rng = np.random.default_rng(j)
        lp = np.log(rng.dirichlet(np.ones(VOCAB), size=3)).astype(np.float32)
        top = np.argsort(-lp, -1)[:, :2].astype(np.int32)
        top_lp = np.take_along_axis(lp, top, -1)
        tail = np.log1p(-np.exp(top_lp).sum(-1)).astype(np.float32)
        q = lp[np.arange(3), base.response_token_ids]
        out[name] = replace(
            base,
            teacher_name=name,
            teacher_id=f"models/{name}",
            teacher_logprobs=q,
            teacher_topk_ids=top,
            teacher_topk_logprobs=top_lp,
            teacher_tail_logprobs=tail,
        )
    return out


def test_a_mixture_joins_into_one_wire_message_of_the_mixture():
    scored = copies_of()
    joined = decode(encode(combine(scored, ROUTE)), vocab_size=VOCAB, require_scored=True)
    a, b = scored["alpha"], scored["beta"]
    want = [
        math.log(0.25 * math.exp(float(x)) + 0.75 * math.exp(float(y)))
        for x, y in zip(a.teacher_logprobs, b.teacher_logprobs, strict=True)
    ]
    np.testing.assert_allclose(joined.teacher_logprobs, want, rtol=1e-7)
    np.testing.assert_array_equal(joined.mixture_topk_ids, np.stack([a.teacher_topk_ids, b.teacher_topk_ids]))
    np.testing.assert_array_equal(joined.mixture_tail_logprobs[1], b.teacher_tail_logprobs)
    assert joined.teacher_topk_ids is None and joined.teacher_name is None
    assert joined.teacher_weights == ROUTE and joined.id == a.id
    assert joined.teacher_id == "alpha: models/alpha + beta: models/beta"
    np.testing.assert_array_equal(joined.response_token_ids, a.response_token_ids)


def test_the_join_depends_on_the_copies_not_their_order():
    scored = copies_of({"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    forward = combine(scored, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    backward = combine(dict(reversed(scored.items())), {"gamma": 0.5, "beta": 0.3, "alpha": 0.2})
    for name in ("teacher_logprobs", "mixture_topk_ids", "mixture_topk_logprobs", "mixture_tail_logprobs"):
        np.testing.assert_array_equal(getattr(forward, name), getattr(backward, name))
    assert forward.teacher_weights == backward.teacher_weights


def test_teachers_present_are_renormalised_and_one_present_is_a_single_teacher_trajectory():
    scored = copies_of({"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    two = combine({n: scored[n] for n in ("alpha", "gamma")}, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    assert two.teacher_weights == pytest.approx({"alpha": 0.2 / 0.7, "gamma": 0.5 / 0.7})
    one = combine({"beta": scored["beta"]}, {"alpha": 0.2, "beta": 0.3, "gamma": 0.5})
    assert one.teacher_weights == {"beta": 1.0} and not is_mixture(one)
    np.testing.assert_array_equal(one.teacher_topk_ids, scored["beta"].teacher_topk_ids)
    np.testing.assert_array_equal(one.teacher_logprobs, scored["beta"].teacher_logprobs)


def test_a_copy_from_a_teacher_outside_its_route_is_named_with_the_route():
    reason = foreign_teacher(replace(copies_of()["alpha"], teacher_name="gamma"))
    assert "'gamma'" in reason and "['alpha', 'beta']" in reason
    assert foreign_teacher(copies_of()["alpha"]) is None
    assert foreign_teacher(make()) is None  # no route: the run's one teacher


def _joiner():
    now = [0.0]
    return Joiner(10.0, clock=lambda: now[0]), now


def test_the_join_holds_until_every_teacher_and_skips_a_second_copy_from_one():
    joiner, _ = _joiner()
    scored = copies_of()
    assert joiner.offer(Copy("1-0", b"a", scored["alpha"])).outcome == "held"
    assert joiner.holds_message("1-0") and joiner.waiting_for() == {"beta": 1}
    assert joiner.offer(Copy("2-0", b"a2", scored["alpha"])).outcome == "duplicate"
    done = joiner.offer(Copy("3-0", b"b", scored["beta"]))
    assert done.outcome == "complete" and done.held.message_ids == ["1-0", "3-0"]
    assert len(joiner) == 0 and not joiner.holds_message("1-0")


def test_a_copy_of_another_rollout_or_route_under_the_same_id_is_refused():
    joiner, _ = _joiner()
    scored = copies_of()
    joiner.offer(Copy("1-0", b"a", scored["alpha"]))
    other = replace(scored["beta"], response_token_ids=np.array([7, 8, 3], dtype=np.int32))
    refused = joiner.offer(Copy("2-0", b"b", other))
    assert refused.outcome == "dead-lettered" and "response_token_ids" in refused.reason
    rerouted = replace(scored["beta"], teacher_weights={"alpha": 0.5, "beta": 0.5})
    assert "its route" in joiner.offer(Copy("3-0", b"b", rerouted)).reason
    assert joiner.waiting_for() == {"beta": 1}  # still held, waiting for a good copy


def test_joins_expire_after_the_timeout_from_the_first_copy_oldest_first_up_to_the_limit():
    joiner, now = _joiner()
    first, second = copies_of(), copies_of()
    joiner.offer(Copy("1-0", b"", first["alpha"]))
    now[0] = 4.0
    joiner.offer(Copy("2-0", b"", second["beta"]))
    joiner.offer(Copy("3-0", b"", first["alpha"]))  # a duplicate does not restart the clock
    now[0] = 9.9
    assert joiner.expired() == []
    now[0] = 14.0
    assert [h.id for h in joiner.expired(limit=5)] == [first["alpha"].id, second["beta"].id]
    assert len(joiner) == 0


def test_the_expiry_limit_leaves_the_rest_held():
    joiner, now = _joiner()
    a, b = copies_of(), copies_of()
    joiner.offer(Copy("1-0", b"", a["alpha"]))
    joiner.offer(Copy("2-0", b"", b["alpha"]))
    now[0] = 11.0
    assert [h.id for h in joiner.expired(limit=1)] == [a["alpha"].id]
    assert [h.missing for h in joiner.held.values()] == [["beta"]]


BAD_MIXTURES = {
    "no route": (lambda t: replace(t, teacher_weights=None), "teacher_weights"),
    "route of one": (lambda t: replace(t, teacher_weights={"alpha": 1.0}), "2 or more"),
    "ids alone": (lambda t: replace(t, mixture_topk_logprobs=None), "must come together"),
    "teacher count": (lambda t: replace(t, mixture_topk_ids=t.mixture_topk_ids[:1]), "do not match"),
    "tail shape": (lambda t: replace(t, mixture_tail_logprobs=t.mixture_tail_logprobs[:, :2]), "tail"),
    "beside a single top-k": (
        lambda t: replace(
            t, teacher_topk_ids=t.mixture_topk_ids[0], teacher_topk_logprobs=t.mixture_topk_logprobs[0]
        ),
        "not teacher_topk",
    ),
    "outside the vocabulary": (
        lambda t: replace(t, mixture_topk_ids=t.mixture_topk_ids + VOCAB),
        "vocabulary",
    ),
    "positive": (lambda t: replace(t, mixture_topk_logprobs=-t.mixture_topk_logprobs + 1), "positive"),
}


@pytest.mark.parametrize("name", BAD_MIXTURES)
def test_a_malformed_joined_message_is_refused_with_the_reason(name):
    spoil, reason = BAD_MIXTURES[name]
    joined = combine(copies_of(), ROUTE)
    with pytest.raises(ProtocolError, match=reason):
        decode(encode(spoil(joined)), vocab_size=VOCAB)


def test_a_joined_message_says_how_many_copies_it_joined():
    """What a replayed step adds to the books' joined_copies (the learner re-trains it without its copies)."""
    three = {"alpha": 0.2, "beta": 0.3, "gamma": 0.5}
    assert joined_copies(combine(copies_of(three), three)) == 2
    assert joined_copies(combine({n: c for n, c in copies_of(three).items() if n != "beta"}, three)) == 1
    assert joined_copies(combine({"beta": copies_of(three)["beta"]}, three)) == 0
    assert joined_copies(copies_of()["alpha"]) == 0  # a copy, not joined
