"""Teacher scorer: attach teacher logprobs (sampled token and optional top-k) to trajectories, by token id.

A rollout is acknowledged only after its scored copy is published, so one that was taken but not finished is
still pending in the broker rather than lost.
"""

from __future__ import annotations

import os
import time

from broker import Message, connect, publish_with_backpressure
from opd.config import Config
from opd.models.builds import ensure_assets
from opd.protocol import ProtocolError, Streams, Trajectory, decode, encode, unpack_control
from opd.runtime.lifecycle import Reporter, StopFlag, log, run_component
from opd.runtime.service_time import pad_to_service_time
from teacher_scorers.backends import LOGPROB_FLOOR, build_teacher, length_buckets

__all__ = ["LOGPROB_FLOOR", "Scorer", "length_buckets", "main"]  # length_buckets now lives in backends
# Chaos hook for the test suite and drills: the teacher raises on trajectories with this prompt_id.
CHAOS_RAISE_ENV = "OPD_CHAOS_TEACHER_RAISE"


class Scorer:
    def __init__(self, cfg: Config, index: int, stop: StopFlag):
        self.cfg, self.stop = cfg, stop
        self.name = f"scorer-{index}"
        assets = ensure_assets(cfg, log=log.info)
        self.teacher = build_teacher(cfg, assets)  # scorer.engine picks the backend; it checks the tokenizer
        self.vocab_size = self.teacher.vocab_size
        self.teacher_id = self.teacher.teacher_id
        self.broker = connect(cfg.broker)
        self.broker.stopping = stop
        self.reporter = Reporter(self.broker, cfg, self.name, cfg.scorer.metrics_every_s)
        streams = Streams(cfg.run.run_id)
        self.rollouts, self.scored, self.control = streams.rollouts, streams.scored, streams.control
        self.max_bytes = int(cfg.broker.max_message_mb * (1 << 20))
        self.chaos_prompt = os.environ.get(CHAOS_RAISE_ENV)
        self.run_over = False  # the learner announced stop: nobody will train what is still in hand
        self.drain_deadline: float | None = None
        self.broker.skip_to_end(self.control, self.name)  # an earlier incarnation's stop is not for us

    def _validate(self, msgs: list[Message]) -> tuple[list[Trajectory], list[str], list[str]]:
        good, good_ids, bad_ids = [], [], []
        for m in msgs:
            try:
                good.append(decode(m.data, vocab_size=self.vocab_size, max_bytes=self.max_bytes))
                good_ids.append(m.id)
            except ProtocolError as exc:
                self.reporter.dead_letter(self.rollouts, m.id, m.data, str(exc))
                bad_ids.append(m.id)
        return good, good_ids, bad_ids

    def score(self, trajs: list[Trajectory]) -> None:
        if self.chaos_prompt and any(t.prompt_id == self.chaos_prompt for t in trajs):
            raise RuntimeError(f"chaos: teacher fails on prompt {self.chaos_prompt} ({CHAOS_RAISE_ENV})")
        self.teacher.score(trajs)
        now = time.time()
        for t in trajs:
            t.timestamps["scored"] = now

    def score_isolating(self, trajs: list[Trajectory], ids: list[str]) -> tuple[list[Trajectory], list[str]]:
        """Score a batch; if the teacher raises, score one by one so that one bad input cannot hold up the rest.

        A trajectory that still fails is left unacknowledged when the broker redelivers (Redis: retried after
        broker.claim_idle_s, dead-lettered after broker.max_deliveries), and dead-lettered at once otherwise."""
        try:
            self.score(trajs)
            return trajs, ids
        except Exception as exc:  # the teacher's failure on some input, not a reason to stop scoring
            log.warning("teacher failed on a batch of %d (%s); scoring them one by one", len(trajs), exc)
        ok, ok_ids = [], []
        for t, mid in zip(trajs, ids, strict=True):
            try:
                self.score([t])
            except Exception as exc:
                self.reporter.add(score_failures=1)
                if not getattr(self.broker, "redelivers", False):
                    self.reporter.dead_letter(self.rollouts, mid, encode(t), f"teacher raised: {exc}")
                    self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, [mid])
                continue
            ok.append(t)
            ok_ids.append(mid)
        return ok, ok_ids

    def _check_stop(self) -> None:
        for msg in self.broker.consume(self.control, self.name, self.name, 64, 0.0):
            try:
                if unpack_control(msg.data)["kind"] == "stop":
                    self.run_over = True
                    self.stop.set("stop message from the learner")
            except ProtocolError:
                pass
            self.broker.ack(self.control, self.name, [msg.id])

    def _abandon_batch(self) -> bool:
        """Asked while the scored stream is full: give up the scored batch in hand only if it comes back anyway
        (a redelivering broker), nobody will train it (the learner said stop), or shutdown is overdue. A scorer
        retired by `opd scale` on the zmq broker, which never redelivers, keeps waiting to hand its batch on."""
        if not self.stop():
            return False
        if self.run_over or getattr(self.broker, "redelivers", False):
            return True
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + 0.75 * self.cfg.run.shutdown_grace_s
        return time.monotonic() > self.drain_deadline

    def run(self) -> None:
        log.info("ready: teacher %s, top-k %d", self.teacher_id, self.cfg.scorer.topk)
        while not self.stop():
            msgs = self.broker.consume(
                self.rollouts, Streams.SCORERS_GROUP, self.name, self.cfg.scorer.batch_size, 0.5
            )
            self._check_stop()
            if not msgs:
                self.reporter.maybe_send()
                continue
            trajs, ids, bad = self._validate(msgs)
            self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, bad)
            t0 = time.perf_counter()
            trajs, ids = self.score_isolating(trajs, ids)
            tokens = sum(len(t.response_token_ids) for t in trajs)
            pad_s = pad_to_service_time(
                t0, tokens, self.cfg.pipeline.service_time.scorer_ms_per_token, self.stop.wait
            )
            seconds = time.perf_counter() - t0
            if (
                trajs
                and publish_with_backpressure(
                    self.broker,
                    self.scored,
                    [encode(t) for t in trajs],
                    should_stop=self._abandon_batch,
                    while_waiting=self._check_stop,
                )
                is None
            ):
                break  # stopping with work in hand: leave it pending (unacknowledged) in the broker
            self.broker.ack(self.rollouts, Streams.SCORERS_GROUP, ids)
            self.reporter.add(
                trajectories_scored=len(trajs),
                tokens_scored=tokens,
                score_seconds=seconds,
                service_pad_seconds=pad_s,
            )
            self.reporter.maybe_send()
        self.reporter.maybe_send(force=True, final=True)
        log.info("stopping (%s)", self.stop.reason or "done")


def main(cfg: Config, index: int) -> int:
    return run_component(cfg, f"scorer-{index}", lambda stop: Scorer(cfg, index, stop))
