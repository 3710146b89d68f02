"""Which teachers score a trajectory, and how it reaches them: the actor's side of several teachers.

A run with a `teachers` section routes each trajectory by its prompt's metadata (`routing.field`, read from
`Trajectory.task`) to one teacher or to a weighted mixture, stamps the normalised route on it (`teacher_weights`)
and publishes one copy to the rollouts stream of every teacher in the route: each pool consumes only its own
stream, so a pool scales and fails on its own. A run without the section is exactly as before: no route, one
`rollouts` stream, the same message fields.

A pool that is down (every scorer killed, or stuck) must not stop the others. Its stream fills to
`broker.max_depth`; the copies that do not fit wait in the actor's `Outbox`. While they have waited less than
`stall_s` that is ordinary backpressure: the actor waits, as it always did, so a pool that is merely slower keeps
its share of the prompts. Once a stream has taken none of them for `stall_s` (the actor uses
`supervision.liveness_s`, the time after which the launcher too counts a silent component as gone) its teacher
is *down*: the actor draws its next batches only from prompts whose route avoids every down teacher
(`Router.pick`), skipping the others (counted as `prompts_skipped`; a prompt is not work until a trajectory of
it is published, so nothing accepted is lost, only the task mix shifts while the pool is down), and keeps
offering the waiting copies. As soon as the stream takes one, the teacher is up again and its prompts are drawn
as before. A mixture route that names a down teacher is skipped likewise: it can only train once every teacher
of it scores it (copies already out are the learner's join, `routing.join_timeout_s`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from broker import Broker
from opd.config import Config
from opd.models.prompts import conversation
from opd.protocol import CONVERSATION_KEY, DEFAULT_TEACHER, Streams, Trajectory
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
        # a teacher of another tokenizer renders the prompt's conversation itself (its own chat template)
        self.stamp_conversation = any(p.scorer.tokenizer == "different" for p in cfg.teacher_pools().values())
        streams = Streams(cfg.run.run_id)
        self.streams = {name: streams.rollouts_for(name) for name in self.names}

    def metadata(self, problem: Problem) -> dict[str, str]:
        """Trajectory.task for `problem`: the reference answer (what the verifier reads) and, with teachers, the
        task's name and the routing field's value, so the route (and whoever reads the trajectory later) sees
        what picked it. A problem's own metadata (a JSONL row's field) wins over the task's name. With a teacher
        of another tokenizer, the conversation too (CONVERSATION_KEY), which that teacher renders itself."""
        task = {"answer": problem.answer or ""}
        if self.stamp_conversation:
            task[CONVERSATION_KEY] = json.dumps(conversation(problem), ensure_ascii=False)
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
            mine = []
            for name in targets(t):
                stream = self.streams[name]
                mine.append(Copy(stream, len(by_stream[stream])))
                by_stream[stream].append(i)
            where.append(mine)
        return by_stream, where

    def all_streams(self) -> list[str]:
        return list(self.streams.values())

    def route_names(self, task: dict) -> list[str]:
        """The teachers whose pools score a trajectory with this `task` map ([DEFAULT_TEACHER] without teachers)."""
        return list(self.routing.route(task, self.names)) if self.enabled else [DEFAULT_TEACHER]

    def routes(self) -> list[dict[str, float]]:
        """Every route a prompt can take: the listed ones and the default."""
        return (
            [
                self.routing.route({}, self.names),
                *(self.routing.route({self.routing.field: v}, self.names) for v in self.routing.routes),
            ]
            if self.enabled
            else [{}]
        )

    def reachable(self, down: set[str]) -> bool:
        """Whether some route avoids every down teacher: else drawing prompts would only skip them."""
        return any(not down & set(r) for r in self.routes()) if self.enabled else not down

    def pick(
        self, problems: Iterator[Problem], n: int, down: set[str], max_draws: int
    ) -> tuple[list[Problem], int]:
        """Up to `n` prompts from `problems` whose route names no down teacher, drawing at most `max_draws`;
        and how many were skipped. With nothing down this is simply the next `n` prompts."""
        picked, skipped = [], 0
        for _ in range(max_draws):
            if len(picked) == n:
                break
            p = next(problems)
            if down and down & set(self.route_names(self.metadata(p))):
                skipped += 1
            else:
                picked.append(p)
        return picked, skipped


def targets(t: Trajectory) -> list[str]:
    """The teachers a trajectory's copies go to: its stamped route ([DEFAULT_TEACHER] without one)."""
    return list(t.teacher_weights) if t.teacher_weights else [DEFAULT_TEACHER]


@dataclass
class _Waiting:
    """A stream's copies not yet appended, oldest first, and since when it has taken none of them."""

    copies: list[tuple[str, bytes]] = field(default_factory=list)  # (trajectory id, payload)
    stuck_since: float = 0.0


class Outbox:
    """Copies generated but not yet appended, per teacher, and which teachers are down (see the module
    docstring). A trajectory *enters* the run when its first copy is appended: `flush` returns those, for the
    actor's ledger and counters (each once, however many copies; one still wholly in the outbox when the actor
    stops never entered, so the books do not expect it). Copies of one stream go out in the order made."""

    def __init__(self, broker: Broker, router: Router, stall_s: float):
        self.broker, self.router, self.stall_s = broker, router, stall_s
        self.waiting: dict[str, _Waiting] = {}  # teacher -> its stream's waiting copies (none: no key)
        self.unsent: dict[str, Trajectory] = {}  # id -> trajectory none of whose copies is out yet

    def add(self, trajs: list[Trajectory], payloads: list[bytes]) -> None:
        now = time.monotonic()
        for t, payload in zip(trajs, payloads, strict=True):
            self.unsent[t.id] = t
            for name in targets(t):
                self.waiting.setdefault(name, _Waiting(stuck_since=now)).copies.append((t.id, payload))

    def flush(self) -> tuple[list[Trajectory], int]:
        """Append what each stream has room for, never waiting: the trajectories that entered the run by it,
        and how many copies went out."""
        entered, copies = [], 0
        for name, w in list(self.waiting.items()):
            got = len(
                self.broker.publish(self.router.streams.get(name, name), [p for _, p in w.copies]) or []
            )
            if not got:
                continue
            for tid, _ in w.copies[:got]:
                if tid in self.unsent:
                    entered.append(self.unsent.pop(tid))
            del w.copies[:got]
            copies += got
            w.stuck_since = time.monotonic()
            if not w.copies:
                del self.waiting[name]
        return entered, copies

    def down(self) -> set[str]:
        """Teachers whose stream has taken none of the waiting copies for stall_s."""
        now = time.monotonic()
        return {name for name, w in self.waiting.items() if now - w.stuck_since >= self.stall_s}

    def blocking(self) -> set[str]:
        """Teachers with copies waiting that are not (yet) down: ordinary backpressure, the actor waits."""
        return set(self.waiting) - self.down()

    def held(self) -> int:
        return sum(len(w.copies) for w in self.waiting.values())
