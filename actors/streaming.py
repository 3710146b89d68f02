"""Stream generation (`actor.generation: stream`): continuous batching, each group published as soon as it ends,
and new weights applied between decode steps.

Why: a batch actor holds its device until the batch's longest response ends. With long-tailed response lengths
most slots idle for most of the batch, and every trajectory waits for the slowest one, so it reaches the learner
older than it needs to be. Here the engine keeps up to `actor.max_inflight` sequences decoding; a GRPO group of
`sampling.n` is admitted whole and published when its last member ends (group rewards need all n), and its slots
go to the next prompt at the next step.

Weights: the actor serves the control stream between decode steps, so a broadcast lands there, and the engine is
told at once (`sync_weights`); what the sequences in flight do about the tokens they already hold is
`actor.on_new_weights`. Each token records the version that sampled it (`Trajectory.token_versions`), and
`policy_version` is the first token's, the oldest: the learner judges lag and staleness by it.

Backpressure holds per group, not per batch: no new group is admitted while the outbox waits for a teacher's stream
to take copies, while the trajectories already queued would make a new one older than `learner.max_staleness`, or
before a restarted actor has the learner's weights; sequences in flight go on meanwhile. At stop the sequences in
flight are dropped (never published, so never in the books' `generated`) or finished, as `actor.on_stop` says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.engines.request import Request
from opd.models.sampler import Sample
from opd.models.vision import PromptImages
from opd.protocol import Trajectory
from opd.runtime.lifecycle import log
from opd.runtime.service_time import pad_to_service_time
from opd.tasks import Problem

POLL_S = 0.05  # the wait of an actor with nothing in flight and nothing it may admit


@dataclass
class Group:
    """One prompt's n sequences, published together when the last ends."""

    group_id: str
    problem: Problem
    prompt_ids: list[int]
    images: PromptImages | None
    ended: dict[int, tuple[Sample, float]] = field(default_factory=dict)  # sample index -> (sample, end time)


class StreamLoop:
    """The actor's loop in stream generation; the actor (actors/actor.py) supplies the broker, the router, the
    weight follower, the engine and the publishing."""

    def __init__(self, actor):
        self.actor = actor
        cfg = actor.cfg
        self.n = cfg.sampling.n
        self.max_inflight = cfg.inflight()
        self.groups: dict[str, Group] = {}
        self.admitted = 0
        self.paused_since: float | None = None  # the staleness pause, while it holds back admission
        self.tokens_restarted_seen = 0
        self.caught_up = False  # holds the learner's weights (or fresh enough ones) since it started

    def run(self) -> None:
        a = self.actor
        while not a.stop():
            a.service_control()  # weights land here, between decode steps
            self.apply_weights()
            a.flush()
            self.admit()
            if a.engine.inflight():
                self.step()
            else:
                a.stop.wait(POLL_S)
            a.reporter.maybe_send(weight_version=a.follower.version, inflight=a.engine.inflight())
        self.at_stop()

    def apply_weights(self) -> None:
        a = self.actor
        a.engine.sync_weights(a.follower.version)
        restarted = getattr(a.engine, "tokens_dropped", 0)
        if restarted > self.tokens_restarted_seen:  # on_new_weights: restart threw these away
            a.reporter.add(tokens_restarted=restarted - self.tokens_restarted_seen)
            self.tokens_restarted_seen = restarted

    def may_admit(self) -> bool:
        """Whether a new group may start now (the per-group form of the batch actor's waits)."""
        a = self.actor
        if self.max_inflight - a.engine.inflight() < self.n or a.outbox.blocking():
            return False
        if not self.caught_up:  # a (re)started actor: its samples at old weights would be dropped as stale
            if a.follower.version < a.follower.learner_version() and not a._snapshot_weights_fresh():
                return False
            # from here on the staleness pause bounds the lag (and each step saves a store read)
            self.caught_up = True
        ahead = a.versions_ahead() >= a.cfg.learner.max_staleness + 1
        now = time.perf_counter()
        if ahead and self.paused_since is None:
            self.paused_since = now
        elif not ahead and self.paused_since is not None:
            a.reporter.add(staleness_pause_seconds=now - self.paused_since)
            self.paused_since = None
        return not ahead

    def admit(self) -> None:
        """Fill free slots with whole groups: the next prompts whose route avoids any down teacher."""
        a = self.actor
        if not self.may_admit():
            return
        down = a.track_down()
        while self.max_inflight - a.engine.inflight() >= self.n and a.router.reachable(down):
            problems, skipped = a.router.pick(a.problems, 1, down, a.max_draws)
            if skipped:
                a.skipped_while_down += skipped
                a.reporter.add(prompts_skipped=skipped)
            if not problems:
                return
            self.start(problems[0])

    def start(self, problem: Problem) -> None:
        a = self.actor
        ids, images = a.prompt(problem)
        group = Group(f"{a.name}-s{self.admitted}", problem, ids, images)
        self.admitted += 1
        self.groups[group.group_id] = group
        for j in range(self.n):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=a.generator))
            a.engine.start(Request(f"{group.group_id}/{j}", ids, images, seed))

    def step(self) -> None:
        """One decode step; publish the groups whose last member ended in it."""
        a = self.actor
        busy = a.engine.inflight()  # each sequence in flight samples one token in this step
        t0 = time.perf_counter()
        ended = a.engine.step()
        pad_s = pad_to_service_time(t0, busy, a.cfg.pipeline.service_time.actor_ms_per_token, a.stop.wait)
        a.reporter.add(
            generate_seconds=time.perf_counter() - t0,
            service_pad_seconds=pad_s,
            decode_steps=1,
            slot_steps=max(self.max_inflight, busy),
            slot_busy_steps=busy,
        )
        now = time.time()
        for key, sample in ended:
            group_id, _, index = key.rpartition("/")
            group = self.groups[group_id]
            group.ended[int(index)] = (sample, now)
            if len(group.ended) == self.n:
                self.publish(self.groups.pop(group_id))

    def publish(self, group: Group) -> None:
        a = self.actor
        trajs = [self.trajectory(group, j, *group.ended[j]) for j in range(self.n)]
        a.publish(trajs)
        now = time.time()
        a.reporter.add(
            publish_delay_seconds=sum(now - ended for _, ended in group.ended.values()),
            trajectory_versions=sum(len(set(t.token_versions.tolist())) for t in trajs),
        )

    def trajectory(self, group: Group, index: int, sample: Sample, ended: float) -> Trajectory:
        # policy_version: the first token's, the oldest (the version the sequence started under)
        return self.actor.trajectory(
            group.problem,
            group.group_id,
            index,
            group.prompt_ids,
            group.images,
            sample,
            sample.token_versions[0],
            ended,
        )

    def at_stop(self) -> None:
        """actor.on_stop: finish the sequences in flight (no new prompts) and publish them, or drop them. A group
        with members ended but not all is dropped whole: it was never published."""
        a = self.actor
        if self.paused_since is not None:
            a.reporter.add(staleness_pause_seconds=time.perf_counter() - self.paused_since)
        if a.cfg.actor.on_stop == "finish" and a.engine.inflight():
            inflight = a.engine.inflight()
            # every sequence ends within max_new_tokens steps
            for _ in range(a.cfg.sampling.max_new_tokens + 1):
                if not a.engine.inflight():
                    break
                self.step()
            a.reporter.add(sequences_finished_at_stop=inflight)
            log.info("stopping: finished the %d sequences in flight (actor.on_stop: finish)", inflight)
        partial = sum(len(g.ended) for g in self.groups.values())
        dropped = a.engine.abort() + partial
        if dropped:
            a.reporter.add(sequences_dropped_at_stop=dropped)
            log.info(
                "stopping with %d sequences in flight or in unfinished groups (actor.on_stop: %s): dropped, "
                "never published",
                dropped,
                a.cfg.actor.on_stop,
            )
        self.groups.clear()
