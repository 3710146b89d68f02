"""Teacher scorer: attach teacher logprobs (sampled token and optional top-k) to trajectories, by token id.

A rollout is acknowledged only after its scored copy is published, so one that was taken but not finished is
still pending in the broker rather than lost. The retry policy lives here, not in the backends: a backend says
whether a failure may heal (`TeacherError.retryable`), and the scorer decides how often to ask again, how long
to wait, and whether a trajectory it gives up on is left for the broker to redeliver or dead-lettered.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from broker import Message, publish_with_backpressure
from opd.config import Config, RemoteTeacherConfig
from opd.models.builds import ensure_assets
from opd.models.vision import image_problem, load_vision
from opd.protocol import DEFAULT_TEACHER, ProtocolError, Streams, Trajectory, decode, encode, unpack_control
from opd.runtime.broker import open_broker
from opd.runtime.lifecycle import Reporter, StopFlag, log, run_component
from opd.runtime.service_time import pad_to_service_time
from teacher_scorers.backends import PartlyScored, TeacherError, build_teacher
from teacher_scorers.backends.common import length_buckets

# length_buckets is re-exported for tests/test_sampling.py
__all__ = ["RetryPolicy", "Scorer", "component_name", "length_buckets", "main", "score_with_retries"]
POLL_S = 0.05  # holding scored copies the scored stream has no room for: the wait before offering them again
# Chaos hook for the test suite and drills: the teacher raises on trajectories with this prompt_id.
CHAOS_RAISE_ENV = "OPD_CHAOS_TEACHER_RAISE"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Held:
    """A scored copy waiting for room in the scored stream, with its rollout's id (acknowledged once it is
    appended) and what it counts for."""

    payload: bytes
    rollout_id: str
    tokens: int
    images: int


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a retryable teacher failure is asked again: `retries` more attempts, the
    first after `backoff_s`, doubling up to `max_backoff_s`, each delay jittered by +-20% so that scorers that
    failed together do not come back together. Only server teachers report retryable failures, so the numbers
    are `scorer.remote`'s."""

    retries: int
    backoff_s: float
    max_backoff_s: float = 30.0

    @classmethod
    def from_config(cls, rc: RemoteTeacherConfig) -> RetryPolicy:
        return cls(retries=rc.retries, backoff_s=rc.backoff_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(0.8, 1.2)

    def call(self, fn: Callable[[], _T], sleep: Callable[[float], None] = time.sleep) -> _T:
        """fn(), asked again while it raises a retryable TeacherError (a teacher server still starting)."""
        for attempt in range(self.retries + 1):
            if attempt:
                sleep(self.delay(attempt))
            try:
                return fn()
            except TeacherError as exc:
                if not exc.retryable:
                    raise
                last = exc
        raise TeacherError(last.where, _gave_up(last, self.retries + 1), retryable=True) from last


def _gave_up(exc: TeacherError, attempts: int) -> str:
    return f"failed after {attempts} attempt(s); last: {exc.reason}"


def _retryable(exc: Exception) -> bool:
    return isinstance(exc, TeacherError) and exc.retryable


def _attempt(score: Callable[[list[Trajectory]], None], trajs: list[Trajectory]) -> dict[int, Exception]:
    """Score once; the failures by position. A batch that failed as a whole is scored one by one, so that one bad
    input cannot hold up the rest."""
    try:
        score(trajs)
        return {}
    except PartlyScored as exc:
        return dict(exc.failures)
    except Exception as exc:  # the teacher's failure on some input, not a reason to stop scoring
        if len(trajs) == 1:
            return {0: exc}
        log.warning("teacher failed on a batch of %d (%s); scoring them one by one", len(trajs), exc)
    failures = {}
    for i, t in enumerate(trajs):
        if one := _attempt(score, [t]):
            failures[i] = one[0]
    return failures


def score_with_retries(
    score: Callable[[list[Trajectory]], None],
    trajs: list[Trajectory],
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[int, str]:
    """Score trajs in place with `score` (a backend's, or the scorer's own), asking again after a backoff for
    those whose failure is retryable. Returns why each trajectory that is still unscored failed, by position;
    the others are scored. A backend that names its failures (`PartlyScored`) is asked again only for those."""
    failures = _attempt(score, trajs)
    tries = dict.fromkeys(failures, 1)
    for attempt in range(1, policy.retries + 1):
        again = [i for i, exc in failures.items() if _retryable(exc)]
        if not again:
            break
        delay = policy.delay(attempt)
        log.warning(
            "teacher: %d trajectories failed but may succeed later (first: %s); retry %d of %d in %.2fs",
            len(again), failures[again[0]], attempt, policy.retries, delay,
        )  # fmt: skip
        sleep(delay)
        for i in again:
            del failures[i]
            tries[i] += 1
        for j, exc in _attempt(score, [trajs[i] for i in again]).items():
            failures[again[j]] = exc
    return {
        i: f"{exc.where}: {_gave_up(exc, tries[i])}"
        if tries[i] > 1 and isinstance(exc, TeacherError)
        else str(exc)
        for i, exc in failures.items()
    }


def _topk_mismatch(t: Trajectory, width: int) -> TeacherError | None:
    """Why a scored trajectory's top-k does not have the run's width (None when it has): the learner stacks a
    batch's top-k into one tensor, so a foreign width must stop here, not in the learner. A rollout that came
    with top-k already attached (the teacher attaches none when scorer.topk is 0) fails the same way."""
    got = 0 if t.teacher_topk_ids is None else t.teacher_topk_ids.shape[1]
    if got == width:
        return None
    return TeacherError(
        f"trajectory {t.id}", f"top-k width {got} but scorer.topk gives {width}", retryable=False
    )


def component_name(teacher: str, index: int) -> str:
    """`scorer-<i>` for the one teacher of a run without a teachers section (names unchanged), else
    `scorer-<teacher>-<i>`: each teacher's pool is numbered on its own."""
    return f"scorer-{index}" if teacher == DEFAULT_TEACHER else f"scorer-{teacher}-{index}"


def route_problem(t: Trajectory, teacher: str, routed: bool) -> str | None:
    """Why teacher `teacher`'s pool must not score this rollout (None when it must): its route names other
    teachers, or it has no route in a run that routes (several teachers: which one would be a guess)."""
    if t.teacher_weights is None:
        if not routed:
            return None
        return (
            f"rollout {t.id} has no route (teacher_weights) but this run has several teachers; the scorer of "
            f"teacher {teacher!r} scores only what the actors routed to it (an actor of another run or version?)"
        )
    if teacher not in t.teacher_weights:
        return (
            f"rollout {t.id} is routed to {sorted(t.teacher_weights)}, not to teacher {teacher!r} whose pool "
            f"consumes this stream"
        )
    return None


class Scorer:
    def __init__(self, cfg: Config, index: int, stop: StopFlag, teacher: str = DEFAULT_TEACHER):
        """A scorer of teacher `teacher`'s pool: it works on the config as that pool sees it (its model in
        `teacher`, its settings in `scorer`), so the backends and model builds serve any pool unchanged."""
        # with several teachers a rollout without a route cannot be this pool's to score (one: it is)
        self.routed = len(cfg.teacher_pools()) > 1
        cfg = cfg.for_teacher(teacher)
        self.cfg, self.stop, self.teacher_name = cfg, stop, teacher
        self.name = component_name(teacher, index)
        assets = ensure_assets(cfg, log=log.info)
        self.retry = RetryPolicy.from_config(cfg.scorer.remote)
        # the config picks the backend, which checks the tokenizer; a server still starting is waited for
        self.teacher = self.retry.call(lambda: build_teacher(cfg, assets))
        # the student's processor: what the actors made of each prompt's images, checked on receipt
        self.vision = load_vision(assets.student.path)
        self.vocab_size = self.teacher.vocab_size
        # what a learner of this run accepts (learner/intake.py Contract.topk_width): checked before publishing
        self.topk_width = min(cfg.scorer.topk, self.vocab_size)
        self.teacher_id = self.teacher.teacher_id
        self.broker = open_broker(cfg.broker, stopping=stop)
        self.reporter = Reporter(self.broker, cfg, self.name, cfg.scorer.metrics_every_s)
        streams = Streams(cfg.run.run_id)
        self.rollouts, self.scored, self.control = (
            streams.rollouts_for(teacher),
            streams.scored_for(teacher),
            streams.control,
        )
        self.max_bytes = int(cfg.broker.max_message_mb * (1 << 20))
        self.chaos_prompt = os.environ.get(CHAOS_RAISE_ENV)
        self.run_over = False  # the learner announced stop: nobody will train what is still in hand
        self.drain_deadline: float | None = None
        self.broker.skip_to_end(self.control, self.name)  # an earlier incarnation's stop is not for us

    def _validate(self, msgs: list[Message]) -> tuple[list[Trajectory], list[str], list[str]]:
        """Decode each rollout and check that it is this pool's to score; the others are dead-lettered (their ids
        returned for acknowledgement), never a reason to stop."""
        good, good_ids, bad_ids = [], [], []
        for m in msgs:
            try:
                t = decode(m.data, vocab_size=self.vocab_size, max_bytes=self.max_bytes)
                reason = route_problem(t, self.teacher_name, self.routed) or self._image_problem(t)
            # decode raises only ProtocolError; anything else is still this message's
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
            if reason is not None:
                self.reporter.dead_letter(self.rollouts, m.id, m.data, reason)
                bad_ids.append(m.id)
                continue
            good.append(t)
            good_ids.append(m.id)
        return good, good_ids, bad_ids

    def _image_problem(self, t: Trajectory) -> str | None:
        """A bad image (or a placeholder count that does not match) dead-letters its trajectory here, before any
        teacher, local or remote, is asked (opd.models.vision.image_problem)."""
        im = self.cfg.images
        return image_problem(self.vision, t, im.max_pixels, im.max_per_prompt)

    def score(self, trajs: list[Trajectory]) -> None:
        if self.chaos_prompt and any(t.prompt_id == self.chaos_prompt for t in trajs):
            raise RuntimeError(f"chaos: teacher fails on prompt {self.chaos_prompt} ({CHAOS_RAISE_ENV})")
        self.teacher.score(trajs)
        wrong = {i: _topk_mismatch(t, self.topk_width) for i, t in enumerate(trajs)}
        wrong = {i: exc for i, exc in wrong.items() if exc is not None}
        if wrong:
            raise PartlyScored(wrong, len(trajs))

    def score_isolating(self, trajs: list[Trajectory], ids: list[str]) -> tuple[list[Trajectory], list[str]]:
        """Score a batch, retrying what may heal (`score_with_retries`); return the scored ones and their ids.

        A trajectory that still fails is left unacknowledged when the broker redelivers (Redis: retried after
        broker.claim_idle_s, dead-lettered after broker.max_deliveries), and dead-lettered at once otherwise."""
        failures = score_with_retries(self.score, trajs, self.retry)
        now = time.time()
        ok, ok_ids = [], []
        for i, (t, mid) in enumerate(zip(trajs, ids, strict=True)):
            if i in failures:
                self.reporter.add(score_failures=1)
                if self.broker.capabilities.redelivers:  # given back: retried after claim_idle_s
                    self.broker.release(self.rollouts, Streams.SCORERS_GROUP, [mid])
                else:
                    self.reporter.dead_letter(self.rollouts, mid, encode(t), f"teacher raised: {failures[i]}")
                    self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, [mid])
                continue
            t.timestamps["scored"] = now
            t.teacher_name = self.teacher_name  # which pool scored this copy (a mixture has one per teacher)
            ok.append(t)
            ok_ids.append(mid)
        return ok, ok_ids

    def _check_stop(self) -> None:
        for msg in self.broker.consume(self.control, self.name, self.name, 64, 0.0):
            try:
                if unpack_control(msg.data)["kind"] == "stop":
                    self.run_over = True
                    self.stop.set("stop message from the learner")
            except Exception as exc:  # a record this scorer cannot read is not a reason to stop scoring
                log.warning("ignored an unreadable control record %s: %s", msg.id, exc)
            self.broker.ack(self.control, self.name, [msg.id])

    def _abandon_batch(self) -> bool:
        """Asked while the scored stream is full: give up the scored batch in hand only if it comes back anyway
        (a redelivering broker), nobody will train it (the learner said stop), or shutdown is overdue. A scorer
        retired by `opd scale` on the zmq broker, which never redelivers, keeps waiting to hand its batch on."""
        if not self.stop():
            return False
        if self.run_over or self.broker.capabilities.redelivers:
            return True
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + 0.75 * self.cfg.run.shutdown_grace_s
        return time.monotonic() > self.drain_deadline

    def prepare(self, msgs: list[Message]) -> list[Held]:
        """Validate and score a batch of rollouts: their scored copies, ready to append. A message that fails any
        stage is dead-lettered (or, on a redelivering broker, a teacher failure is left for redelivery), never a
        reason to stop the scorer."""
        trajs, ids, bad = self._validate(msgs)
        self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, bad)
        t0 = time.perf_counter()
        trajs, ids = self.score_isolating(trajs, ids)
        if (take := getattr(self.teacher, "take_counters", None)) is not None and (counts := take()):
            self.reporter.add(**counts)  # a cross-tokenizer teacher's alignment figures
        held = self._encode(trajs, ids, {m.id: m.data for m in msgs})
        pad_s = pad_to_service_time(
            t0,
            sum(len(t.response_token_ids) for t in trajs),
            self.cfg.pipeline.service_time.scorer_ms_per_token,
            self.stop.wait,
        )
        self.reporter.add(
            score_seconds=time.perf_counter()
            - t0,  # one per batch: Prometheus' opd_score_seconds observes each
            score_batches=1,  # so a reader takes the mean batch latency (opd top, the report)
            service_pad_seconds=pad_s,
        )
        return held

    def hand_on(self, held: list[Held], wait: bool) -> list[Held]:
        """Append scored copies to the scored stream, in order, and acknowledge their rollouts: as many as it has
        room for now, or (`wait`) all of them, waiting for room unless asked to stop (`_abandon_batch`). Returns
        the ones not appended, whose rollouts stay pending in the broker."""
        payloads = [h.payload for h in held]
        if wait:
            sent = publish_with_backpressure(
                self.broker,
                self.scored,
                payloads,
                should_stop=self._abandon_batch,
                while_waiting=self._check_stop,
            )
        else:
            sent = self.broker.publish(self.scored, payloads)
        out, rest = held[: len(sent or ())], held[len(sent or ()) :]
        if out:
            self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, [h.rollout_id for h in out])
            self.reporter.add(
                trajectories_scored=len(out),
                tokens_scored=sum(h.tokens for h in out),
                images_scored=sum(h.images for h in out),
            )
        return rest

    def handle(self, msgs: list[Message]) -> bool:
        """Validate, score, publish and acknowledge one batch of rollouts; False when asked to stop with part of
        it unsent (left pending: copies sent are deduplicated by the learner)."""
        return not self.hand_on(self.prepare(msgs), wait=True)

    def _encode(self, trajs: list[Trajectory], ids: list[str], rollouts: dict[str, bytes]) -> list[Held]:
        """The scored copies with their rollouts' ids; one that cannot be encoded is dead-lettered."""
        held = []
        for t, mid in zip(trajs, ids, strict=True):
            try:
                held.append(Held(encode(t), mid, len(t.response_token_ids), len(t.images or ())))
            except Exception as exc:  # a teacher's output we cannot send is that trajectory's failure
                self.reporter.dead_letter(
                    self.rollouts, mid, rollouts[mid], f"scored copy not encodable: {exc}"
                )
                self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, [mid])
        return held

    def run(self) -> None:
        """Score ahead: while the scored stream is full, go on taking and scoring rollouts until a whole
        `scorer.batch_size` of scored copies is held, so when the learner acknowledges its batch a whole batch
        is appended at once, rather than a fragment the learner would then wait on while the rest is scored (a
        streaming actor publishes a group at a time: benchmarks/streaming.py measured the turn-taking). A held
        copy's rollout is acknowledged only once the copy is appended, so it still counts in the rollouts stream's
        depth, the actors' backpressure."""
        log.info(
            "ready: teacher %s (%s), top-k %d, consuming %s",
            self.teacher_name, self.teacher_id, self.cfg.scorer.topk, self.rollouts,
        )  # fmt: skip
        held: list[Held] = []
        while not self.stop():
            room = self.cfg.scorer.batch_size - len(held)
            # holding copies: take only what is there now, then offer them again
            msgs = (
                self.broker.consume(
                    self.rollouts, Streams.SCORERS_GROUP, self.name, room, 0.0 if held else 0.5
                )
                if room > 0
                else []
            )
            self._check_stop()
            if msgs:
                held += self.prepare(msgs)
            before = len(held)
            if held:
                held = self.hand_on(held, wait=False)
            if held and not msgs and len(held) == before:  # nothing taken, nothing appended: wait for room
                self.stop.wait(POLL_S)
            self.reporter.maybe_send()
        if held and (rest := self.hand_on(held, wait=True)):
            log.info("stopping with %d scored copies not appended: their rollouts stay pending", len(rest))
        self.reporter.maybe_send(force=True, final=True)
        log.info("stopping (%s)", self.stop.reason or "done")


def main(cfg: Config, index: int, teacher: str = DEFAULT_TEACHER) -> int:
    """Run scorer `index` of teacher `teacher`'s pool (`opd scorer --teacher NAME --index I`); exit 2 naming the
    run's teachers when it has no such teacher."""
    pools = cfg.teacher_pools()
    if teacher not in pools:
        print(
            f"opd scorer: --teacher {teacher!r} is not a teacher of this run; its teachers: {', '.join(pools)}"
            + ("" if cfg.teachers is not None else " (no teachers section: leave --teacher out)"),
            file=sys.stderr,
        )
        return 2
    view = cfg.for_teacher(teacher)
    return run_component(
        view,
        component_name(teacher, index),
        lambda stop: Scorer(cfg, index, stop, teacher),
        watch_learner=True,
    )
