"""The launcher's processes: one per component, started through a spawner, judged by their exit status.

Two contracts are written here. A `ProcessHandle` is the part of `subprocess.Popen` the supervisor uses, so a
process placed anywhere (a child here, a process owned by a Ray actor on another node) is watched and stopped the
same way. A `Spawner` places one component process and returns its handle; it is the whole of what a launcher
must implement (`LocalSpawner` below, `RaySpawner` in ray_launcher.py). `opd.launch.spawners.SPAWNERS` names them for `--launcher`.

The supervisor knows each process by its role and index (a `Slot`), never by parsing a name. Scaling acts only
through `spawn` and `retire`; a retired process's exit is expected and never counts as a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opd.config import Config

# --launcher NAME -> "module:factory"; a factory takes (the resolved Config, a log function) and returns a Spawner.


@dataclass(frozen=True)
class Slot:
    """Which component a process is: its `opd <role>` verb and, for actors and scorers, its index."""

    role: str  # broker | learner | actor | scorer
    index: int | None = None

    @property
    def name(self) -> str:
        """The component's name in logs and metrics records (`learner`, `scorer-2`)."""
        return self.role if self.index is None else f"{self.role}-{self.index}"


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


@dataclass
class Component:
    slot: Slot
    proc: ProcessHandle
    log_path: Path
    retire_deadline: float | None = None  # set by `retire`: killed if still running after it
    reaped: bool = False  # a retired process's exit has been reported

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
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Supervisor:
    """Starts, watches, retires and stops the run's processes.

    `survivable` maps a role to why losing one of its processes is not fatal while another of that role still
    runs (the launcher decides which roles qualify, from what the broker guarantees)."""

    def __init__(
        self,
        config_path: Path,
        out_dir: Path,
        spawner: Spawner,
        grace_s: float,
        survivable: dict[str, str],
        log: Callable[..., None],
    ):
        self.config_path, self.out, self.spawner = config_path, out_dir, spawner
        self.grace_s, self.survivable, self.log = grace_s, survivable, log
        self.components: list[Component] = []
        self.lost: set[Slot] = set()  # died without ending the run (another of their role carries on)

    # ------------------------------------------------------------------------------------------ public
    def spawn(self, role: str, index: int | None = None, *extra: str) -> Component:
        """Start `opd <role> --config <run config> [--index i] [extra...]` through the spawner."""
        slot = Slot(role, index)
        argv = [sys.executable, "-m", "opd", role, "--config", str(self.config_path)]
        if index is not None:
            argv += ["--index", str(index)]
        env = {**os.environ, "OPD_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        log_path = self.out / "logs" / f"{slot.name}.log"
        comp = Component(slot, self.spawner.start(slot, [*argv, *extra], env, log_path), log_path)
        self.components.append(comp)
        return comp

    def retire(self, role: str, index: int | None = None) -> None:
        """Stop one process on purpose with SIGTERM (it finishes the work in hand); its exit is no failure, and
        `reap` kills it if it outlives run.shutdown_grace_s."""
        comp = self.get(Slot(role, index))
        comp.retire_deadline = time.monotonic() + self.grace_s
        comp.proc.send_signal(signal.SIGTERM)

    def get(self, slot: Slot) -> Component:
        return next(c for c in self.components if c.slot == slot)

    def active(self, role: str) -> list[Component]:
        """Processes of `role` running and not being retired, oldest first."""
        return [c for c in self.components if c.role == role and not c.retired and c.proc.poll() is None]

    def reap(self) -> list[tuple[Component, int]]:
        """Retired processes that have exited since the last call, with their exit status; one that outlived
        its deadline is killed (and reported on a later call)."""
        now, ended = time.monotonic(), []
        for c in self.components:
            if c.retire_deadline is None or c.reaped:
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

    def failure(self, run_over: Callable[[], bool]) -> Component | None:
        """The first process whose exit ends the run, judged by exit status alone.

        A non-zero status is a failure. A clean exit is a failure unless it is the learner's (the run is done)
        or the run is over (the learner announced stop and the workers obeyed). `run_over` is asked only after
        the exit statuses are read: a clean exit seen here followed a stop published before the question, so a
        worker that obeys the stop quickly is never mistaken for one that quit early."""
        exited = [(c, code) for c in self.components if not c.retired and (code := c.proc.poll()) is not None]
        if not exited:
            return None
        over = run_over()
        for comp, code in exited:
            if code == 0 and (over or comp.role == "learner"):
                continue
            if not self._survives(comp):
                return comp
        return None

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
    def _survives(self, dead: Component) -> bool:
        """A worker may die while another of its role still runs, if its role is survivable."""
        why = self.survivable.get(dead.role)
        if why is None:
            return False
        alive = [
            c for c in self.components if c.role == dead.role and c is not dead and c.proc.poll() in (None, 0)
        ]
        if dead.slot not in self.lost and alive:
            self.lost.add(dead.slot)
            self.log(
                f"[yellow]{dead.name} exited with code {dead.proc.returncode}[/]; continuing on "
                f"{', '.join(c.name for c in alive)}; {why}"
            )
        return bool(alive)
