"""Streaming actors (issue 21): batch generation vs continuous batching, with weight updates between batches or in
flight; generated and trained tokens/s, learner wait and token lag, with long-tailed response lengths.

    python benchmarks/streaming.py                 # calibrate from a real 30-step run, then simulate (~1.5 min)
    python benchmarks/streaming.py --no-calibrate  # the stored service times (seconds)
    python benchmarks/streaming.py --smoke         # stored service times, few steps: checks the script
    python benchmarks/streaming.py --real          # real `opd run`s, actor.generation batch vs stream

Three actor policies, all run by the same simulation code, which differs between them only in the `Policy`:

- (a) `batch`: today's actor. It draws prompts_per_batch prompts (x sampling.n sequences), generates until the
  longest ends, publishes the whole batch, and takes new weights only between batches.
- (b) `stream_drain`: continuous batching; a GRPO group of n is admitted whole once n slots are free (as
  actors/streaming.py admits) and published when its last member ends. When a newer weight version is waiting, the actor stops admitting, lets its
  in-flight sequences finish, applies the weights, then admits again (AReaL's non-interruptible mode).
- (c) `stream_inflight`: continuous batching with weight updates between any two decode steps; sequences in
  flight go on (`actor.on_new_weights: continue`) and each token carries the version that sampled it.

Why a simulation: this machine has 2 shared CPU cores, which cannot show what an accelerator's parallel decode
step buys (a step over 64 slots costs about what a step over 1 costs). So, as benchmarks/pipeline.py's calibrated
setting does, each stage's compute is a service time measured from a real run, and the pipeline is a
deterministic discrete-event simulation of them: a simulated clock, no sleeps, seeded.

Assumptions (each one is a choice; BENCHMARKS.md "Streaming actors" repeats them):

1. Accelerator assumption: one decode step over any number of busy slots, up to max_inflight, costs the same
   fixed time `decode_step_s` (memory-bound decode at these batch sizes). Every busy slot gains one token per step.
2. Prefill: a sequence's prompt is prefilled in the step that admits it, which then costs
   `prefill_s_per_token` x its prompt tokens more. Every policy prefills each sequence exactly once (on_new_weights
   continue: no recompute), so prefill costs the same total work in all three.
3. Scorer (scores ahead, as teacher_scorers/scorer.py's loop does): one scorer holds at most scorer.batch_size scored
   copies not yet appended to the scored stream. Its loop: while it holds fewer, it takes up to (batch_size -
   held) trajectories the rollouts stream has now (waiting for one only when it holds none), scores them in
   `scorer_s_per_token` x their response tokens and adds them to what it holds; then it appends as many held
   copies as the scored stream has room for, in order, acknowledging their rollouts (a held copy's rollout is
   unacknowledged, so it counts in the rollouts stream's depth, which the actor's backpressure sees); when it can
   neither take nor append it waits. So while the scored stream is full it scores on until it holds a batch, and
   the learner's acknowledgement of its batch lets a whole batch in at once. Its poll interval is taken as zero
   (like broker latency, assumption 8): it moves the instant either stream does.
4. Learner: waits for learner.batch_size trajectories it may train (intake order; one whose OLDEST token's lag
   exceeds learner.max_staleness is dropped, as learner/intake.py `lag` does), trains them in
   `learner_s_per_token` x their response tokens, acknowledges them, and every weight_sync.every steps broadcasts
   the new version (`learner_sync_s`, the learner waits for it). Lag of a token = the learner's version at that step
   minus the version that sampled the token (version k = the weights after k steps).
5. Weights at the actor: a broadcast version is available to the actor once the broadcast ends; applying it stops
   decoding for `actor_apply_s`. Policy decides when: (a) and (b) only with nothing in flight, (c) between any two
   decode steps. Several waiting versions are applied as one (the newest).
6. Backpressure, as actors/actor.py and actors/streaming.py do it: each work stream (rollouts, scored) holds at most broker.max_depth
   trajectories, counted until acknowledged (rollouts: until scored and appended; scored: until trained). The
   actor stops admitting while its outbox holds trajectories the rollouts stream has no room for, and while
   versions_ahead = (rollouts + scored depth) / (learner.batch_size x weight_sync.every) >= max_staleness + 1
   (the staleness pause). Stopping admission never stops the sequences in flight.
7. Response lengths: log-normal with median `--p50` and p99/p50 = `--p99-over-p50` (sigma = ln(ratio) / 2.326),
   rounded, clipped to [1, --max-new-tokens]; the n samples of a prompt are drawn independently (no correlation
   within a group). Prompts have `--prompt-tokens` tokens. All three policies see the same prompts and lengths in
   the same order (one seeded stream per run).
8. One actor, one scorer, one learner; no broker latency, no failures; the actor's publication, the scorer's
   appends and the learner's intake take no time. Events at the same instant run in the order they were
   scheduled; in particular a scorer that has just appended reads the rollouts stream before the actor's next
   step boundary moves its outbox in (the real scorer's read returns at once; the actor flushes once per decode
   step). Letting the actor flush first changes which fragments the scorer takes, not the result (checked once
   with the stored costs, 3 seeds: (a) and (c) the same trained tokens/s, (b) +0.8%).
9. Service times: calibrated from a real plain `opd run configs/tiny.yaml` with `pipeline.mode=sync` (each stage
   alone on the CPU, as pipeline.py calibrates): decode_step_s = actor generate_seconds / (batches x
   sampling.max_new_tokens) (the real sampler's forward passes per batch, the first of which is the prefill, so
   this step cost includes the tiny prompts' prefill; a batch whose samples all stopped early runs fewer passes,
   so this is a lower bound); prefill_s_per_token = decode_step_s / max_inflight (a prompt token costs one slot's
   share of a decode step: the run cannot separate the two, and on an accelerator prefill usually costs less per
   token, so this overstates it, equally for every policy); scorer_s_per_token = score_seconds / tokens_scored;
   learner_s_per_token = sum step_seconds / sum tokens (metrics.jsonl after the warm-up steps); learner_sync_s =
   mean weight_sync_seconds there; actor_apply_s = the actor's weight_sync_seconds / weight_syncs. They are the tiny
   models' costs on this CPU used unscaled: the absolute tokens/s are those of a pipeline whose stages run at
   that speed on separate devices; the ratios between policies are what the benchmark is for.

Measured like pipeline.py, over the learner steps after `--skip` warm-up steps: trained tokens/s = response
tokens trained / (time of the last step - time of the last warm-up step); generated tokens/s = tokens decoded in
that window / its length (tokens later dropped as stale count); learner wait fraction = wait / (wait + train +
broadcast); token lag mean/max over every token trained; slot occupancy = busy slot-steps / (decode steps x
max_inflight) in the window. Target (issue 21): (c) at least 1.5x (a)'s trained tokens/s with a token lag no worse
than (a)'s. Writes JSON to --out and a PNG next to it.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pipeline import CONFIG, REPO, run_opd, steady  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
Z99 = 2.3263  # the standard normal's 99th percentile: p99/p50 of a log-normal = exp(sigma * Z99)


@dataclass(frozen=True)
class Costs:
    """Service times in seconds (assumption 9 says where each comes from)."""

    decode_step_s: float  # one decode step, whatever the number of busy slots up to max_inflight
    prefill_s_per_token: float
    scorer_s_per_token: float
    learner_s_per_token: float
    learner_sync_s: float  # the learner broadcasting one version
    actor_apply_s: float  # the actor loading a received version into its engine


# The costs calibrated for BENCHMARKS.md's table (a plain sync run of configs/tiny.yaml, 50 steps, on this project's
# 2-core CPU; `--calibrate-only` measures a fresh set): what --no-calibrate and --smoke use.
DEFAULT_COSTS = Costs(
    decode_step_s=0.009281,
    prefill_s_per_token=0.009281 / 64,
    scorer_s_per_token=0.0003452,
    learner_s_per_token=0.0003654,
    learner_sync_s=0.00764,
    actor_apply_s=0.006986,
)


@dataclass(frozen=True)
class Setup:
    """The run's shape: configs/tiny.yaml's actor, learner and broker keys, plus the length distribution."""

    prompts_per_batch: int = 16
    n: int = 4
    max_inflight: int | None = None  # None: prompts_per_batch * n (actor.max_inflight's default)
    batch_size: int = 64
    sync_every: int = 1
    max_staleness: int = 4
    max_depth: int | None = None  # None: learner.batch_size (broker.max_depth's default)
    scorer_batch: int = 64
    prompt_tokens: int = 128
    p50: float = 128.0
    p99_over_p50: float = 8.0
    max_new_tokens: int = 2048
    steps: int = 150
    skip: int = 10

    @property
    def slots(self) -> int:
        return self.max_inflight or self.prompts_per_batch * self.n

    @property
    def depth(self) -> int:
        return self.max_depth or self.batch_size


@dataclass(frozen=True)
class Policy:
    """What differs between the three actors; everything else is shared code."""

    name: str
    admit: str  # "batch": a whole batch, only with nothing in flight | "continuous": any free slot, any step
    apply: str  # "idle": weights only with nothing in flight | "step": between any two decode steps
    drain: bool  # stop admitting while a newer version waits (so that "idle" comes)
    publish: (
        str  # "batch": every trajectory at the end of the batch | "group": a group when its last one ends
    )


POLICIES = {
    "batch": Policy("batch", admit="batch", apply="idle", drain=False, publish="batch"),
    "stream_drain": Policy("stream_drain", admit="continuous", apply="idle", drain=True, publish="group"),
    "stream_inflight": Policy(
        "stream_inflight", admit="continuous", apply="step", drain=False, publish="group"
    ),
}
LABELS = {
    "batch": "(a) batch",
    "stream_drain": "(b) stream, update between",
    "stream_inflight": "(c) stream, update in flight",
}
SHORT = {
    "batch": "(a) batch",
    "stream_drain": "(b) stream\nupdate between",
    "stream_inflight": "(c) stream\nin flight",
}


@dataclass
class Seq:
    """One sequence (a trajectory once it ends)."""

    group: int
    length: int
    start_step: int = -1  # the actor step that samples its first token
    end_time: float = 0.0
    runs: list[tuple[int, int]] = field(default_factory=list)  # (version, tokens), oldest first

    @property
    def oldest(self) -> int:
        return self.runs[0][0]


class Sim:
    """The event loop: a heap of (time, order, action); ties run in the order they were scheduled."""

    def __init__(self) -> None:
        self.now, self._order, self._heap = 0.0, 0, []

    def at(self, t: float, action: Callable[[], None]) -> None:
        self._order += 1
        heapq.heappush(self._heap, (t, self._order, action))

    def run(self, done: Callable[[], bool]) -> None:
        while self._heap and not done():
            self.now, _, action = heapq.heappop(self._heap)
            action()


class Pipeline:
    """Actor, scorer and learner around two bounded work streams (assumptions 1-8)."""

    def __init__(self, setup: Setup, costs: Costs, policy: Policy, seed: int):
        if setup.depth < setup.batch_size or setup.slots < setup.n:
            raise ValueError(
                "broker.max_depth must hold a learner batch and max_inflight a group (opd/config)"
            )
        self.s, self.c, self.p = setup, costs, policy
        # slots a decode step has: the batch actor's batch, or max_inflight
        self.width = setup.prompts_per_batch * setup.n if policy.admit == "batch" else setup.slots
        self.sim = Sim()
        self.lengths = random.Random(seed)
        self.sigma = math.log(setup.p99_over_p50) / Z99
        # work streams: trajectories queued, and those read but not acknowledged (they count in the depth too)
        self.rollouts: deque[Seq] = deque()
        self.scoring: list[Seq] = []  # read by the scorer, being scored
        self.holding: list[Seq] = []  # scored, not yet appended to the scored stream (score-ahead)
        self.max_holding = 0
        self.scored: deque[Seq] = deque()
        self.training: list[Seq] = []
        # actor
        self.version = self.available = 0
        self.step_no = 0
        self.version_from: list[tuple[int, int]] = [(0, 0)]  # (first actor step, version held from it)
        self.inflight: dict[int, list[Seq]] = {}  # last step of each sequence -> sequences
        self.n_inflight = 0
        self.finished: dict[int, list[Seq]] = {}  # group -> members ended so far
        self.held: list[Seq] = []  # batch publication: ended, waiting for the batch's end
        self.outbox: deque[Seq] = deque()
        self.groups = 0
        self.actor_busy = self.scorer_busy = self.learner_busy = False
        # learner
        self.learner_version = 0
        self.idle_since = 0.0
        self.steps: list[dict] = []
        # accounting for the measurement window
        self.decode_log: list[tuple[float, float, int]] = []  # (start, end, busy slots) of each decode step
        self.actor_log: list[tuple[float, float, str]] = []  # (start, end, "apply") of other actor work
        self.dropped: list[tuple[float, Seq]] = []
        self.published: list[tuple[float, Seq]] = []

    # ---- the actor --------------------------------------------------------------------------------------------
    def versions_ahead(self) -> float:
        depth = self.rollouts_depth() + len(self.scored) + len(self.training)
        return depth / (self.s.batch_size * self.s.sync_every)

    def rollouts_depth(self) -> int:
        """Unacknowledged rollouts: queued, being scored, or scored and held by the scorer."""
        return len(self.rollouts) + len(self.scoring) + len(self.holding)

    def blocked(self) -> bool:
        """Admission stops: the outbox waits for room, or new samples would be too stale (actors/actor.py)."""
        return bool(self.outbox) or self.versions_ahead() >= self.s.max_staleness + 1

    def draw(self) -> list[Seq]:
        """One prompt: sampling.n sequences, lengths from the seeded log-normal (assumption 7)."""
        mu = math.log(self.s.p50)
        group = []
        for _ in range(self.s.n):
            length = round(self.lengths.lognormvariate(mu, self.sigma))
            group.append(Seq(self.groups, min(max(length, 1), self.s.max_new_tokens)))
        self.groups += 1
        return group

    def actor_boundary(self) -> None:
        """Between two decode steps: publish, maybe apply weights, admit, then the next step or idle."""
        self.actor_busy = True
        self.flush()
        p = self.p
        if self.n_inflight == 0 and self.blocked():
            self.actor_busy = False  # nothing to decode until the streams move (a wake comes with them)
            return
        if self.available > self.version and (p.apply == "step" or self.n_inflight == 0):
            start, self.version = self.sim.now, self.available
            self.version_from.append((self.step_no, self.version))
            self.actor_log.append((start, start + self.c.actor_apply_s, "apply"))
            self.sim.at(start + self.c.actor_apply_s, self.actor_boundary)
            return
        prefill = self.admit()
        if self.n_inflight == 0:
            self.actor_busy = False
            return
        end = self.sim.now + self.c.decode_step_s + prefill * self.c.prefill_s_per_token
        self.decode_log.append((self.sim.now, end, self.n_inflight))
        self.sim.at(end, self.decode_step_done)

    def admit(self) -> int:
        """Start whole groups in free slots as the policy allows (a group needs n free slots, as
        actors/streaming.py admits them); returns the prompt tokens to prefill."""
        p, s = self.p, self.s
        if self.blocked() or (p.drain and self.available > self.version):
            return 0
        if p.admit == "batch":
            groups = 0 if self.n_inflight else s.prompts_per_batch
        else:
            groups = (s.slots - self.n_inflight) // s.n
        started = 0
        for _ in range(groups):
            for seq in self.draw():
                seq.start_step = self.step_no
                self.inflight.setdefault(self.step_no + seq.length - 1, []).append(seq)
                started += 1
        self.n_inflight += started
        return started * s.prompt_tokens

    def decode_step_done(self) -> None:
        ended = self.inflight.pop(self.step_no, [])
        self.step_no += 1
        self.n_inflight -= len(ended)
        for seq in ended:
            seq.end_time, seq.runs = self.sim.now, self.token_versions(seq)
            if self.p.publish == "batch":
                self.held.append(seq)
                continue
            members = self.finished.setdefault(seq.group, [])
            members.append(seq)
            if len(members) == self.s.n:
                self.publish(self.finished.pop(seq.group))
        if self.p.publish == "batch" and self.n_inflight == 0:
            self.publish(self.held)
            self.held = []
        self.actor_boundary()

    def token_versions(self, seq: Seq) -> list[tuple[int, int]]:
        """(version, tokens) runs of the actor steps start_step .. start_step + length - 1."""
        first, last, runs = seq.start_step, seq.start_step + seq.length - 1, []
        i0 = max(bisect.bisect_right(self.version_from, (first, math.inf)) - 1, 0)
        for i in range(i0, len(self.version_from)):
            from_step, version = self.version_from[i]
            if from_step > last:
                break
            until = self.version_from[i + 1][0] - 1 if i + 1 < len(self.version_from) else last
            lo, hi = max(first, from_step), min(last, until)
            if lo <= hi:
                runs.append((version, hi - lo + 1))
        return runs

    def publish(self, seqs: list[Seq]) -> None:
        for seq in sorted(seqs, key=lambda q: (q.group, q.start_step)):
            self.published.append((self.sim.now, seq))
            self.outbox.append(seq)

    def flush(self) -> None:
        """The outbox into the rollouts stream, as far as broker.max_depth lets it."""
        moved = False
        while self.outbox and self.rollouts_depth() < self.s.depth:
            self.rollouts.append(self.outbox.popleft())
            moved = True
        if moved:
            self.wake("scorer")

    # ---- the scorer and the learner ---------------------------------------------------------------------------
    def scorer_loop(self) -> None:
        """One turn of the scorer's loop (assumption 3): take and score what is there while it holds less than a
        batch, else append what the scored stream has room for; idle when it can do neither."""
        self.scorer_busy = True
        while True:
            room = self.s.scorer_batch - len(self.holding)
            if room > 0 and self.rollouts:  # what is there now: no waiting for more
                while self.rollouts and len(self.scoring) < room:
                    self.scoring.append(self.rollouts.popleft())
                tokens = sum(q.length for q in self.scoring)
                self.sim.at(self.sim.now + tokens * self.c.scorer_s_per_token, self.scorer_scored)
                return
            if not self.scorer_append():
                # it polls: a flush into the rollouts stream or room in the scored stream wakes it (wake)
                self.scorer_busy = False
                return

    def scorer_scored(self) -> None:
        self.holding += self.scoring
        self.scoring = []
        self.max_holding = max(self.max_holding, len(self.holding))
        self.scorer_append()
        self.scorer_loop()

    def scorer_append(self) -> int:
        """Held copies into the scored stream, in order, as far as broker.max_depth lets them; each one appended
        acknowledges its rollout (until then it counts in the rollouts stream's depth)."""
        moved = 0
        while self.holding and len(self.scored) + len(self.training) < self.s.depth:
            self.scored.append(self.holding.pop(0))
            moved += 1
        if moved:
            self.wake("learner")
            self.wake("actor")  # the rollouts stream's depth fell
        return moved

    def learner_take(self) -> None:
        self.learner_busy = True
        while self.scored and len(self.training) < self.s.batch_size:
            seq = self.scored.popleft()
            if self.learner_version - seq.oldest > self.s.max_staleness:  # learner/intake.py: dropped, acked
                self.dropped.append((self.sim.now, seq))
            else:
                self.training.append(seq)
        self.wake("scorer")
        self.wake("actor")
        if len(self.training) < self.s.batch_size:
            self.learner_busy = False
            return
        tokens = sum(q.length for q in self.training)
        start, train_s = self.sim.now, tokens * self.c.learner_s_per_token
        broadcast = (self.learner_version + 1) % self.s.sync_every == 0
        sync_s = self.c.learner_sync_s if broadcast else 0.0
        lags = Counter()
        for q in self.training:
            for version, count in q.runs:
                lags[self.learner_version - version] += count
        self.steps.append(
            {
                "step": len(self.steps) + 1,
                "start": start,
                "wait_s": start - self.idle_since,
                "train_s": train_s,
                "sync_s": sync_s,
                "broadcast": broadcast,
                "tokens": tokens,
                "token_lags": lags,
                "trajectory_lags": [self.learner_version - q.oldest for q in self.training],
                "versions_per_trajectory": [len(q.runs) for q in self.training],
            }
        )
        self.sim.at(start + train_s, self.learner_trained)

    def learner_trained(self) -> None:
        self.training = []
        self.learner_version += 1
        self.wake("scorer")
        self.wake("actor")
        sync_s = self.steps[-1]["sync_s"]
        self.sim.at(self.sim.now + sync_s, self.learner_synced)

    def learner_synced(self) -> None:
        self.steps[-1]["time"] = self.idle_since = self.sim.now
        if self.steps[-1]["broadcast"]:
            self.available = self.learner_version
            self.wake("actor")
        if len(self.steps) < self.s.steps:
            self.learner_take()

    def wake(self, who: str) -> None:
        """Run an idle component at the current time (after whatever runs now: no re-entry)."""
        busy, action = {
            "actor": (self.actor_busy, self.actor_boundary),
            "scorer": (self.scorer_busy, self.scorer_loop),
            "learner": (self.learner_busy, self.learner_take),
        }[who]
        if not busy:
            setattr(self, f"{who}_busy", True)
            self.sim.at(self.sim.now, action)

    def run(self) -> Pipeline:
        self.wake("actor")
        self.sim.run(lambda: len(self.steps) >= self.s.steps and "time" in self.steps[-1])
        if len(self.steps) < self.s.steps:
            raise RuntimeError(f"{self.p.name}: the pipeline stalled after {len(self.steps)} learner steps")
        return self


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def measure(pipe: Pipeline) -> dict:
    """The policy's numbers over the steps after the warm-up (the module docstring defines each)."""
    s = pipe.s
    t0, t1 = pipe.steps[s.skip - 1]["time"], pipe.steps[-1]["time"]
    steps = pipe.steps[s.skip :]
    seconds = t1 - t0
    lags, traj_lags, versions = Counter(), [], []
    for r in steps:
        lags.update(r["token_lags"])
        traj_lags += r["trajectory_lags"]
        versions += r["versions_per_trajectory"]
    tokens = sum(r["tokens"] for r in steps)
    generated = busy_steps = slot_steps = 0.0
    for start, end, busy in pipe.decode_log:
        share = overlap(start, end, t0, t1) / (end - start)
        generated += busy * share
        busy_steps += busy * share
        slot_steps += pipe.width * share
    decoding = sum(overlap(a, b, t0, t1) for a, b, _ in pipe.decode_log)
    applying = sum(overlap(a, b, t0, t1) for a, b, _ in pipe.actor_log)
    wait = sum(r["wait_s"] for r in steps)
    busy = sum(r["train_s"] + r["sync_s"] for r in steps)
    dropped = [q for t, q in pipe.dropped if t0 < t <= t1]
    delays = [t - q.end_time for t, q in pipe.published if t0 < t <= t1]
    max_lag = max(lags)
    return {
        "steps": len(steps),
        "seconds": seconds,
        "trained_tokens": tokens,
        "trained_tokens_per_s": tokens / seconds,
        "generated_tokens_per_s": generated / seconds,
        "learner_wait_fraction": wait / (wait + busy),
        "token_lag_mean": sum(k * v for k, v in lags.items()) / sum(lags.values()),
        "token_lag_max": max_lag,
        "token_lag_histogram": [lags.get(k, 0) for k in range(max_lag + 1)],
        "trajectory_lag_mean": sum(traj_lags) / len(traj_lags),
        "trajectory_lag_max": max(traj_lags),
        "versions_per_trajectory_mean": sum(versions) / len(versions),
        "dropped_stale_trajectories": len(dropped),
        "dropped_stale_tokens": sum(q.length for q in dropped),
        # which ones: the oldest-token rule drops sequences that decoded across many versions, the long ones
        "dropped_mean_length": sum(q.length for q in dropped) / len(dropped) if dropped else 0.0,
        "trained_mean_length": tokens / sum(len(r["trajectory_lags"]) for r in steps),
        "slot_occupancy": busy_steps / slot_steps if slot_steps else 0.0,
        "actor_decoding_fraction": decoding / seconds,
        "actor_applying_fraction": applying / seconds,
        "actor_idle_fraction": 1.0 - (decoding + applying) / seconds,
        "publish_delay_mean_s": sum(delays) / len(delays) if delays else 0.0,
        # a close-up: the first few learner steps after the warm-up (the whole run would be a blur)
        "occupancy_timeline": timeline(pipe, t0, pipe.steps[min(s.skip + 8, len(pipe.steps)) - 1]["time"]),
    }


def timeline(pipe: Pipeline, t0: float, t1: float, bins: int = 200) -> list[list[float]]:
    """Slot occupancy (busy slots / max_inflight, idle time counts 0) in `bins` equal windows of [t0, t1]."""
    width, out = (t1 - t0) / bins, []
    logs = pipe.decode_log
    j = 0
    for b in range(bins):
        lo, hi, acc = t0 + b * width, t0 + (b + 1) * width, 0.0
        while j < len(logs) and logs[j][1] <= lo:
            j += 1
        k = j
        while k < len(logs) and logs[k][0] < hi:
            acc += overlap(logs[k][0], logs[k][1], lo, hi) * logs[k][2]
            k += 1
        out.append([round(lo - t0, 3), round(acc / (width * pipe.width), 4)])
    return out


def simulate(setup: Setup, costs: Costs, seeds: list[int]) -> dict:
    """Every policy on every seed; per policy the mean over seeds and each seed's numbers."""
    out: dict = {}
    for name, policy in POLICIES.items():
        runs = [measure(Pipeline(setup, costs, policy, seed).run()) for seed in seeds]
        scalar = [k for k, v in runs[0].items() if isinstance(v, int | float)]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in scalar}
        mean["token_lag_max"] = max(r["token_lag_max"] for r in runs)
        mean["trajectory_lag_max"] = max(r["trajectory_lag_max"] for r in runs)
        width = max(len(r["token_lag_histogram"]) for r in runs)
        mean["token_lag_histogram"] = [
            sum(r["token_lag_histogram"][k] for r in runs if k < len(r["token_lag_histogram"]))
            for k in range(width)
        ]
        mean["occupancy_timeline"] = runs[0]["occupancy_timeline"]  # the first seed's
        out[name] = {"mean": mean, "per_seed": [{k: r[k] for k in scalar} for r in runs]}
    return out


SWEEP = (  # one change each from the headline setup
    {},  # none: the headline setup at the sweep's seed and steps, what the other rows compare with
    {"p99_over_p50": 1.0},  # no tail: every response p50 tokens long
    {"p99_over_p50": 4.0},
    {"p99_over_p50": 16.0},
    {"max_depth": 128},  # two learner batches per work stream
    {"max_depth": 128, "max_staleness": 8},
    {"decode_x": 4.0},  # generation-bound: each decode step (and prefill) 4x the calibrated cost
)


def sweep(setup: Setup, costs: Costs, steps: int) -> list[dict]:
    """The three policies with one key changed at a time (seed 0, `steps` learner steps): where the gain comes from."""
    rows = []
    for change in SWEEP:
        keys = {k: v for k, v in change.items() if k != "decode_x"}
        variant = replace(setup, steps=steps, **keys)
        x = change.get("decode_x", 1.0)
        cost = replace(
            costs, decode_step_s=x * costs.decode_step_s, prefill_s_per_token=x * costs.prefill_s_per_token
        )
        row: dict = {"change": change}
        for name, policy in POLICIES.items():
            m = measure(Pipeline(variant, cost, policy, 0).run())
            row[name] = {
                k: m[k]
                for k in (
                    "trained_tokens_per_s",
                    "generated_tokens_per_s",
                    "learner_wait_fraction",
                    "token_lag_mean",
                    "token_lag_max",
                    "dropped_stale_tokens",
                    "dropped_mean_length",
                    "trained_mean_length",
                    "slot_occupancy",
                )
            }
            row[name]["dropped_token_share"] = m["dropped_stale_tokens"] / (
                m["dropped_stale_tokens"] + m["trained_tokens"]
            )
        row["c_over_a"] = (
            row["stream_inflight"]["trained_tokens_per_s"] / row["batch"]["trained_tokens_per_s"]
        )
        rows.append(row)
    return rows


def print_sweep(rows: list[dict]) -> None:
    print("\n| change (seed 0) | trained tok/s (a) / (b) / (c) | (c)/(a) | token lag mean (a) / (b) / (c) "
          "| token lag max (a) / (b) / (c) | learner wait (a) / (b) / (c) | dropped tokens (c) "
          "| mean length dropped / trained (c) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ms, c = [r[n] for n in POLICIES], r["stream_inflight"]
        change = ", ".join(f"{k} {v:g}" for k, v in r["change"].items()) or "none"
        print(
            f"| {change} | {slash(ms, 'trained_tokens_per_s', '.0f')} | {r['c_over_a']:.2f} "
            f"| {slash(ms, 'token_lag_mean', '.2f')} | {slash(ms, 'token_lag_max', 'd')} "
            f"| {slash(ms, 'learner_wait_fraction', '.2f')} "
            f"| {100 * c['dropped_token_share']:.1f}% | {c['dropped_mean_length']:.0f} / {c['trained_mean_length']:.0f} |"
        )


def slash(ms: list[dict], key: str, spec: str) -> str:
    return " / ".join(format(m[key], spec) for m in ms)


def ratios(modes: dict) -> dict:
    a, b, c = (modes[m]["mean"] for m in POLICIES)
    per_seed = [
        c_["trained_tokens_per_s"] / a_["trained_tokens_per_s"]
        for a_, c_ in zip(modes["batch"]["per_seed"], modes["stream_inflight"]["per_seed"], strict=True)
    ]
    c_over_a = c["trained_tokens_per_s"] / a["trained_tokens_per_s"]
    return {
        "c_over_a_trained_tokens_per_s": c_over_a,
        "c_over_a_per_seed": per_seed,
        "b_over_a_trained_tokens_per_s": b["trained_tokens_per_s"] / a["trained_tokens_per_s"],
        "c_over_b_trained_tokens_per_s": c["trained_tokens_per_s"] / b["trained_tokens_per_s"],
        "target_throughput_met": min(per_seed) >= 1.5,
        "target_lag_mean_met": c["token_lag_mean"] <= a["token_lag_mean"],
        "target_lag_max_met": c["token_lag_max"] <= a["token_lag_max"],
    }


# ---- calibration (assumption 9) ---------------------------------------------------------------------------------
def calibrate(cache_dir: str, steps: int, skip: int, work: Path, setup: Setup) -> tuple[Costs, dict]:
    """A real plain sync run of configs/tiny.yaml; each stage's cost from its summary.json and metrics.jsonl."""
    from opd.config import load_config

    cfg = load_config(CONFIG)
    overrides = [
        f"run.cache_dir={cache_dir}",
        "run.progress=false",
        "learner.eval_every=0",
        "learner.checkpoint_every=0",
        "learner.replay_log=false",
        "pipeline.mode=sync",
        f"learner.max_steps={steps}",
    ]
    run = run_opd(overrides, work / "calibration", timeout_s=900)
    comps = run["summary"]["components"]
    actor = next(v for k, v in comps.items() if k.startswith("actor-"))
    scorer = next(v for k, v in comps.items() if k.startswith("scorer-"))
    per_batch = cfg.actor.prompts_per_batch * cfg.sampling.n
    batches = actor["trajectories_generated"] / per_batch
    records = [r for r in run["records"] if r["step"] > skip]
    decode = actor["generate_seconds"] / (batches * cfg.sampling.max_new_tokens)
    costs = Costs(
        decode_step_s=decode,
        prefill_s_per_token=decode / setup.slots,
        scorer_s_per_token=scorer["score_seconds"] / scorer["tokens_scored"],
        learner_s_per_token=sum(r["step_seconds"] for r in records) / sum(r["tokens"] for r in records),
        learner_sync_s=sum(r.get("weight_sync_seconds", 0.0) for r in records) / len(records),
        actor_apply_s=actor.get("weight_sync_seconds", 0.0) / max(actor.get("weight_syncs", 0), 1),
    )
    facts = {
        "overrides": overrides,
        "batches": batches,
        "tokens_generated": actor["tokens_generated"],
        "generate_seconds": actor["generate_seconds"],
        "load_1min_mean": sum(run["load_1min"]) / max(len(run["load_1min"]), 1),
        "wall_s": run["wall_s"],
    }
    return costs, facts


# ---- real runs (once the streaming actor is on main) ------------------------------------------------------------
REAL_MODES = {
    "batch": ["actor.generation=batch"],
    "stream": ["actor.generation=stream", "actor.on_new_weights=continue"],
}


def real_runs(args: argparse.Namespace, work: Path) -> dict:
    """`opd run configs/tiny.yaml` with the batch and the streaming actor, `--real-seeds` seeds each: final
    held-out accuracy (summary.json), trained tokens/s and lag (metrics.jsonl, as pipeline.py measures them)."""
    common = [
        f"run.cache_dir={args.cache_dir}",
        "run.progress=false",
        "learner.eval_every=0",  # the final evaluation still runs: summary.json's student_accuracy_after
        "learner.checkpoint_every=0",
        "learner.replay_log=false",
        *args.extra,
    ]
    out: dict = {}
    for mode, keys in REAL_MODES.items():
        out[mode] = []
        for seed in range(args.real_seeds):
            print(f"real {mode} seed {seed} ...", flush=True)
            run = run_opd([*common, *keys, f"run.seed={seed}"], work / f"real-{mode}-{seed}", timeout_s=900)
            m = steady(run["records"], args.skip)
            m.update(lag_figures(run["records"], args.skip))
            comps = run["summary"].get("components", {})
            busy = sum(v.get("slot_busy_steps", 0) for k, v in comps.items() if k.startswith("actor-"))
            slots = sum(v.get("slot_steps", 0) for k, v in comps.items() if k.startswith("actor-"))
            m["slot_occupancy"] = busy / slots if slots else None  # the streaming actor counts slot steps
            m["seed"] = seed
            m["student_accuracy_after"] = run["summary"].get("student_accuracy_after")
            m["student_accuracy_before"] = run["summary"].get("student_accuracy_before")
            m["dropped_stale"] = run["summary"].get("dropped_stale")
            m["load_1min_mean"] = sum(run["load_1min"]) / max(len(run["load_1min"]), 1)
            m["opd_run_wall_s"] = run["wall_s"]
            out[mode].append(m)
    return out


def lag_figures(records: list[dict], skip: int) -> dict:
    """Lag over the measured steps from metrics.jsonl's lag_histogram: per token once the learner counts tokens
    (staleness_mean/_max and lag_histogram then count response tokens), per trajectory before."""
    steps = [r for r in records if r["step"] > skip]
    width = max(len(r["lag_histogram"]) for r in steps)
    hist = [sum(r["lag_histogram"][k] for r in steps if k < len(r["lag_histogram"])) for k in range(width)]
    out = {
        "lag_histogram": hist,
        "lag_mean": sum(k * h for k, h in enumerate(hist)) / sum(hist),
        "lag_max": max(r["staleness_max"] for r in steps),
        "lag_counts_tokens": "versions_per_trajectory" in steps[0],
    }
    if out["lag_counts_tokens"]:
        out["versions_per_trajectory"] = sum(r["versions_per_trajectory"] for r in steps) / len(steps)
    return out


def real_summary(real: dict) -> dict:
    """Per actor the mean over seeds, and stream over batch."""

    def mean(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    out = {
        mode: {
            "student_accuracy_after": mean(runs, "student_accuracy_after"),
            "student_accuracy_after_per_seed": [r["student_accuracy_after"] for r in runs],
            "trained_tokens_per_s": mean(runs, "trained_tokens_per_s"),
            "wait_fraction": mean(runs, "wait_fraction"),
            "lag_mean": mean(runs, "lag_mean"),
            "lag_max": max(r["lag_max"] for r in runs),
        }
        for mode, runs in real.items()
    }
    out["stream_over_batch_trained_tokens_per_s"] = (
        out["stream"]["trained_tokens_per_s"] / out["batch"]["trained_tokens_per_s"]
    )
    return out


def print_real(real: dict) -> None:
    print("\n| actor | seed | final accuracy | trained tok/s | learner wait | lag mean / max | lag counts "
          "| versions / traj | slot occupancy | dropped stale | load (1 min) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for mode, runs in real.items():
        for m in runs:
            occ = "-" if m["slot_occupancy"] is None else f"{m['slot_occupancy']:.2f}"
            print(
                f"| {mode} | {m['seed']} | {m['student_accuracy_after']:.3f} | {m['trained_tokens_per_s']:.0f} "
                f"| {m['wait_fraction']:.2f} | {m['lag_mean']:.2f} / {m['lag_max']} "
                f"| {'tokens' if m['lag_counts_tokens'] else 'trajectories'} "
                f"| {m.get('versions_per_trajectory', 1.0):.2f} | {occ} | {m['dropped_stale']} "
                f"| {m['load_1min_mean']:.1f} |"
            )


# ---- report -----------------------------------------------------------------------------------------------------
def machine() -> dict:
    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def print_tables(res: dict) -> None:
    c, s = res["costs"], res["setup"]
    m = res["machine"]
    print(
        f"\nmachine: {m['cpus']} CPUs ({m['cpu_model']}), {m['platform']}, Python {m['python']}; load average "
        f"(1/5/15 min) {' '.join(f'{x:.2f}' for x in res['load_before'])} before, "
        f"{' '.join(f'{x:.2f}' for x in res['load_after'])} after"
    )
    print(
        f"service times ({res['costs_source']}): decode step {1000 * c['decode_step_s']:.2f} ms, prefill "
        f"{1000 * c['prefill_s_per_token']:.4f} ms/prompt token, scorer {1000 * c['scorer_s_per_token']:.3f} "
        f"ms/token, learner {1000 * c['learner_s_per_token']:.3f} ms/token, broadcast "
        f"{1000 * c['learner_sync_s']:.2f} ms, actor apply {1000 * c['actor_apply_s']:.2f} ms"
    )
    lengths = res["lengths"]
    print(
        f"lengths: log-normal p50 {s['p50']:g}, p99/p50 {s['p99_over_p50']:g} (drawn: p50 {lengths['p50']:.0f}, "
        f"p99 {lengths['p99']:.0f}, mean {lengths['mean']:.0f}, max {lengths['max']}); max_inflight "
        f"{res['slots']}, learner batch {s['batch_size']}, weight_sync.every {s['sync_every']}, max_staleness "
        f"{s['max_staleness']}, max_depth {res['depth']}; {s['steps']} steps ({s['skip']} warm-up), seeds "
        f"{res['seeds']}"
    )
    print(
        "\n| actor | trained tok/s | generated tok/s | learner wait | token lag mean / max | oldest-token lag "
        "mean / max | dropped stale (traj) | slot occupancy | actor idle | versions / traj | publish delay (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, mode in res["modes"].items():
        r = mode["mean"]
        print(
            f"| {LABELS[name]} | {r['trained_tokens_per_s']:.0f} | {r['generated_tokens_per_s']:.0f} "
            f"| {r['learner_wait_fraction']:.2f} | {r['token_lag_mean']:.2f} / {r['token_lag_max']} "
            f"| {r['trajectory_lag_mean']:.2f} / {r['trajectory_lag_max']} | {r['dropped_stale_trajectories']:.1f} "
            f"| {r['slot_occupancy']:.2f} | {r['actor_idle_fraction']:.2f} | {r['versions_per_trajectory_mean']:.2f} "
            f"| {r['publish_delay_mean_s']:.2f} |"
        )
    q = res["ratios"]
    per_seed = ", ".join(f"{x:.2f}" for x in q["c_over_a_per_seed"])
    print(
        f"\n(c)/(a) trained tok/s {q['c_over_a_trained_tokens_per_s']:.2f} (per seed {per_seed}); (b)/(a) "
        f"{q['b_over_a_trained_tokens_per_s']:.2f}; (c)/(b) {q['c_over_b_trained_tokens_per_s']:.2f}"
    )
    verdict = {True: "PASS", False: "FAIL"}
    print(
        f"target (c) >= 1.5x (a) trained tok/s on every seed: {verdict[q['target_throughput_met']]}; token lag "
        f"mean no worse than (a): {verdict[q['target_lag_mean_met']]}; token lag max no worse than (a): "
        f"{verdict[q['target_lag_max_met']]}"
    )


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["modes"])
    means = [res["modes"][n]["mean"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    xs = range(len(names))
    axes[0].bar([x - 0.2 for x in xs], [m["generated_tokens_per_s"] for m in means], 0.4, label="generated")
    axes[0].bar([x + 0.2 for x in xs], [m["trained_tokens_per_s"] for m in means], 0.4, label="trained")
    axes[0].set_xticks(list(xs), [SHORT[n] for n in names], fontsize=9)
    axes[0].set_title("tokens/s (simulated, calibrated service times)")
    axes[0].legend()
    for x, m in zip(xs, means, strict=True):
        ratio = m["trained_tokens_per_s"] / means[0]["trained_tokens_per_s"]
        axes[0].annotate(f"x{ratio:.2f}", (x + 0.2, m["trained_tokens_per_s"]), ha="center", va="bottom")
    width = 0.8 / len(names)
    for i, (n, m) in enumerate(zip(names, means, strict=True)):
        hist = m["token_lag_histogram"]
        total = sum(hist)
        axes[1].bar(
            [k + (i - (len(names) - 1) / 2) * width for k in range(len(hist))],
            [h / total for h in hist],
            width,
            label=f"{LABELS[n]} (mean {m['token_lag_mean']:.2f})",
        )
    axes[1].set_xlabel("token lag (learner version - token version)")
    axes[1].set_ylabel("share of trained tokens")
    axes[1].set_title("token lag distribution")
    axes[1].legend(fontsize=8)
    for n, m in zip(names, means, strict=True):
        tl = m["occupancy_timeline"]
        axes[2].plot([t for t, _ in tl], [o for _, o in tl], label=LABELS[n], lw=1)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xlabel("simulated seconds after the warm-up (first 8 learner steps, seed 0)")
    axes[2].set_title("slot occupancy (busy slots / max_inflight; idle = 0)")
    axes[2].legend(fontsize=8)
    s = res["setup"]
    fig.suptitle(
        f"streaming actors: log-normal lengths p50 {s['p50']:g}, p99/p50 {s['p99_over_p50']:g}, "
        f"max_inflight {res['slots']}, seeds {res['seeds']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def length_facts(setup: Setup, seed: int, count: int = 20000) -> dict:
    """Percentiles of the lengths the run draws (the same generator and clipping as Pipeline.draw)."""
    pipe = Pipeline(setup, DEFAULT_COSTS, POLICIES["batch"], seed)
    xs = sorted(q.length for _ in range(count // setup.n) for q in pipe.draw())
    return {
        "p50": xs[len(xs) // 2],
        "p99": xs[int(0.99 * len(xs))],
        "mean": sum(xs) / len(xs),
        "max": xs[-1],
        "clipped_share": sum(x == setup.max_new_tokens for x in xs) / len(xs),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default benchmarks/results/streaming.json (--real: streaming_real.json)",
    )
    p.add_argument("--p50", type=float, default=Setup.p50, help="median response length (tokens)")
    p.add_argument("--p99-over-p50", type=float, default=Setup.p99_over_p50, help="the tail: p99 / p50")
    p.add_argument("--max-new-tokens", type=int, default=Setup.max_new_tokens, help="lengths clipped here")
    p.add_argument("--prompt-tokens", type=int, default=Setup.prompt_tokens)
    p.add_argument("--max-inflight", type=int, default=None, help="default prompts_per_batch x n")
    p.add_argument("--max-depth", type=int, default=None, help="broker.max_depth; default learner batch")
    p.add_argument("--max-staleness", type=int, default=Setup.max_staleness)
    p.add_argument("--sync-every", type=int, default=Setup.sync_every, help="weight_sync.every")
    p.add_argument("--steps", type=int, default=Setup.steps, help="learner steps simulated per run")
    p.add_argument("--skip", type=int, default=Setup.skip, help="warm-up steps left out")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per policy")
    p.add_argument("--no-calibrate", action="store_true", help="use the stored DEFAULT_COSTS")
    p.add_argument("--calibrate-only", action="store_true", help="print the calibrated costs and stop")
    p.add_argument("--calibration-steps", type=int, default=50, help="learner steps of the calibration run")
    p.add_argument("--cache-dir", default=".cache/opd", help="run.cache_dir for real runs")
    p.add_argument("--smoke", action="store_true", help="stored costs, 30 steps, 1 seed: checks the script")
    p.add_argument("--real", action="store_true", help="real opd runs: actor.generation batch vs stream")
    p.add_argument("--real-seeds", type=int, default=2)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every real run (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    if args.smoke:
        args.no_calibrate, args.steps, args.skip, args.seeds = True, 30, 5, 1
    return args


def simulation(args: argparse.Namespace, res: dict, work: Path) -> bool:
    """The simulated benchmark into `res`; False when only calibrating."""
    setup = Setup(
        max_inflight=args.max_inflight,
        max_depth=args.max_depth,
        max_staleness=args.max_staleness,
        sync_every=args.sync_every,
        prompt_tokens=args.prompt_tokens,
        p50=args.p50,
        p99_over_p50=args.p99_over_p50,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        skip=args.skip,
    )
    if args.no_calibrate:  # prefill follows max_inflight (assumption 9)
        costs = replace(DEFAULT_COSTS, prefill_s_per_token=DEFAULT_COSTS.decode_step_s / setup.slots)
        res["costs_source"] = "stored defaults"
    else:
        print(
            f"calibrating: a plain sync run of {CONFIG.name}, {args.calibration_steps} steps ...", flush=True
        )
        costs, res["calibration"] = calibrate(args.cache_dir, args.calibration_steps, 5, work, setup)
        print(costs, f"(load 1 min {res['calibration']['load_1min_mean']:.1f})", flush=True)
        if args.calibrate_only:
            return False
        res["costs_source"] = "calibrated from a plain sync run of configs/tiny.yaml"
    seeds = list(range(args.seeds))
    res.update(setup=asdict(setup), slots=setup.slots, depth=setup.depth, costs=asdict(costs), seeds=seeds)
    res["lengths"] = length_facts(setup, 0)
    res["modes"] = simulate(setup, costs, seeds)
    res["ratios"] = ratios(res["modes"])
    res["sweep_steps"] = min(args.steps, 80)
    res["sweep"] = sweep(setup, costs, res["sweep_steps"])
    res["load_after"] = list(os.getloadavg())
    print_tables(res)
    print_sweep(res["sweep"])
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = args.out or RESULTS / ("streaming_real.json" if args.real else "streaming.json")
    started, work = time.time(), Path(tempfile.mkdtemp(prefix="opd-bench-streaming-"))
    res: dict = {
        "benchmark": "streaming_real" if args.real else "streaming",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_before": list(os.getloadavg()),
        "smoke": args.smoke,
    }
    try:
        if args.real:
            res["skip"] = args.skip
            res["runs"] = real_runs(args, work)
            res["summary"] = real_summary(res["runs"])
            res["load_after"] = list(os.getloadavg())
            print_real(res["runs"])
            print(json.dumps(res["summary"], indent=1))
        elif not simulation(args, res, work):
            return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["wall_seconds"] = time.time() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}", end="")
    if not args.real:
        plot(res, out.with_suffix(".png"))
        print(f" and {out.with_suffix('.png')}", end="")
    print(f" in {res['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
