"""Which teachers score a trajectory, and how it reaches them: the actor's side of several teachers.

A run with a `teachers` section routes each trajectory by its prompt's metadata (`routing.field`, read from
`Trajectory.task`) to one teacher or to a weighted mixture, stamps the normalised route on it (`teacher_weights`)
and publishes one copy to the rollouts stream of every teacher in the route: each pool consumes only its own
stream, so a pool scales and fails on its own. A run without the section is exactly as before: no route, one
`rollouts` stream, the same message fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from broker import Broker
from opd.config import Config
from opd.protocol import DEFAULT_TEACHER, Streams, Trajectory
from opd.tasks import Problem

TASK_KEY = "task"  # Trajectory.task's key for the task's name (routing.field's default)


@dataclass(frozen=True)
class Copy:
    """One trajectory's copy for one teacher: where it goes and its place in that stream's batch."""

    stream: str
    position: int


class Router:
    """A run's routes: the metadata a trajectory carries for them, its route, and its copies' streams."""

    def __init__(self, cfg: Config):
        self.enabled = cfg.teachers is not None
        self.routing = cfg.routing
        self.task_name = cfg.task.kind
        self.names = list(cfg.teacher_pools())
        streams = Streams(cfg.run.run_id)
        self.streams = {name: streams.rollouts_for(name) for name in self.names}

    def metadata(self, problem: Problem) -> dict[str, str]:
        """Trajectory.task for `problem`: the reference answer (what the verifier reads) and, with teachers, the
        task's name and the routing field's value, so the route (and whoever reads the trajectory later) sees
        what picked it. A problem's own metadata (a JSONL row's field) wins over the task's name."""
        task = {"answer": problem.answer or ""}
        if not self.enabled:
            return task
        task[TASK_KEY] = problem.metadata.get(TASK_KEY, self.task_name)
        field = self.routing.field
        if field in problem.metadata:
            task[field] = problem.metadata[field]
        return task

    def stamp(self, traj: Trajectory) -> None:
        """Set the trajectory's route from its metadata (None without teachers: the run's one teacher)."""
        if self.enabled:
            traj.teacher_weights = self.routing.route(traj.task, self.names)

    def copies(self, trajs: list[Trajectory]) -> tuple[dict[str, list[int]], list[list[Copy]]]:
        """The batch split by stream: {stream: indices of trajs it gets, in order} and, per trajectory, its
        copies. Every stream of the run is a key (empty when this batch routes nothing there)."""
        by_stream: dict[str, list[int]] = {s: [] for s in self.streams.values()}
        where: list[list[Copy]] = []
        for i, t in enumerate(trajs):
            names = list(t.teacher_weights) if t.teacher_weights else [DEFAULT_TEACHER]
            mine = []
            for name in names:
                stream = self.streams[name]
                mine.append(Copy(stream, len(by_stream[stream])))
                by_stream[stream].append(i)
            where.append(mine)
        return by_stream, where

    def all_streams(self) -> list[str]:
        return list(self.streams.values())


def publish_fan_out(
    broker: Broker,
    payloads: dict[str, list[bytes]],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    while_waiting: Callable[[], None] = lambda: None,
    poll_s: float = 0.05,
) -> dict[str, int]:
    """Publish each stream's payloads in order, with backpressure per stream (broker.max_depth holds for each):
    a full stream is waited on without holding back the streams that have room, so one slow pool delays only
    its own copies of this batch. Returns how many of each stream's payloads were appended: all of them, or,
    when `should_stop` turned true while some stream was still full, the prefix already sent."""
    sent = dict.fromkeys(payloads, 0)
    while any(sent[s] < len(p) for s, p in payloads.items()):
        progressed = False
        for stream, items in payloads.items():
            if sent[stream] < len(items):
                got = broker.publish(stream, items[sent[stream] :])
                if got:
                    sent[stream] += len(got)
                    progressed = True
        if progressed:
            continue  # room for part of it: try the rest at once, it may have freed up meanwhile
        if should_stop():
            return sent
        while_waiting()
        time.sleep(poll_s)
    return sent


def published(where: list[list[Copy]], sent: dict[str, int]) -> list[int]:
    """Positions of the trajectories with at least one copy appended: they entered the run and must be
    accounted for (a mixture missing a copy is the learner's join timeout to resolve, never silent)."""
    return [i for i, copies in enumerate(where) if any(c.position < sent[c.stream] for c in copies)]
