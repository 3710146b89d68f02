"""Several teachers: a mixture trajectory's scored copies joined by trajectory id into one trajectory to train.

An actor stamps each trajectory with its route (`teacher_weights`: teacher -> weight, summing to 1) and sends it to
every routed teacher's pool; each pool's scorer stamps its copy with `teacher_name` and publishes it on its
teacher's own scored stream (`Streams.scored_for`), which the learner reads round-robin. A route of one teacher is trained as before. A route of several is a mixture: the learner holds
its copies until one from every teacher of the route is here (`Joiner`), then trains the combination
(`combine`) as ONE trajectory. A copy that waits is written to the join spool and acknowledged at once
(learner/spool.py: held copies counted against broker.max_depth deadlock pools that finish out of order); the
copy that completes a join is acknowledged after the optimiser step, as any trajectory of a batch.

The mixture, per response token t with weights w_i over the teachers i of the route:
  * the sampled-token teacher logprob (reverse_kl_pg, opd_penalty, the hybrid's sampled term) is the mixture's
    own, q_t = log sum_i w_i exp(q_t^i) (a logsumexp in float64, rounded once to the wire's float32);
  * the top-k losses (topk_forward_kl, topk_reverse_kl, gkd_jsd, hybrid top-k terms) use the weighted sum of the
    per-teacher divergences, sum_i w_i D(teacher_i, student), each over that teacher's own top-k + tail. The
    teachers score in parallel without seeing each other's top-k, so the mixture's probabilities over the union
    of their ids are unknown (teacher j's mass on teacher i's top-k ids is only known inside j's tail), and a
    mixture over guessed buckets would be biased. What the sum equals: for forward KL its student gradient is
    exactly that of KL(mixture || student), because the cross-entropy -sum_v p(v) log s(v) is linear in the
    teacher's probabilities (the two differ by the constant mixture-vs-teachers entropy gap); for reverse KL,
    sum_i w_i KL(s || p_i) = KL(s || G) - log Z with G = prod_i p_i^w_i / Z the normalised geometric mixture,
    so it is the reverse KL to G up to a constant (G is mode-seeking too: it puts mass where all teachers agree).
    `combine` keeps each teacher's top-k and tail apart in the joined message (`mixture_topk_*`, one slab per
    teacher in sorted(teacher_weights) order); learner/batching.py and learner/losses.py weigh them.

The joined trajectory is one protocol message (`opd.protocol.encode` of `combine`'s result). That message, not
the copies, is what a step's replay log keeps and what learner rank 0 sends the other ranks, so replay and the
ranks decode and train it exactly as they do a single-teacher one. A crash before the step leaves the waiting
copies in the spool and the completing one pending in the broker; the next incarnation reads the spool back and
joins them again, and `combine` is a function of the set of copies alone (sorted by teacher name, never by arrival
order), so it makes the same trajectory. The join timeout counts from the first copy's arrival at this
incarnation (or its reading back from the spool).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from opd.protocol import MAX_TEACHER_ID_LEN, Trajectory

JOIN_TIMEOUT_POLICIES = ("train_present", "dead_letter")
# a broker entry: (stream, message id). Each teacher's copies come on its own scored stream, and a broker's message
# ids are unique only within one stream (the zmq broker counts from 1 in each), so an entry needs both.
Entry = tuple[str, str]


@dataclass(frozen=True)
class Copy:
    """One teacher's scored copy as it arrived: its broker entry, raw bytes and decoded trajectory."""

    message_id: Entry  # opaque here: the join only keys on it
    payload: bytes
    trajectory: Trajectory
    # in the join spool (learner/spool.py) and acknowledged: the broker has forgotten it, so it is never
    # acknowledged again, and its entry (perhaps an earlier incarnation's) is not this broker's to match
    spooled: bool = False


@dataclass
class Held:
    """A mixture's copies so far, keyed by teacher, and when the first one arrived (the timeout's start)."""

    route: dict[str, float]
    first_seen: float
    copies: dict[str, Copy] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return next(iter(self.copies.values())).trajectory.id

    @property
    def missing(self) -> list[str]:
        return sorted(set(self.route) - set(self.copies))

    @property
    def message_ids(self) -> list[Entry]:
        """Every copy's broker entry, spooled ones included (for the records and the books)."""
        return [self.copies[n].message_id for n in sorted(self.copies)]

    @property
    def to_ack(self) -> list[Entry]:
        """The entries the broker still holds: those of copies not spooled."""
        return [self.copies[n].message_id for n in sorted(self.copies) if not self.copies[n].spooled]


def is_mixture(t: Trajectory) -> bool:
    return t.teacher_weights is not None and len(t.teacher_weights) > 1


def is_joined(t: Trajectory) -> bool:
    """Already joined by a learner (`combine`: no one scoring teacher, stamped `joined`): a joined trajectory
    dead-lettered at collate and re-injected by `opd dead-letter replay` is trained as it is, not joined again."""
    return is_mixture(t) and t.teacher_name is None and "joined" in t.timestamps


def joined_copies(t: Trajectory) -> int:
    """The scored copies beyond the first that `combine` joined into `t` (one per teacher present): the books'
    `joined_copies` of a step the learner re-trains from its replay log, whose copies it never saw this time."""
    return len(t.teacher_weights) - 1 if is_joined(t) else 0


def foreign_teacher(t: Trajectory) -> str | None:
    """Why a copy does not belong to its route (its teacher is not one of the route's), or None."""
    route = t.teacher_weights
    if route is None or t.teacher_name in route:
        return None
    return (
        f"scored by teacher {t.teacher_name!r}, which its route {sorted(route)} does not name: a scorer of "
        f"another pool consumed it (check the pools' rollouts streams)"
    )


def _differs(a: Trajectory, b: Trajectory) -> str | None:
    """The part of the rollout two copies of one trajectory disagree on, or None. Every copy is the same
    rollout scored by another teacher; one that differs is corrupt, and training on it would mix two rollouts."""
    for name in ("prompt_token_ids", "response_token_ids", "behaviour_logprobs", "token_versions"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return name
    if a.policy_version != b.policy_version:
        return "policy_version"
    return None


def _mixture_logprobs(qs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """log sum_i w_i exp(q_i) per token, in float64, rounded once to float32 (<= 0 by construction)."""
    stacked = np.stack([np.log(w) + q.astype(np.float64) for q, w in zip(qs, weights, strict=True)])
    return np.minimum(np.logaddexp.reduce(stacked, axis=0), 0.0).astype(np.float32)


def _same_topk(ts: list[Trajectory]) -> bool:
    first = ts[0].teacher_topk_ids
    return first is not None and all(
        t.teacher_topk_ids is not None and t.teacher_topk_ids.shape == first.shape for t in ts
    )


def combine(copies: dict[str, Trajectory], weights: dict[str, float]) -> Trajectory:
    """The one trajectory to train from `copies` (teacher -> its scored copy) under `weights` (the route).

    Weights are renormalised over the teachers present (all of them, except after a timeout with
    train_present). One teacher present: its copy as it is, its route narrowed to it, so it trains exactly as a
    single-teacher trajectory. Several: the rollout of the first copy (by name; every copy carries the same
    rollout), teacher_logprobs the mixture (module docstring), each teacher's top-k and tail on a teacher axis."""
    names = sorted(copies)
    total = math.fsum(weights[n] for n in names)
    w = {n: weights[n] / total for n in names}
    first = copies[names[0]]
    if len(names) == 1:
        return replace(first, teacher_weights={names[0]: 1.0})
    ts = [copies[n] for n in names]
    topk = _same_topk(ts)
    tails = topk and all(t.teacher_tail_logprobs is not None for t in ts)
    described = " + ".join(f"{n}: {copies[n].teacher_id or n}" for n in names)
    return replace(
        first,
        teacher_logprobs=_mixture_logprobs([t.teacher_logprobs for t in ts], list(w.values())),
        teacher_topk_ids=None,
        teacher_topk_logprobs=None,
        teacher_tail_logprobs=None,
        mixture_topk_ids=np.stack([t.teacher_topk_ids for t in ts]) if topk else None,
        mixture_topk_logprobs=np.stack([t.teacher_topk_logprobs for t in ts]) if topk else None,
        mixture_tail_logprobs=np.stack([t.teacher_tail_logprobs for t in ts]) if tails else None,
        teacher_weights=w,
        teacher_name=None,
        teacher_id=described[:MAX_TEACHER_ID_LEN],
        timestamps={**first.timestamps, "joined": time.time()},
    )


@dataclass(frozen=True)
class Offer:
    """What became of a copy offered to the join: `held` (waiting for other teachers), `complete` (every teacher
    is here: `held` holds them all, taken out of the join), `duplicate` (a second copy from the same teacher) or
    `dead-lettered` (`reason`: it contradicts the copies held)."""

    outcome: str
    held: Held | None = None
    reason: str = ""


class Joiner:
    """The mixtures being joined. Pure bookkeeping, no broker: the intake acknowledges and dead-letters."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.held: dict[str, Held] = {}  # trajectory id -> its copies so far
        self._message_ids: set[Entry] = set()

    def __len__(self) -> int:
        return len(self.held)

    def holds_message(self, message_id: Entry) -> bool:
        """The entry is held here: delivered again (a broker's redelivery), it is the same copy, not another."""
        return message_id in self._message_ids

    def offer(self, copy: Copy) -> Offer:
        """Take one copy of a mixture (whose teacher its route names: `foreign_teacher` first)."""
        t = copy.trajectory
        held = self.held.get(t.id)
        if held is None:
            held = self.held[t.id] = Held(dict(t.teacher_weights), self.clock())
        elif t.teacher_name in held.copies:
            return Offer("duplicate")
        else:
            sibling = next(iter(held.copies.values())).trajectory
            if dict(t.teacher_weights) != held.route:
                return Offer("dead-lettered", reason=self._conflict(t, sibling, "its route"))
            if (part := _differs(t, sibling)) is not None:
                return Offer("dead-lettered", reason=self._conflict(t, sibling, part))
        held.copies[t.teacher_name] = copy
        if not copy.spooled:
            self._message_ids.add(copy.message_id)
        if held.missing:
            return Offer("held")
        return Offer("complete", self._take(t.id))

    @staticmethod
    def _conflict(t: Trajectory, sibling: Trajectory, part: str) -> str:
        return (
            f"copy of trajectory {t.id} from teacher {t.teacher_name!r} differs from teacher "
            f"{sibling.teacher_name!r}'s copy in {part}: not the same rollout"
        )

    def expired(self, limit: int | None = None) -> list[Held]:
        """Up to `limit` (None: all) mixtures held for join_timeout_s since their first copy, taken out, oldest
        first."""
        now = self.clock()
        due = sorted(
            (h for h in self.held.values() if now - h.first_seen >= self.timeout_s),
            key=lambda h: h.first_seen,
        )
        return [self._take(h.id) for h in due[:limit]]

    def next_expiry_s(self) -> float | None:
        """Seconds until the oldest held mixture's join times out (0 when due); None when none is held."""
        if not self.held:
            return None
        oldest = min(h.first_seen for h in self.held.values())
        return max(0.0, oldest + self.timeout_s - self.clock())

    def spooled(self, copy: Copy) -> None:
        """`copy`, held here, is now in the join spool and acknowledged: the broker will not deliver it again."""
        self.held[copy.trajectory.id].copies[copy.trajectory.teacher_name] = replace(copy, spooled=True)
        self._message_ids.discard(copy.message_id)

    def _take(self, trajectory_id: str) -> Held:
        held = self.held.pop(trajectory_id)
        self._message_ids.difference_update(held.to_ack)
        return held

    def waiting_for(self) -> dict[str, int]:
        """Teacher -> how many held mixtures still lack its copy (the batch timeout's message)."""
        out: dict[str, int] = {}
        for h in self.held.values():
            for n in h.missing:
                out[n] = out.get(n, 0) + 1
        return out
