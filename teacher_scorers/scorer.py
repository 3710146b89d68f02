"""Teacher scorer: attach teacher logprobs (sampled token and optional top-k) to trajectories, by token id.

A rollout is acknowledged only after its scored copy is published, so one that was taken but not finished is
still pending in the broker rather than lost.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from broker import Message, connect, publish_with_backpressure, stream_name
from opd.assets import ensure_assets, load_asset
from opd.config import Config
from opd.models import check_same_vocabulary, load_tokenizer
from opd.protocol import ProtocolError, Trajectory, decode, encode, unpack_control
from opd.runtime import Reporter, StopFlag, log, run_component
from opd.sampling import response_logprobs

LOGPROB_FLOOR = -1e4  # a teacher's -inf (zero probability) is clamped here so messages stay finite
# Chaos hook for the test suite and drills: the teacher raises on trajectories with this prompt_id.
CHAOS_RAISE_ENV = "OPD_CHAOS_TEACHER_RAISE"


def length_buckets(trajs: list[Trajectory], max_tokens: int) -> list[list[Trajectory]]:
    """Sort by total length and cut into forwards whose padded size stays within max_tokens."""
    order = sorted(trajs, key=lambda t: len(t.prompt_token_ids) + len(t.response_token_ids))
    buckets: list[list[Trajectory]] = []
    for t in order:
        length = len(t.prompt_token_ids) + len(t.response_token_ids)
        if buckets and (len(buckets[-1]) + 1) * length <= max_tokens:
            buckets[-1].append(t)
        else:
            buckets.append([t])
    return buckets


class Scorer:
    def __init__(self, cfg: Config, index: int, stop: StopFlag):
        self.cfg, self.stop = cfg, stop
        self.name = f"scorer-{index}"
        assets = ensure_assets(cfg, log=log.info)
        self.teacher, self.tokenizer = load_asset(assets.teacher, cfg.scorer.device)
        self.teacher.eval()
        check_same_vocabulary(load_tokenizer(assets.student.tokenizer), self.tokenizer)
        self.vocab_size = self.teacher.get_input_embeddings().weight.shape[0]
        self.teacher_id = assets.teacher.path
        self.broker = connect(cfg.broker)
        self.broker.stopping = stop
        self.reporter = Reporter(self.broker, cfg, self.name, cfg.scorer.metrics_every_s)
        self.rollouts = stream_name(cfg.run.run_id, "rollouts")
        self.scored = stream_name(cfg.run.run_id, "scored")
        self.control = stream_name(cfg.run.run_id, "control")
        self.max_bytes = int(cfg.broker.max_message_mb * (1 << 20))
        self.chaos_prompt = os.environ.get(CHAOS_RAISE_ENV)
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

    @torch.no_grad()
    def score(self, trajs: list[Trajectory]) -> None:
        sc = self.cfg.scorer
        if self.chaos_prompt and any(t.prompt_id == self.chaos_prompt for t in trajs):
            raise RuntimeError(f"chaos: teacher fails on prompt {self.chaos_prompt} ({CHAOS_RAISE_ENV})")
        for bucket in length_buckets(trajs, sc.max_tokens_per_batch):
            seqs = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist()) for t in bucket]
            lp, tk_ids, tk_lp = response_logprobs(
                self.teacher,
                seqs,
                pad_id=self.tokenizer.pad_token_id,
                temperature=sc.temperature,
                topk=sc.topk,
            )
            for i, t in enumerate(bucket):
                t.teacher_logprobs = lp[i].clamp(min=LOGPROB_FLOOR).numpy().astype(np.float32)
                if tk_ids is not None:
                    t.teacher_topk_ids = tk_ids[i].numpy().astype(np.int32)
                    t.teacher_topk_logprobs = tk_lp[i].clamp(min=LOGPROB_FLOOR).numpy().astype(np.float32)
                t.teacher_id = self.teacher_id
                t.teacher_temperature = sc.temperature
                t.timestamps["scored"] = time.time()

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
                    self.broker.ack(self.rollouts, "scorers", [mid])
                continue
            ok.append(t)
            ok_ids.append(mid)
        return ok, ok_ids

    def _check_stop(self) -> None:
        for msg in self.broker.consume(self.control, self.name, self.name, 64, 0.0):
            try:
                if unpack_control(msg.data)["kind"] == "stop":
                    self.stop.set("stop message from the learner")
            except ProtocolError:
                pass
            self.broker.ack(self.control, self.name, [msg.id])

    def run(self) -> None:
        log.info("ready: teacher %s, top-k %d", self.teacher_id, self.cfg.scorer.topk)
        while not self.stop():
            msgs = self.broker.consume(self.rollouts, "scorers", self.name, self.cfg.scorer.batch_size, 0.5)
            self._check_stop()
            if not msgs:
                self.reporter.maybe_send()
                continue
            trajs, ids, bad = self._validate(msgs)
            self.broker.ack(self.rollouts, "scorers", bad)
            t0 = time.perf_counter()
            trajs, ids = self.score_isolating(trajs, ids)
            seconds = time.perf_counter() - t0
            if (
                trajs
                and publish_with_backpressure(
                    self.broker, self.scored, [encode(t) for t in trajs], should_stop=self.stop
                )
                is None
            ):
                break  # stopping with work in hand: leave it pending (unacknowledged) in the broker
            self.broker.ack(self.rollouts, "scorers", ids)
            self.reporter.add(
                trajectories_scored=len(trajs),
                tokens_scored=sum(len(t.response_token_ids) for t in trajs),
                score_seconds=seconds,
            )
            self.reporter.maybe_send()
        self.reporter.maybe_send(force=True, final=True)
        log.info("stopping (%s)", self.stop.reason or "done")


def main(cfg: Config, index: int) -> int:
    return run_component(cfg, f"scorer-{index}", lambda stop: Scorer(cfg, index, stop))
