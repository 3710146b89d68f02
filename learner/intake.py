"""Intake: what turns the scored streams into a batch the learner may train on.

One scored stream per teacher (`Streams.scored_for`: just `scored` without a teachers section), read round-robin
under the learner group; every message is acknowledged (or dead-lettered) on the stream it came from, so a batch
keeps its broker entries as (stream, message id) (`learner.join.Entry`: ids are unique only within one stream).
Why one stream per teacher: the learner reads each in turn, so one pool's backlog never waits behind another's,
and each pool's depth and backpressure are its own.

A message is decoded and validated (`opd.protocol.decode`, then this learner's contract: temperatures, rewards,
top-k), deduplicated by trajectory id, and judged by its lag; a bad one is dead-lettered with its reason, a
duplicate skipped, a too-stale one dropped (and written to `ledger/learner.dropped_stale`). Each of those is
accounted for, so it is acknowledged at once: left pending it would count as in flight and keep paused actors
waiting forever. A trajectory taken into the batch is acknowledged only after the optimiser step
(`IntakeBatch.message_ids`), so a crash before the step leaves it in the broker.

Trained exactly once, whatever the broker delivers: a trajectory id is settled once it is in the batch being
assembled, trained (the ledger, across resumes) or dropped as stale (its ledger, across resumes); any other copy
of it (a scorer that re-scored after a restart, or published late after a pause) is a duplicate. The same entry
delivered again (same message id) is not a copy: one held in the batch is acknowledged after the step, one
already settled is acknowledged again, and neither is counted. So the counters count distinct things:
`dropped_stale` trajectory ids, `duplicates_skipped` duplicate copies (messages), `dead_lettered` messages, and
every scored message consumed is exactly one of trained, dead-lettered, a duplicate or dropped as stale.

Several teachers (learner/join.py): a copy whose route names one teacher passes as above, once its teacher_name
is checked against the route (a copy from a teacher outside its route is dead-lettered naming both). A mixture's
copies are held until every teacher of the route has sent one, each written to the join spool and acknowledged
at once (learner/spool.py: left pending, they count against broker.max_depth and deadlock pools that finish out
of order), and read back by a resumed learner; the joined trajectory then counts
as ONE message of the books above (trained, dead-lettered at collate, or dropped as stale: lag by its oldest
token, judged when joined) and its other copies as `joined_copies`; its completing copy is acknowledged as a
batch's are, and the spool marks the trajectory settled. A second copy
from one teacher is a duplicate. After `routing.join_timeout_s` from the first copy: train_present trains the
teachers present, weights renormalised (`partial_joins`); dead_letter sends every held copy to the dead letters
with the missing teachers named, counts the trajectory once as dead-lettered (the other copies as joined copies)
and records its id in `ledger/learner.join_dead_lettered`, so a late copy is a duplicate, across resumes too.
So: messages consumed = trained + dead_lettered + duplicates_skipped + dropped_stale + joined_copies (+ copies
still held), and each trajectory id ends as exactly one of trained, dead-lettered or dropped as stale (a copy
refused on its own, a foreign or contradicting one, is a dead-lettered message beside its trajectory's outcome).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from broker import Broker
from learner.join import Copy, Entry, Held, Joiner, combine, foreign_teacher, is_joined, is_mixture
from learner.losses import teacher_term
from learner.spool import SPOOL_FILE, JoinSpool
from opd.config import Config, LearnerConfig
from opd.config.teachers import RoutingConfig
from opd.protocol import (
    DEFAULT_TEACHER,
    ProtocolError,
    Streams,
    Trajectory,
    dead_letter_record,
    decode,
    encode,
)
from opd.runtime.lifecycle import REPLAYABLE_BYTES, Reporter, log

TEMPERATURE_TOLERANCE = 1e-6
UNUSABLE = ("too stale", "duplicate", "dead-lettered")  # what a message that is not trained can be
STALE_WINDOW = 256  # recent scored messages judged for the too-stale and at-the-limit warnings
STALE_WARN_SHARE = 0.5  # warn when at least this share of them was too stale (or at the staleness limit)
STALE_WARN_EVERY_S = 60.0
POLL_S, MIN_POLL_S = 1.0, 0.01  # the longest and shortest wait of one poll of the scored stream(s)
SWEEP_POLL_S = 0.1  # several scored streams: the wait on one after a sweep of all found nothing (each read
# of a Redis work stream also scans for idle entries to reclaim: a shorter wait would mostly add broker load)
JOIN_LEDGER = (
    "learner.join_dead_lettered"  # beside the stale ledger: mixtures dead-lettered at their join timeout
)
_B = TypeVar("_B")  # what the learner's collate makes of a batch (learner.batching.Batch)


class TemperatureMismatch(ProtocolError):
    """A trajectory's stamped temperature is not the one this learner is configured with (counted apart)."""


def _timeout_message(timeout_s: float, unusable: dict[str, int], waiting_for: dict[str, int]) -> str:
    """Why the learner gives up waiting, with what arrived meanwhile and its usual cause."""
    held = (
        f"; {sum(waiting_for.values())} mixture copies held waiting for teacher(s) "
        + ", ".join(f"{n} ({k} trajectories)" for n, k in sorted(waiting_for.items()))
        + ": are those pools running (their scorers, and actors routing to them)?"
        if waiting_for
        else ""
    )
    if not any(unusable.values()):
        return f"no scored trajectories for {timeout_s:.0f}s (learner.batch_timeout_s){held}"
    got = ", ".join(f"{n} {kind}" for kind, n in unusable.items() if n)
    hint = " (too stale: actors are not receiving weights?)" if unusable["too stale"] else ""
    return f"no usable scored trajectory for {timeout_s:.0f}s (learner.batch_timeout_s): received {got}{hint}{held}"


def _read_ledger(path: Path) -> set[str]:
    return set(path.read_text().split()) if path.exists() else set()


def lag(t: Trajectory, version: int) -> int:
    """Versions between the learner's `version` and the oldest weights that produced any token of t: what
    `max_staleness` judges. A streaming actor's trajectory may mix versions (`token_versions`, non-decreasing from
    policy_version, checked by the protocol); its oldest token decides, however fresh the rest."""
    oldest = (
        int(t.token_versions.min())
        if t.token_versions is not None and len(t.token_versions)
        else t.policy_version
    )
    return version - min(oldest, t.policy_version)


def token_lags(t: Trajectory, version: int) -> np.ndarray:
    """Each response token's lag, int64 (T,): the learner's `version` minus the version that sampled the token
    (`token_versions`; policy_version for every token of a trajectory without them). The step's lag metrics
    count these, so a sequence that crossed weight updates counts each of its tokens at its own lag."""
    if t.token_versions is None:
        return np.full(len(t.response_token_ids), version - t.policy_version, dtype=np.int64)
    return version - t.token_versions.astype(np.int64)


def _check_temperature(name: str, stamped: float | None, setting: str, configured: float, who: str) -> None:
    if stamped is None:
        raise TemperatureMismatch(
            f"{name} missing but {setting} {configured}: {who} must state its temperature"
        )
    if abs(stamped - configured) > TEMPERATURE_TOLERANCE:
        raise TemperatureMismatch(
            f"{name} {stamped} but {setting} {configured}: {who} ran with another config"
        )


@dataclass(frozen=True)
class Contract:
    """What a scored trajectory must carry for this learner, each part named after the setting it comes from.

    Temperatures are checked, not taken from the message. The learner recomputes the student's logprobs s_t at one
    temperature (`sampling.temperature`) for the whole batch and re-tempers its top-k at `scorer.temperature`. A
    stamp that differs means an actor or scorer runs with another config: trained at the configured temperature,
    s and b (or the student and the teacher) would be taken at different temperatures, silently biasing the ratio
    exp(s - b) and the divergence for part of the batch; trained at the stamped one (per-row temperatures in the
    objective), it would pull toward another target than the run's and hide the misconfiguration. So it is
    dead-lettered with both values and the setting to fix, and counted (`temperature_mismatch`).
    """

    vocab_size: int
    max_bytes: int
    sampling_temperature: float
    scorer_temperature: float
    reward_needed_by: str | None = None  # the loss that needs a verifier reward, if any
    topk_needed_by: str | None = None  # the loss that needs the teacher's top-k, if any
    topk: int = 0  # scorer.topk: the width every top-k must have when the loss needs it
    # a trajectory's images: why they cannot be used, or None (opd.models.vision.image_checker); None: no check
    image_check: Callable[[Trajectory], str | None] | None = None

    @classmethod
    def of(
        cls,
        cfg: Config,
        vocab_size: int,
        needs_rewards: bool,
        needs_topk: bool,
        image_check: Callable[[Trajectory], str | None] | None = None,
    ) -> Contract:
        return cls(
            image_check=image_check,
            vocab_size=vocab_size,
            max_bytes=int(cfg.broker.max_message_mb * (1 << 20)),
            sampling_temperature=cfg.sampling.temperature,
            scorer_temperature=cfg.scorer.temperature,
            reward_needed_by=cfg.learner.loss if needs_rewards else None,
            topk_needed_by=teacher_term(cfg.learner.loss, cfg.learner.hybrid.distill).name
            if needs_topk
            else None,
            topk=cfg.scorer.topk,
        )

    def check(self, data: bytes) -> Trajectory:
        """The trajectory in `data`, or ProtocolError (TemperatureMismatch for a temperature) with the reason."""
        t = decode(data, vocab_size=self.vocab_size, require_scored=True, max_bytes=self.max_bytes)
        _check_temperature(
            "behaviour_temperature",
            t.behaviour_temperature,
            "sampling.temperature",
            self.sampling_temperature,
            "an actor",
        )
        _check_temperature(
            "teacher_temperature",
            t.teacher_temperature,
            "scorer.temperature",
            self.scorer_temperature,
            "a scorer",
        )
        if (why := self.image_check(t) if self.image_check else None) is not None:
            raise ProtocolError(why)  # a bad image, or image ids that do not match the images
        if self.reward_needed_by and t.reward is None:
            raise ProtocolError(
                f"reward missing: learner.loss {self.reward_needed_by} needs a verifier reward"
            )
        # a joined mixture (a dead letter replayed) carries its teachers' top-k on a teacher axis
        topk = t.teacher_topk_ids if t.mixture_topk_ids is None else t.mixture_topk_ids[0]
        if self.topk_needed_by and topk is None:
            raise ProtocolError(
                f"teacher top-k missing: learner.loss {self.topk_needed_by} needs scorer.topk > 0"
            )
        if self.topk_needed_by and topk.shape[1] != self.topk_width:
            # one batch's top-k are stacked into one (B, T, k) tensor: another width cannot be collated
            raise ProtocolError(
                f"teacher top-k width {topk.shape[1]} but scorer.topk {self.topk} "
                f"(width {self.topk_width} with this vocabulary): a scorer ran with another config"
            )
        return t

    @property
    def topk_width(self) -> int:
        """The width a scorer attaches: scorer.topk, capped by the vocabulary (the backends take min(k, V))."""
        return min(self.topk, self.vocab_size)


@dataclass
class IntakeBatch:
    """Trajectories taken for one step, their broker ids (acknowledged after the step) and raw payloads (the
    replay log keeps these, so a resume re-trains exactly what was trained).

    A joined mixture is one entry: one trajectory and one payload (the joined message, learner/join.py) over the
    broker entries of all its copies (`copies`: for the records and the books), of which only those not in the
    join spool are still the broker's to acknowledge (`acks`); `partial` marks one joined after its timeout
    without every teacher."""

    trajectories: list[Trajectory] = field(default_factory=list)
    copies: list[tuple[Entry, ...]] = field(default_factory=list)  # per entry: every copy's broker entry
    acks: list[tuple[Entry, ...]] = field(
        default_factory=list
    )  # per entry: those still pending in the broker
    payloads: list[bytes] = field(default_factory=list)
    partial: list[bool] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set)  # trajectory ids
    _message_ids: set[Entry] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def message_ids(self) -> list[Entry]:
        """Every broker entry the batch holds pending, (stream, message id): acknowledged after the step."""
        return [m for ids in self.acks for m in ids]

    @property
    def joined_copies(self) -> int:
        """Copies beyond the first of each entry (a mixture's other teachers)."""
        return sum(len(c) for c in self.copies) - len(self.copies)

    def add(
        self,
        t: Trajectory,
        copies: tuple[Entry, ...],
        payload: bytes,
        partial=False,
        acks: tuple[Entry, ...] | None = None,
    ) -> None:
        self.trajectories.append(t)
        self.copies.append(tuple(copies))
        self.acks.append(tuple(copies if acks is None else acks))
        self.payloads.append(payload)
        self.partial.append(partial)
        self._ids.add(t.id)
        self._message_ids.update(self.acks[-1])

    def holds(self, trajectory_id: str) -> bool:
        return trajectory_id in self._ids

    def holds_message(self, message_id: Entry) -> bool:
        return message_id in self._message_ids

    def drop(
        self, positions: Container[int]
    ) -> list[tuple[Trajectory, tuple[Entry, ...], tuple[Entry, ...], bytes]]:
        """Remove the entries at `positions`; return them (trajectory, copies, acks, payload)."""
        rows = list(zip(self.trajectories, self.copies, self.acks, self.payloads, self.partial, strict=True))
        gone = [r[:4] for i, r in enumerate(rows) if i in positions]
        kept = [r for i, r in enumerate(rows) if i not in positions]
        self.trajectories = [r[0] for r in kept]
        self.copies = [r[1] for r in kept]
        self.acks = [r[2] for r in kept]
        self.payloads = [r[3] for r in kept]
        self.partial = [r[4] for r in kept]
        self._ids = {t.id for t in self.trajectories}
        self._message_ids = set(self.message_ids)
        return gone


def _collate_error(collate: Callable[[list[Trajectory]], object], trajs: list[Trajectory]) -> str | None:
    try:
        collate(trajs)
        return None
    except Exception as exc:  # whatever collate raises is the reason these trajectories cannot be trained
        return f"learner could not collate it: {type(exc).__name__}: {exc}"


def _greedy(
    collate: Callable[[list[Trajectory]], object], trajs: list[Trajectory], order: list[int]
) -> tuple[list[int], dict[int, str]]:
    """Positions kept (each added while the kept ones still collate with it) and the others with the reason."""
    kept: list[int] = []
    dropped: dict[int, str] = {}
    for i in order:
        reason = _collate_error(collate, [*(trajs[j] for j in kept), trajs[i]])
        if reason is None:
            kept.append(i)
        else:
            dropped[i] = reason
    return kept, dropped


class Intake:
    """Consumes the scored streams for the learner; see the module docstring for what happens to each message.
    `teachers`: the run's pools (`Config.teacher_pools()`), one scored stream each."""

    def __init__(
        self,
        broker: Broker,
        reporter: Reporter,
        streams: Streams,
        contract: Contract,
        cfg: LearnerConfig,
        trained: Container[str],
        stale_ledger: Path,
        stop: Callable[[], bool],
        routing: RoutingConfig | None = None,
        teachers: list[str] | None = None,
    ):
        self.broker, self.reporter, self.contract, self.cfg = broker, reporter, contract, cfg
        self.streams = [streams.scored_for(n) for n in teachers or [DEFAULT_TEACHER]]
        self._turn = 0  # which scored stream a sweep starts at: each goes first in turn
        self.trained, self.stale_ledger, self.stop = trained, stale_ledger, stop
        stale_ledger.parent.mkdir(parents=True, exist_ok=True)
        # ids dropped as stale: the ledger (a resumed run's included) is the record, so the count is its size
        self.dropped_stale: set[str] = _read_ledger(stale_ledger)
        if self.dropped_stale:
            reporter.counters["dropped_stale"] = len(self.dropped_stale)
        routing = routing or RoutingConfig()
        self.joiner, self.on_join_timeout = Joiner(routing.join_timeout_s), routing.on_join_timeout
        # mixtures dead-lettered after their join timed out (a resumed run's included): a late copy is a duplicate
        self.join_ledger = stale_ledger.parent / JOIN_LEDGER
        self.dead_joins: set[str] = _read_ledger(self.join_ledger)
        # copies held for a join, on disk and acknowledged; read back by the first next_batch (after a resume's
        # replay, so that the trajectories it re-trained are known as trained)
        self.spool = JoinSpool(stale_ledger.parent / SPOOL_FILE)
        self._spool_read = False
        self._settled_copies: set[Entry] = set()  # entries acknowledged as a duplicate or as stale
        # per recent message: "too stale" (dropped), "at limit" (trained at lag max_staleness) or None (neither)
        self._recent: deque[str | None] = deque(maxlen=STALE_WINDOW)
        self._at_limit = False  # set by _admit: the trajectory it just added was at lag max_staleness
        self._stale_warned = -STALE_WARN_EVERY_S

    def next_batch(self, version: int, while_waiting: Callable[[], None] = lambda: None) -> IntakeBatch:
        """Block until learner.batch_size trajectories fit to train at weight `version` (or a stop: then the batch
        may be partial). `while_waiting` runs before each poll (the weight publisher's catch-up).

        learner.batch_timeout_s counts time without a *usable* trajectory: messages that are all too stale,
        duplicates or dead letters keep a stuck run just as stuck (actors that never receive weights produce
        nothing but stale samples), so they do not reset the clock, and the error says what did arrive. A copy
        held for a mixture's join is not usable until the join completes (or times out under train_present)."""
        want, batch = self.cfg.batch_size, IntakeBatch()
        self._last_usable, self._unusable = time.monotonic(), dict.fromkeys(UNUSABLE, 0)
        if not self._spool_read:
            self._spool_read = True
            self._read_spool(version, batch)
        while len(batch) < want and not self.stop():
            while_waiting()
            if time.monotonic() - self._last_usable > self.cfg.batch_timeout_s:
                raise RuntimeError(
                    _timeout_message(self.cfg.batch_timeout_s, self._unusable, self.joiner.waiting_for())
                )
            # dead-lettered, duplicate or too stale: accounted for, so acknowledged now
            settled: list[Entry] = []
            for outcome in self._expire(version, batch, settled):
                self._note(outcome)
            self._poll(version, want, batch, settled)
            self.spool.sync()  # the copies held for a join are on disk before the broker forgets them
            self._ack(settled)
            self._warn_if_mostly_stale()
        return batch

    def _poll(self, version: int, want: int, batch: IntakeBatch, settled: list[Entry]) -> None:
        """One round over the scored streams, each first in turn. One stream: a blocking read, as before
        teachers. Several: a read without waiting on each (a stream that has entries never waits behind an
        empty one), then, if none had any, a short blocking read on the one whose turn it is."""
        order = self.streams[self._turn :] + self.streams[: self._turn]
        self._turn = (self._turn + 1) % len(self.streams)
        if len(order) == 1:
            self._read(order[0], version, want, batch, settled, self._poll_s())
            return
        got = False
        for stream in order:
            got = self._read(stream, version, want, batch, settled, 0.0) or got
        if not got:
            self._read(order[0], version, want, batch, settled, min(self._poll_s(), SWEEP_POLL_S))

    def _read(
        self, stream: str, version: int, want: int, batch: IntakeBatch, settled: list[Entry], wait_s: float
    ) -> bool:
        """Consume up to the batch's room from `stream` and take each message; whether any came."""
        room = want - len(batch)  # joins that timed out, or another stream's messages, may have filled it
        if not room:
            return False
        msgs = self.broker.consume(stream, Streams.LEARNER_GROUP, Streams.LEARNER_GROUP, room, wait_s)
        for m in msgs:
            entry = (stream, m.id)
            if batch.holds_message(entry) or self.joiner.holds_message(entry):
                continue  # the same entry again while held here: acknowledged after the step, not a copy
            if entry in self._settled_copies:
                settled.append(entry)  # an entry settled before, delivered again: acknowledged again
                self._note("duplicate")
            else:
                self._note(self._take(entry, m.data, version, batch, settled))
        return bool(msgs)

    def _ack(self, entries: list[Entry]) -> None:
        """Acknowledge `entries`, each on the stream it came from."""
        by_stream: dict[str, list[str]] = {}
        for stream, message_id in entries:
            by_stream.setdefault(stream, []).append(message_id)
        for stream, ids in by_stream.items():
            self.broker.ack(stream, Streams.LEARNER_GROUP, ids)

    def _dead_letter(self, entry: Entry, payload: bytes, reason: str) -> None:
        self.reporter.dead_letter(entry[0], entry[1], payload, reason)

    def _poll_s(self) -> float:
        """How long one poll may wait: POLL_S, or less so that a held mixture's join times out on time."""
        due = self.joiner.next_expiry_s()
        return POLL_S if due is None else min(POLL_S, max(due, MIN_POLL_S))

    def _note(self, outcome: str | None) -> None:
        """One message's (or expired join's) outcome into the batch timeout's clock and the staleness window."""
        if outcome == "held":
            return
        at_limit = outcome is None and self._at_limit
        self._recent.append("at limit" if at_limit else outcome if outcome == "too stale" else None)
        if outcome is None:
            self._last_usable, self._unusable = time.monotonic(), dict.fromkeys(UNUSABLE, 0)
        else:
            self._unusable[outcome] += 1

    def _warn_if_mostly_stale(self) -> None:
        """Warn (at most every STALE_WARN_EVERY_S) when most recent samples were dropped as too stale, or were
        trained at exactly learner.max_staleness. Dropped: the run pays for generation it throws away, and the
        usual cause is actors not receiving weights. At the limit: the queues hold more than the learner trains
        within max_staleness versions (a broker.max_depth of several learner batches), so nearly every sample
        is as off-policy as allowed, one version short of being dropped."""
        seen, now = len(self._recent), time.monotonic()
        if seen < STALE_WINDOW // 2 or now - self._stale_warned < STALE_WARN_EVERY_S:
            return
        stale, at_limit = self._recent.count("too stale"), self._recent.count("at limit")
        if stale >= STALE_WARN_SHARE * seen:
            self._stale_warned = now
            log.warning(
                "%d of the last %d scored samples were too stale to train (learner.max_staleness %d): are "
                "the actors receiving weights?",
                stale, seen, self.cfg.max_staleness,
            )  # fmt: skip
        elif self.cfg.max_staleness > 0 and stale + at_limit >= STALE_WARN_SHARE * seen:
            self._stale_warned = now
            log.warning(
                "%d of the last %d scored samples hit learner.max_staleness %d (%d trained at that lag, %d "
                "dropped past it): the queues hold more than the learner trains in %d versions; lower "
                "broker.max_depth (its default is learner.batch_size) or raise learner.max_staleness",
                stale + at_limit, seen, self.cfg.max_staleness, at_limit, stale, self.cfg.max_staleness,
            )  # fmt: skip

    def collate(self, batch: IntakeBatch, collate: Callable[[list[Trajectory]], _B]) -> _B | None:
        """`collate(batch.trajectories)`; if that raises, the message(s) it fails on are dead-lettered with the
        exception and acknowledged, and the rest collated (None when nothing is left).

        Validation should leave nothing that cannot be collated, but a check we lack must cost the messages it
        misses, not the run: a learner that crashes here crashes again on the same pending entries after every
        resume. A trajectory that cannot be collated alone is a culprit; of the rest, the larger of two greedy
        picks (in order and in reverse: each kept if the ones kept so far still collate with it) is kept, so
        one odd message first in the batch does not cost the others. Quadratic, but only on a failed batch."""
        try:
            return collate(batch.trajectories)
        except Exception as exc:
            log.warning("collate failed on a batch of %d (%s); isolating the culprit", len(batch), exc)
        culprits: dict[int, str] = {}
        for i, t in enumerate(batch.trajectories):
            if (reason := _collate_error(collate, [t])) is not None:
                culprits[i] = reason
        rest = [i for i in range(len(batch)) if i not in culprits]
        picks = [_greedy(collate, batch.trajectories, order) for order in (rest, rest[::-1])]
        _kept, dropped = max(picks, key=lambda p: len(p[0]))
        culprits.update(dropped)
        culprits = dict(sorted(culprits.items()))
        gone = batch.drop(culprits)
        for (_t, copies, _acks, payload), reason in zip(gone, culprits.values(), strict=True):
            self._dead_letter(copies[0], payload, reason)  # a joined one: once
            self._count_joined(len(copies) - 1)
        self._ack([m for g in gone for m in g[2]])
        self.spool.settle([g[0].id for g in gone])
        return collate(batch.trajectories) if len(batch) else None

    def ack(self, batch: IntakeBatch) -> None:
        """After the optimiser step (and the replay log): the broker may forget these now. A joined mixture's
        copies beyond the first count as joined copies, one joined without every teacher as a partial join."""
        self._ack(batch.message_ids)
        self._count_joined(batch.joined_copies, partial_joins=sum(batch.partial))
        self.spool.settle([t.id for t in batch.trajectories])

    def _count_joined(self, copies: int, partial_joins: int = 0) -> None:
        deltas = {"joined_copies": copies, "partial_joins": partial_joins}
        if any(deltas.values()):
            self.reporter.add(**{k: v for k, v in deltas.items() if v})

    def _take(
        self, message_id: Entry, data: bytes, version: int, batch: IntakeBatch, settled: list[Entry]
    ) -> str | None:
        """Add the message to `batch` (None), hold it for a join ("held") or account for it at once (which of
        UNUSABLE it was; its id, with any copies it settles, into `settled`)."""
        try:
            t = self.contract.check(data)
            if not is_joined(t) and (foreign := foreign_teacher(t)) is not None:
                raise ProtocolError(foreign)
        except Exception as exc:  # any failure on one message is that message's fault, never the learner's
            if isinstance(exc, TemperatureMismatch):
                self.reporter.add(temperature_mismatch=1)
            reason = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
            self._dead_letter(message_id, data, reason)
            settled.append(message_id)
            return "dead-lettered"
        if t.id in self.trained or batch.holds(t.id) or t.id in self.dropped_stale or t.id in self.dead_joins:
            return self._duplicate(message_id, settled)  # another copy of a settled trajectory: never trained
        if is_mixture(t) and not is_joined(t):
            return self._join(Copy(message_id, data, t), version, batch, settled)
        return self._admit(t, (message_id,), data, version, batch, settled)

    def _duplicate(self, message_id: Entry, settled: list[Entry]) -> str:
        self.reporter.add(duplicates_skipped=1)
        self._settled_copies.add(message_id)
        settled.append(message_id)
        return "duplicate"

    def _admit(
        self,
        t: Trajectory,
        message_ids: tuple[Entry, ...],
        payload: bytes,
        version: int,
        batch: IntakeBatch,
        settled: list[Entry],
        partial: bool = False,
        acks: tuple[Entry, ...] | None = None,
    ) -> str | None:
        """A trajectory (a joined mixture: the broker entries of all its copies, of which `acks` are still
        pending in the broker) into `batch`, or dropped as too stale: lag by its oldest token, the same for every
        copy of one rollout."""
        acks = message_ids if acks is None else acks
        if lag(t, version) > self.cfg.max_staleness:
            self.dropped_stale.add(t.id)
            self.reporter.add(dropped_stale=1)
            with open(self.stale_ledger, "a") as fh:
                fh.write(f"{t.id}\n")
            self._settled_copies.update(acks)
            settled.extend(acks)
            self._count_joined(len(message_ids) - 1)
            self.spool.settle([t.id])
            return "too stale"
        self._at_limit = lag(t, version) == self.cfg.max_staleness
        batch.add(t, message_ids, payload, partial, acks=acks)
        return None

    # -------------------------------------------------------------------------------- several teachers
    def _join(self, copy: Copy, version: int, batch: IntakeBatch, settled: list[Entry]) -> str | None:
        """One copy of a mixture into the join (learner/join.py); the joined trajectory into `batch` once every
        teacher of its route has sent its copy."""
        offer = self.joiner.offer(copy)
        if offer.outcome == "held":
            # on disk, then acknowledged with this poll's settled entries (next_batch syncs the spool first)
            stream, message_id = copy.message_id
            self.spool.add(stream, message_id, copy.trajectory.id, copy.payload)
            self.joiner.spooled(copy)
            settled.append(copy.message_id)
            return "held"
        if offer.outcome == "duplicate":
            return self._duplicate(copy.message_id, settled)
        if offer.outcome == "dead-lettered":
            self._dead_letter(copy.message_id, copy.payload, offer.reason)
            settled.append(copy.message_id)
            return "dead-lettered"
        return self._admit_joined(offer.held, version, batch, settled, partial=False)

    def _admit_joined(
        self, held: Held, version: int, batch: IntakeBatch, settled: list[Entry], partial: bool
    ) -> str | None:
        joined = combine({n: c.trajectory for n, c in held.copies.items()}, held.route)
        return self._admit(
            joined,
            tuple(held.message_ids),
            encode(joined),
            version,
            batch,
            settled,
            partial,
            tuple(held.to_ack),
        )

    def _expire(self, version: int, batch: IntakeBatch, settled: list[Entry]) -> list[str | None]:
        """Mixtures held for routing.join_timeout_s: trained on the teachers present (weights renormalised; at
        most as many as the batch has room for, the rest wait for the next batch) or dead-lettered, by
        routing.on_join_timeout. Their outcomes, as `_take`'s."""
        train = self.on_join_timeout == "train_present"
        outcomes: list[str | None] = []
        for held in self.joiner.expired(self.cfg.batch_size - len(batch) if train else None):
            what = (
                f"no copy from teacher(s) {held.missing} of its route {held.route} within "
                f"{self.joiner.timeout_s:g}s (routing.join_timeout_s); copies from {sorted(held.copies)}"
            )
            # each missing teacher's failure to deliver, for the per-teacher view (top, report, Prometheus)
            self.reporter.add(**{f"join_timeouts:{name}": 1 for name in held.missing})
            if train:
                log.warning("training mixture %s on the teachers present: %s", held.id, what)
                outcomes.append(self._admit_joined(held, version, batch, settled, partial=True))
            else:
                self._dead_letter_join(held, f"join timed out: {what}")
                settled.extend(held.to_ack)
                outcomes.append("dead-lettered")
        return outcomes

    def _dead_letter_join(self, held: Held, reason: str) -> None:
        """Every held copy onto the dead-letter stream (each replayable), the trajectory counted once as
        dead-lettered and its other copies as joined copies; its id into the join ledger, so a late copy (this
        incarnation or a resumed one) is a duplicate."""
        first, *rest = [held.copies[n] for n in sorted(held.copies)]
        self._dead_letter(first.message_id, first.payload, reason)
        for c in rest:  # the records without the counter: the trajectory is one dead letter
            record = dead_letter_record(
                self.reporter.component,
                reason,
                stream=c.message_id[0],
                message_id=c.message_id[1],
                size=len(c.payload),
                head=c.payload[:256],
                trajectory_id=held.id,
                data=c.payload if len(c.payload) <= REPLAYABLE_BYTES else None,
            )
            self.broker.publish(self.reporter.dead_stream, [record])
        self._count_joined(len(rest))
        self._record_dead_join(held.id)
        self._settled_copies.update(held.to_ack)
        self.spool.settle([held.id])

    def _record_dead_join(self, trajectory_id: str) -> None:
        """A mixture that will never be joined, into the join ledger: a late copy is a duplicate, across resumes."""
        self.dead_joins.add(trajectory_id)
        with open(self.join_ledger, "a") as fh:
            fh.write(f"{trajectory_id}\n")

    def _read_spool(self, version: int, batch: IntakeBatch) -> None:
        """The copies an earlier incarnation held for a join (learner/spool.py), back into the join; those of
        trajectories settled since (re-trained by the replay, dead-lettered or dropped as stale) are marked settled.
        Each came through the contract once; one that fails it now (another config) cannot join any more, so its
        trajectory is dead-lettered as a join that cannot complete, every copy with the reason."""
        spooled = self.spool.load()
        if not spooled:
            return
        checked: dict[str, list[tuple[Entry, bytes, Trajectory | None]]] = {}
        failures: dict[str, str] = {}
        for s in spooled:
            entry: Entry = (s.stream, s.message_id)
            try:
                checked.setdefault(s.trajectory_id, []).append(
                    (entry, s.payload, self.contract.check(s.payload))
                )
            except Exception as exc:  # the copy's fault (a changed contract), never the learner's
                checked.setdefault(s.trajectory_id, []).append((entry, s.payload, None))
                failures.setdefault(s.trajectory_id, f"read back from the join spool: {exc}")
        settled, kept = [], 0
        for tid, copies in checked.items():
            if tid in self.trained or tid in self.dropped_stale or tid in self.dead_joins:
                settled.append(tid)
            elif tid in failures:
                for entry, payload, _t in copies:
                    self._dead_letter(entry, payload, failures[tid])
                self._record_dead_join(tid)
                settled.append(tid)
            else:
                for entry, payload, t in copies:
                    offer = self.joiner.offer(Copy(entry, payload, t, spooled=True))
                    if offer.outcome == "complete":  # not written so, but joined if it were
                        self._note(self._admit_joined(offer.held, version, batch, [], partial=False))
                kept += len(copies)
        self.spool.settle(settled)
        log.info(
            "read back %d held mixture copies from the join spool (%s); %d trajectories settled since",
            kept, self.spool.path, len(settled),
        )  # fmt: skip
