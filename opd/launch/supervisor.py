"""The launcher's processes: one per component, started through a spawner, judged by their exit status.

Two contracts are written here. A `ProcessHandle` is the part of `subprocess.Popen` the supervisor uses, so a
process placed anywhere (a child here, a process owned by a Ray actor on another node) is watched and stopped the
same way. A `Spawner` places one component process and returns its handle; it is the whole of what a launcher
must implement (`LocalSpawner` below, `RaySpawner` in ray_launcher.py). `opd.launch.spawners.SPAWNERS` names them for `--launcher`.

The supervisor knows each process by its role, index and, for a scorer, its teacher's pool (a `Slot`), never by
parsing a name it spawned. Scaling acts only through `spawn` and `retire`; a retired process's exit is expected and
never counts as a failure.

A role's members are not only the processes spawned here: a component started by hand with the run's config
(`opd scorer --config runs/<id>/config.yaml --index 0`) reports on the metrics stream, and the launcher passes
what it heard (`reported`). A worker of a survivable role that dies is restarted (`supervision.restart:
on-failure`, at most `max_restarts` times per component, after a doubling backoff) or left dead; the run ends
only once its unit (its role; for a scorer, its teacher's pool: `scorer` or `scorer-<teacher>`) has had no live
member, spawned or reported, for `supervision.role_grace_s`. Each pool is judged on its own: a pool with no scorer
leaves its teacher's trajectories unscored however many scorers the other teachers have.

A role of one process group (`GroupRestart`: the learner's ranks, which meet in collectives) is never restarted a
process at a time: when one of them fails, the others are killed and the whole group is started again (with
`--resume`), under the same policy, counted as one component (`learner`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opd.config import Config, SupervisionConfig
from opd.config.teachers import DEFAULT_TEACHER

# --launcher NAME -> "module:factory"; a factory takes (the resolved Config, a log function) and returns a Spawner.


@dataclass(frozen=True)
class Slot:
    """Which component a process is: its `opd <role>` verb, for actors and scorers its index, and for a scorer of
    a named teacher its pool (`opd scorer --teacher <pool>`). The default teacher's pool is None, so a run with one
    teacher names its scorers `scorer-<i>` as it always did."""

    role: str  # broker | learner | actor | scorer
    index: int | None = None
    pool: str | None = None  # a scorer's teacher; None: the default teacher (or not a scorer)

    @classmethod
    def scorer(cls, teacher: str, index: int) -> Slot:
        """Scorer `index` of `teacher`'s pool (the default teacher's keeps the old names)."""
        return cls("scorer", index, None if teacher == DEFAULT_TEACHER else teacher)

    @property
    def unit(self) -> str:
        """What liveness is judged by: the role, or `<role>-<pool>` for a named teacher's scorers."""
        return self.role if self.pool is None else f"{self.role}-{self.pool}"

    @property
    def teacher(self) -> str:
        """The teacher a scorer scores for (DEFAULT_TEACHER for the default pool)."""
        return self.pool or DEFAULT_TEACHER

    @property
    def name(self) -> str:
        """The component's name in logs and metrics records (`learner`, `scorer-2`, `scorer-adder-0`)."""
        return self.unit if self.index is None else f"{self.unit}-{self.index}"

    def argv(self) -> list[str]:
        """The options of `opd <role>` that make a process this slot."""
        out = [] if self.index is None else ["--index", str(self.index)]
        return out if self.pool is None else [*out, "--teacher", self.pool]


def unit_of(component: str) -> str:
    """The unit of a component heard by name (started by hand, or anywhere): its name less a trailing index
    (`scorer-adder-3` -> `scorer-adder`, `actor-0` -> `actor`, `learner` -> `learner`). Teacher names have no
    `-` (opd.config.teachers.TEACHER_NAME), so the split is unambiguous."""
    head, sep, tail = component.rpartition("-")
    return head if sep and tail.isdigit() else component


def teacher_of(component: str) -> str | None:
    """The teacher whose pool a scorer's name says it is in (`scorer-1` -> default, `scorer-adder-0` -> adder);
    None for a component that is not a scorer."""
    unit = unit_of(component)
    if unit == "scorer":
        return DEFAULT_TEACHER
    return unit.removeprefix("scorer-") if unit.startswith("scorer-") else None


class ProcessHandle(Protocol):
    """What the supervisor needs of a running process (a subset of subprocess.Popen)."""

    returncode: int | None

    def poll(self) -> int | None:
        """The exit status once the process has ended (negative: killed by that signal), else None."""

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` if the process still runs (SIGTERM asks a component to finish cleanly)."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; raise subprocess.TimeoutExpired if it has not ended within `timeout`."""

    def kill(self) -> None:
        """End the process now (SIGKILL)."""


class Spawner(Protocol):
    """Places component processes: the contract every launcher implements.

    `start` runs `argv` (argv[0] is this interpreter; the rest is `-m opd <role> --config ...`) with `env`, its
    stdout and stderr appended to `log_path`, and returns its handle. The process must not outlive the launcher:
    `env` carries OPD_PARENT_PID, and a spawner that places processes elsewhere ties them to something that dies
    with the launcher. A process that cannot be placed raises LaunchError naming the resources it asked for.
    `close` releases whatever the spawner holds (cluster connections, host actors) once every process is stopped.
    """

    def start(self, slot: Slot, argv: list[str], env: dict[str, str], log_path: Path) -> ProcessHandle: ...

    def close(self) -> None: ...


class LocalSpawner:
    """`opd run`'s default: each component a child process of the launcher, in a session of its own (so a ^C at
    the terminal reaches only the launcher, which stops the children in order)."""

    def __init__(self, cfg: Config | None = None, log: Callable[..., None] | None = None):
        del cfg, log  # nothing to place or report: every process runs here

    def start(self, slot: Slot, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as fh:
            return subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class GroupRestart:
    """A role whose processes are one group: when one fails, all are restarted together, or the run ends.

    The learner's ranks are the case: a rank alone cannot rejoin a process group whose collectives the others are
    in, and a survivor holds the state of steps the new rank would not have, so the group starts again as a
    whole from the newest checkpoint and replay log (`argv`: `--resume`). `refused` says why this run cannot do
    it (the broker does not give back the entries the dead group held); the verdict then names it. `along`: roles
    whose launcher-started processes are stopped and started again with the group, not counted as their restarts
    (the actors: their weight-sync session is the learner's, and a new learner is a new session)."""

    role: str
    argv: tuple[str, ...] = ()
    refused: str | None = None
    along: tuple[str, ...] = ()


@dataclass
class Component:
    slot: Slot
    proc: ProcessHandle
    log_path: Path
    retire_deadline: float | None = None  # set by `retire`: killed if still running after it
    reaped: bool = False  # a retired process's exit has been reported
    settled: bool = False  # its death has been dealt with: restarted (`replaced`) or left dead (`lost`)
    replaced: bool = False  # a restart of its slot was scheduled

    @property
    def name(self) -> str:
        return self.slot.name

    @property
    def role(self) -> str:
        return self.slot.role

    @property
    def retired(self) -> bool:
        return self.retire_deadline is not None

    def tail(self, lines: int = 25) -> str:
        try:
            return log_tail(self.log_path.read_text(errors="replace").splitlines(), lines)
        except OSError:
            return "(no log)"


TRACEBACK = "Traceback (most recent call last):"
MAX_TRACEBACK_LINES = 60


def log_tail(lines: list[str], keep: int = 25) -> str:
    """What to show of a dead component's log: its last traceback whole (up to MAX_TRACEBACK_LINES) when it has
    one, else the last `keep` lines; runs of one repeated line are folded, so a warning printed per token can
    never be all there is to see (it once was the whole tail shown for a failed run)."""
    folded: list[str] = []
    repeats = 0
    for line in lines:
        if folded and line == folded[-1]:
            repeats += 1
            continue
        if repeats:
            folded.append(f"  (the line above {repeats} more time{'s' if repeats > 1 else ''})")
            repeats = 0
        folded.append(line)
    if repeats:
        folded.append(f"  (the line above {repeats} more time{'s' if repeats > 1 else ''})")
    starts = [i for i, line in enumerate(folded) if line.startswith(TRACEBACK)]
    if starts and len(folded) - starts[-1] <= MAX_TRACEBACK_LINES:
        first = max(0, min(starts[-1] - 3, len(folded) - keep))  # a few lines of context before it
        return "\n".join(folded[first:])
    return "\n".join(folded[-keep:])


class Reported(Protocol):
    """A component heard on the metrics stream (monitor.Incarnation): its name and newest record."""

    component: str
    record: dict


# role -> the live members the launcher heard from lately (spawned here or not)
ReportedMembers = Callable[[str], list[Reported]]
NOTHING_REPORTED: ReportedMembers = lambda role: []  # noqa: E731
MAX_BACKOFF_S = 60.0
KILL_WAIT_S = 10.0  # a killed group member's exit is awaited this long before its group starts again


class Supervisor:
    """Starts, watches, restarts, retires and stops the run's processes.

    `survivable` maps a role to why losing one of its processes is not fatal while another of that role still
    runs (the launcher decides which roles qualify, from what the broker guarantees); only those are restarted.
    `policy` is the supervision section; the default restarts nothing and ends the run as soon as a role has no
    live member."""

    def __init__(
        self,
        config_path: Path,
        out_dir: Path,
        spawner: Spawner,
        grace_s: float,
        survivable: dict[str, str],
        log: Callable[..., None],
        policy: SupervisionConfig | None = None,
        env: dict[str, str] | None = None,
        group: GroupRestart | None = None,
    ):
        self.config_path, self.out, self.spawner = config_path, out_dir, spawner
        self.env = dict(env or {})  # what the launcher tells every component (opd.runtime.lifecycle reads it)
        self.grace_s, self.survivable, self.log = grace_s, survivable, log
        self.policy = policy or SupervisionConfig(role_grace_s=0.0)
        self.group = group  # the role restarted as a whole (the learner's ranks), if any
        self.components: list[Component] = []
        self.lost: set[Slot] = set()  # died without ending the run (another of their role carries on)
        self.restarts: dict[str, int] = {}  # component name -> restarts so far
        # restarts due at (monotonic time, slot, extra argv), in the order they start
        self.pending: list[tuple[float, Slot, tuple[str, ...]]] = []
        self.down_since: dict[str, float] = {}  # role -> since when it has had no live member
        self.verdict = ""  # why the run ends, once `failure` has returned a component

    # ------------------------------------------------------------------------------------------ public
    def spawn(self, role: str, index: int | None = None, *extra: str, pool: str | None = None) -> Component:
        """Start `opd <role> --config <run config> [--index i] [--teacher pool] [extra...]` through the spawner."""
        return self.spawn_slot(Slot(role, index, pool), *extra)

    def spawn_slot(self, slot: Slot, *extra: str) -> Component:
        """Start the process of `slot` (see `spawn`)."""
        argv = [sys.executable, "-m", "opd", slot.role, "--config", str(self.config_path), *slot.argv()]
        log_path = self.out / "logs" / f"{slot.name}.log"
        comp = Component(
            slot, self.spawner.start(slot, [*argv, *extra], self.child_env(), log_path), log_path
        )
        self.components.append(comp)
        return comp

    def child_env(self) -> dict[str, str]:
        """The environment of every component process (the one place it is built)."""
        return {**os.environ, **self.env, "OPD_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}

    def retire(self, role: str, index: int | None = None, pool: str | None = None) -> None:
        """Stop one process on purpose with SIGTERM (it finishes the work in hand); its exit is no failure, and
        `reap` kills it if it outlives run.shutdown_grace_s."""
        comp = self.get(Slot(role, index, pool))
        comp.retire_deadline = time.monotonic() + self.grace_s
        comp.proc.send_signal(signal.SIGTERM)

    def get(self, slot: Slot) -> Component:
        """The newest process of `slot` (a restart adds one)."""
        return next(c for c in reversed(self.components) if c.slot == slot)

    def active(self, unit: str) -> list[Component]:
        """Processes of `unit` (a role; `scorer-<teacher>` for a named teacher's pool) running and not being
        retired, oldest first. `scorer` is the default teacher's pool only."""
        return [c for c in self.components if c.slot.unit == unit and not c.retired and c.proc.poll() is None]

    def reap(self, unit: str | None = None) -> list[tuple[Component, int]]:
        """Retired processes (of `unit`, or all) that have exited since the last call, with their exit status;
        one that outlived its deadline is killed (and reported on a later call)."""
        now, ended = time.monotonic(), []
        for c in self.components:
            if c.retire_deadline is None or c.reaped or unit is not None and c.slot.unit != unit:
                continue
            code = c.proc.poll()
            if code is not None:
                c.reaped = True
                ended.append((c, code))
            elif now > c.retire_deadline:
                self.log(
                    f"[yellow]{c.name} did not stop within run.shutdown_grace_s after retiring; killing it[/]"
                )
                c.proc.kill()
        return ended

    def failure(
        self, run_over: Callable[[], bool], reported: ReportedMembers = NOTHING_REPORTED
    ) -> Component | None:
        """The process whose exit ends the run (and `verdict` says why), judged by exit status and liveness.

        A non-zero status is a failure. A clean exit is a failure unless it is the learner's (the run is done)
        or the run is over (the learner announced stop and the workers obeyed). `run_over` is asked only after
        the exit statuses are read: a clean exit seen here followed a stop published before the question, so a
        worker that obeys the stop quickly is never mistaken for one that quit early. A failed worker of a
        survivable role is restarted or left dead; the run ends once its role has had no live member for
        supervision.role_grace_s."""
        self._restart_due()
        exited = [
            (c, code)
            for c in self.components
            if not c.retired and not c.settled and (code := c.proc.poll()) is not None
        ]
        over = run_over() if exited else False
        for comp, code in exited:
            if comp.settled or code == 0 and (over or comp.role == "learner"):
                continue  # (settled: a member of a group that an earlier exit in this list is restarting)
            if self.group is not None and comp.role == self.group.role:
                if self._restart_group(comp, code, over):
                    continue
                return comp
            if comp.role not in self.survivable:
                self.verdict = f"{comp.name} exited with code {code}"
                return comp
            self._settle(comp, code, over, reported)
        return self._role_gone(reported, run_over)

    def restarting(self, unit: str) -> bool:
        """Whether a restart of some process of `unit` (a role, or a named teacher's scorer pool) is scheduled
        and not yet started."""
        return any(slot.unit == unit for _, slot, _ in self.pending)

    def cancel_restarts(self) -> None:
        """Start none of the scheduled restarts (the run is being interrupted)."""
        self.pending.clear()

    def summary(self) -> dict:
        """What supervision did, for summary.json: restarts per component and the components left dead."""
        return {"restarts": dict(sorted(self.restarts.items())), "lost": sorted(s.name for s in self.lost)}

    def stop(self, comps: list[Component], grace_s: float) -> None:
        """SIGTERM each, wait up to `grace_s` in all, then kill what is left."""
        for c in comps:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in comps:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"[yellow]{c.name} did not stop within {grace_s:.0f}s; killing it[/]")
                c.proc.kill()
                c.proc.wait()

    # ----------------------------------------------------------------------------------------- private
    def _settle(self, dead: Component, code: int, over: bool, reported: ReportedMembers) -> None:
        """A survivable worker died: restart it if the policy allows, else leave it dead and say who carries on."""
        dead.settled = True
        if self._restart(dead, code, over, reported):
            return
        self.lost.add(dead.slot)
        alive = self._members(dead.slot.unit, reported)
        if alive:
            why = self.survivable[dead.role]
            self.log(
                f"[yellow]{dead.name} exited with code {code}[/]; continuing on {', '.join(alive)}; {why}"
            )
        else:
            self.log(
                f"[yellow]{dead.name} exited with code {code}[/]; no {_unit_words(dead.slot)} is alive: the run "
                f"stops unless one is within supervision.role_grace_s={self.policy.role_grace_s:g}s"
            )

    def _restart(self, dead: Component, code: int, over: bool, reported: ReportedMembers) -> bool:
        """Schedule a restart of `dead`'s slot if the policy allows it; False leaves it dead."""
        done = self.restarts.get(dead.name, 0)
        if self.policy.restart != "on-failure" or code == 0 or over:
            return False
        if done >= self.policy.max_restarts:
            self.log(
                f"[yellow]{dead.name} exited with code {code}[/]; not restarted: it has had "
                f"supervision.max_restarts={self.policy.max_restarts} restarts"
            )
            return False
        other = [r for r in self._reported_alive(dead.slot.unit, reported) if r.component == dead.name]
        if other:  # someone started a replacement by hand: two processes of one name would collide
            r = other[0].record
            self.log(
                f"[yellow]{dead.name} exited with code {code}[/]; not restarted: another {dead.name} "
                f"(pid {r.get('pid')} on {r.get('host')}) is running"
            )
            return False
        delay = min(self.policy.restart_backoff_s * 2**done, MAX_BACKOFF_S)
        self.restarts[dead.name] = done + 1
        dead.replaced = True
        self.pending.append((time.monotonic() + delay, dead.slot, ()))
        self.log(
            f"[yellow]{dead.name} exited with code {code}[/]; restarting it in {delay:g}s "
            f"(restart {done + 1} of supervision.max_restarts={self.policy.max_restarts})"
        )
        return True

    def _restart_group(self, dead: Component, code: int, over: bool) -> bool:
        """One process of the group failed: kill the others and schedule the whole group's start with the group's
        argv, if the policy and the group allow it; else False, with the verdict saying why the run ends.

        The others are killed, not asked to stop: a SIGTERM makes learner rank 0 write a checkpoint (a collective
        with the dead rank) and announce stop to the whole run. Killed, it leaves what a crash leaves, which is
        what a resume restores (the checkpoint, the replay log of the steps since, the broker's pending entries)."""
        group, name = self.group, self.group.role
        self.verdict = f"{dead.name} exited with code {code}"
        if self.policy.restart != "on-failure" or over:
            return False
        done = self.restarts.get(name, 0)
        if group.refused:
            self.verdict += f"; the {name} group is not restarted: {group.refused}"
            return False
        if done >= self.policy.max_restarts:
            self.verdict += (
                f"; the {name} group is not restarted again: it has had supervision.max_restarts="
                f"{self.policy.max_restarts} restarts"
            )
            return False
        members = self._unsettled([name])
        exits = ", ".join(
            f"{c.name} exited with code {c.proc.poll()}" for c in members if c.proc.poll() is not None
        )
        for c in members:
            if c.proc.poll() is None:
                c.proc.kill()
        for c in members:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(KILL_WAIT_S)
        # SIGTERM: an actor publishes what it has and records it in its ledger (one that already exited is
        # started again too: the learner's end ended it)
        riders = self._unsettled(group.along)
        self.stop(riders, self.grace_s)
        delay = min(self.policy.restart_backoff_s * 2**done, MAX_BACKOFF_S)
        self.restarts[name] = done + 1
        slots = sorted(
            {c.slot for c in members + riders}, key=lambda s: (s.role != name, s.role, s.index or 0)
        )
        at = time.monotonic() + delay
        self.pending += [(at, s, group.argv if s.role == name else ()) for s in slots]  # rank 0 first
        self.verdict = ""
        options = " ".join(group.argv) or "no options"
        self.log(
            f"[yellow]{exits}[/]; restarting the {name} group in {delay:g}s with {options} (restart {done + 1} of "
            f"supervision.max_restarts={self.policy.max_restarts}): {', '.join(s.name for s in slots)}"
        )
        return True

    def _unsettled(self, roles: tuple[str, ...] | list[str]) -> list[Component]:
        """The processes of `roles` whose end is not dealt with yet (running, or exited and not judged), marked
        settled and replaced: their exit is part of a group restart, judged by nobody."""
        found = [c for c in self.components if c.role in roles and not c.settled and not c.retired]
        for c in found:
            c.settled = c.replaced = True
        return found

    def _restart_due(self) -> None:
        now = time.monotonic()
        due = [(slot, argv) for at, slot, argv in self.pending if at <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        for slot, argv in due:
            try:
                self.spawn_slot(slot, *argv)
            except Exception as exc:  # e.g. Ray cannot place it now: the slot is left dead
                self.lost.add(slot)
                self.log(f"[yellow]could not restart {slot.name}: {exc}[/]")
                continue
            self.log(
                f"restarted {slot.name} (its log continues in {self.out / 'logs' / (slot.name + '.log')})"
            )

    def _role_gone(self, reported: ReportedMembers, run_over: Callable[[], bool]) -> Component | None:
        """The first dead process of a unit (a role; each teacher's scorer pool on its own) that has had no live
        member for supervision.role_grace_s (unless the run is over: then the workers leave because the learner
        said stop). A pool without scorers is fatal even while other pools have some: its teacher's trajectories
        (and every mixture that names it) would wait in its rollouts stream for good."""
        now = time.monotonic()
        for unit in sorted({s.unit for s in self.lost}):
            if self._members(unit, reported) or self.restarting(unit):
                self.down_since.pop(unit, None)
                continue
            since = self.down_since.setdefault(unit, now)
            if now - since < self.policy.role_grace_s or run_over():
                continue
            dead = [c for c in self.components if c.slot.unit == unit and c.settled and not c.replaced]
            exits = ", ".join(f"{c.name} exited with code {c.proc.returncode}" for c in dead)
            self.verdict = (
                f"no {_unit_words(dead[0].slot)} alive for {now - since:.0f}s (supervision.role_grace_s="
                f"{self.policy.role_grace_s:g}): {exits}"
            )
            return dead[0]
        return None

    def _members(self, unit: str, reported: ReportedMembers) -> list[str]:
        """Names of the live members of `unit`: running processes spawned here, then those heard from."""
        names = [c.name for c in self.active(unit)]
        names += [r.component for r in self._reported_alive(unit, reported) if r.component not in names]
        return names

    def _reported_alive(self, unit: str, reported: ReportedMembers) -> list[Reported]:
        """What `reported` says is alive in `unit` (it is asked by role; a scorer's pool is read off its name),
        less the processes spawned here that have already exited (their last heartbeat is still recent, but
        their exit status is the better witness)."""
        host = socket.gethostname()
        exited = {
            c.proc.pid for c in self.components if getattr(c.proc, "pid", None) and c.proc.poll() is not None
        }
        return [
            r
            for r in reported(unit.split("-")[0])
            if unit_of(r.component) == unit
            and not (r.record.get("host") == host and r.record.get("pid") in exited)
        ]


def _unit_words(slot: Slot) -> str:
    """A unit as a verdict names it: `scorer`, or `scorer of teacher adder (scorer-adder-*)`."""
    if slot.pool is None:
        return slot.role
    return f"{slot.role} of teacher {slot.pool} ({slot.unit}-*; its trajectories are not scored)"
