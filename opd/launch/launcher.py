"""`opd run`: every component as its own process, joined by the run's broker, watched until the learner is done.

The launcher reads top to bottom: set up (run directory, metrics ports), start (the broker if it is embedded,
learner, actors, scorers, and meanwhile the models and their accuracy before training), watch (failures,
metrics, scaling, status), clean up (stop every process, take the last records), report (summary.json). Start-up
is parallel because it is mostly imports: each component spends seconds importing torch and transformers, and so
does the launcher before it can look for the models, so they all start at once, and a component waits only where
it must (`opd.runtime.lifecycle.wait_for_models`: for the launcher to find or build the models; for the broker,
in its client). Its parts: `supervisor` owns the processes and the
spawner that places them (a child here, or a Ray actor: `--launcher`) and restarts or gives up on them
(`supervision:`), `monitor` reads the run's streams (and so knows the components started by hand),
`scaling` adds and retires scorers through the supervisor, `report` is the only part that loads models. The
components know nothing of it and run the same way when started by hand (`opd actor ...`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from broker import BrokerUnavailable, capabilities
from opd.config import Config
from opd.launch.monitor import Monitor
from opd.launch.rundir import LaunchError, has_trained, mark_failed, prepare_run_dir
from opd.launch.scaling import ScorerScaler, spawn_scorer_pools, supervisor_pools
from opd.launch.spawners import open_spawner
from opd.launch.supervisor import Component, GroupRestart, Slot, Supervisor
from opd.runtime import run_secret
from opd.runtime.broker import open_broker, open_broker_when_ready
from opd.runtime.lifecycle import MODELS_READY_ENV
from opd.runtime.prometheus import write_port_map

console = Console(highlight=False, soft_wrap=True)
BROKER_START_S = 30.0  # an embedded broker that does not answer by then has failed to start
BROKER_STOP_S = 5.0
WATCH_PERIOD_S = 0.2
MODELS_READY_NAME = ".models_ready"  # in the run directory: the file MODELS_READY_ENV names


class ModelsBefore:
    """The run's models found, or built where missing, and their held-out accuracy before training, on a thread
    of the launcher while the components start (report.accuracy_before). The components started with
    MODELS_READY_ENV wait for `ready_file` before loading the models; it is created at once when the run builds
    none (both pretrained: loaded as they are), else once the thread has them (a built model's accuracy is
    recorded with it), so a missing model is still built once, here, with its progress shown. An error of the
    thread is raised by `check`."""

    def __init__(self, cfg: Config, ready_file: Path, log: Callable[..., None]):
        self.cfg, self.ready_file, self.log = cfg, ready_file, log
        self.ready_file.unlink(missing_ok=True)  # an earlier leg's: this leg looks again
        self.accuracy: dict | None = None
        self.error: BaseException | None = None
        # daemon: a run interrupted during a build ends without waiting for it (as an interrupt always did)
        self._thread = threading.Thread(target=self._find_and_measure, name="models", daemon=True)

    def start(self) -> None:
        teachers = [pool.model for pool in self.cfg.teacher_pools().values()]
        if all(m.kind == "pretrained" for m in [self.cfg.student, *teachers]):
            self.ready_file.touch()  # nothing to build: the components load them while this evaluates them
        self._thread.start()

    def _find_and_measure(self) -> None:
        try:
            # torch and transformers: imported here while the components import their own
            from opd.launch import report

            self.accuracy = report.accuracy_before(self.cfg, self.log)
            self.ready_file.touch()
        except BaseException as exc:  # raised in the launcher's own thread by `check`
            self.error = exc

    def done(self) -> bool:
        """Whether the thread has finished (successfully or not)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def check(self) -> None:
        """Raise what the thread raised: a build or evaluation that failed ends the run, as it did when they ran
        before the components started."""
        if self.error is not None:
            raise self.error

    def result(self) -> dict:
        """The accuracy before training (teacher, student, and per teacher under `teachers`), once measured."""
        self._thread.join()
        self.check()
        return self.accuracy


class Launcher:
    def __init__(
        self, cfg: Config, resume: bool = False, launcher: str = "local", overrides: list[str] | None = None
    ):
        self.cfg, self.resume, self.launcher = cfg, resume, launcher
        self.overrides = list(overrides or ())  # as typed: recorded with this leg in legs.json
        self.caps = capabilities(cfg.broker)
        self.out = Path(cfg.run.output_dir)
        self.interrupted = False
        self.broker = self.monitor = self.scaler = self.supervisor = self.models = None
        self.prepared = False  # the run directory is this run's (not one refused as another run's)
        self._bar_shown = self._asked_to_stop = False  # the watch loop's: learner bar entered, SIGTERM sent

    def run(self) -> int:
        """setup -> start and watch -> cleanup -> report; the exit code of `opd run`."""
        spawner = open_spawner(self.launcher, self.cfg, console.print)  # first: a missing Ray fails at once
        try:
            try:
                self._setup(spawner)
                failed = self._start_and_watch()
            finally:
                spawner.close()
            code = self._report(failed)
        except BaseException as exc:
            self._release_if_untrained(f"{type(exc).__name__}: {exc}")
            raise
        if failed is not None or self.interrupted:
            self._release_if_untrained(f"{failed.name} exited" if failed is not None else "interrupted")
        from opd.launch import report_page  # matplotlib: needed only now

        report_page.write_report(self.out, log=console.print)  # plots and report.html, a failed run's too
        return code

    def _release_if_untrained(self, reason: str) -> None:
        """A first leg that ends before the learner's first step leaves only its config and logs, marked failed
        and reusable (rundir.mark_failed); a resumed leg never touches what earlier legs trained."""
        if self.prepared and not self.resume and not has_trained(self.out):
            mark_failed(self.out, reason)
            console.print(
                f"the run failed before its first step; its logs stay in {self.out / 'logs'} and the "
                "directory is free for the next run"
            )

    # ------------------------------------------------------------------------------------------- setup
    def _setup(self, spawner) -> None:
        """Run directory and config, metrics ports, the supervisor."""
        config_path = prepare_run_dir(self.cfg, self.resume, self.overrides)
        self.prepared = True
        run_secret.share_with_children(self.cfg)  # the weight-sync secret, in every spawned component's env
        console.print(f"[bold]opd run[/] {self.cfg.run.run_id} -> {self.out}")
        try:
            ports = write_port_map(self.cfg, self.out)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        for name in self.cfg.unreached_teachers():
            console.print(
                f"[yellow]warning: teacher {name} is reached by no route (routing.routes, routing.default): its "
                "scorers will score nothing[/]"
            )
        if ports:  # once, so a person can point a browser or a scraper at them
            where = ", ".join(f"{n} {self.cfg.metrics.host}:{p}" for n, p in ports.items())
            console.print(f"Prometheus metrics: {where} (also in {self.out / 'metrics_ports.json'})")
        self.models = ModelsBefore(self.cfg, self.out / MODELS_READY_NAME, console.print)
        self.started = time.time()
        grace = self.cfg.run.shutdown_grace_s
        self.supervisor = Supervisor(
            config_path,
            self.out,
            spawner,
            grace,
            self._survivable(),
            console.print,
            self.cfg.supervision,
            env={MODELS_READY_ENV: str(self.models.ready_file.resolve())},
            group=self._learner_group(),
        )

    def _survivable(self) -> dict[str, str]:
        """Roles whose processes the run can lose while another of the role runs, and why. An actor holds no
        broker entries and weight sync is elastic; a scorer's pending rollouts come back only where the broker
        redelivers a dead consumer's entries (and only to the scorers of the same teacher's pool, which read
        the same rollouts stream: the supervisor judges each pool on its own)."""
        roles = {
            "actor": "it leaves the weight-sync group at the next version; `opd actor` with the run's config rejoins"
        }
        if self.caps.redelivers:
            roles["scorer"] = "the broker redelivers its pending rollouts to its pool's scorers still running"
        return roles

    def _learner_group(self) -> GroupRestart:
        """The learner's ranks are restarted together (`supervision.restart: on-failure`) from the newest
        checkpoint and the replay log, as `--resume` does, when the books survive it: the steps acknowledged since
        the checkpoint must be in the replay log, and the batch the dead group held must come back from the
        broker (Redis gives a restarted consumer its own pending entries first). The embedded broker keeps that
        batch pending for a consumer that is gone and never hands it out again; it would also fill `scored` up to
        broker.max_depth for good. The actors the launcher started are restarted with it: each belongs to the
        learner's weight-sync session (its store, its signatures), and a new learner is a new session."""
        refused = None
        if not self.caps.redelivers:
            refused = (
                f"broker.type {self.cfg.broker.type} never gives back the entries the learner held when it died "
                "(and they would fill the scored stream); use broker.type: redis to have it restarted, or "
                f"continue this run with `opd run {self.out / 'config.yaml'} --resume`"
            )
        elif not self.cfg.learner.replay_log:
            refused = (
                "learner.replay_log is off, so the steps trained since the last checkpoint (already acknowledged) "
                "would be lost; set learner.replay_log: true"
            )
        return GroupRestart("learner", ("--resume",), refused, along=("actor",))

    # ------------------------------------------------------------------------------------------- start
    def _start_and_watch(self) -> Component | None:
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True))
        try:
            self._start()
            with contextlib.ExitStack() as bar:
                return self._watch(bar)
        finally:
            self._cleanup()
            signal.signal(signal.SIGINT, previous)

    def _start(self) -> None:
        """Everything at once: the broker (embedded) or the launcher's client of it (a server, which must answer
        before anything starts), the components, the models' thread; then the embedded broker's first answer.
        A component meets a broker not yet up in its client, which waits for it (broker.request_timeout_s)."""
        embedded = self.supervisor.spawn("broker") if self.caps.embedded_process else None
        if embedded is None:
            self.broker = self._connect_broker()
        for rank in self.learner_ranks:  # rank 0 (or the one learner) first: it hosts the rendezvous
            self.supervisor.spawn("learner", rank, *(["--resume"] if self.resume else []))
        for i in range(self.cfg.actor.num_actors):
            self.supervisor.spawn("actor", i)
        spawn_scorer_pools(self.cfg, self.supervisor)  # each teacher's pool: scorer-<i>, scorer-<teacher>-<i>
        self.models.start()
        if embedded is not None:
            self.broker = self._broker_ready(embedded)
        self.monitor = Monitor(self.cfg, self.broker, self.out, console)
        # `opd scale` and the autoscaler act through the supervisor's public spawn and retire
        pools = supervisor_pools(self.cfg, self.supervisor)
        self.scaler = ScorerScaler(
            self.cfg, self.broker, pools, self.out, lambda: self.monitor.state.latest, console.print
        )

    @property
    def learner_ranks(self) -> list[int | None]:
        """The learner processes' slot indices: one learner is `learner` (as ever), N ranks are learner-0..N-1
        (`opd learner --index i` is its rank)."""
        n = self.cfg.learner.num_ranks
        return [None] if n == 1 else list(range(n))

    def _connect_broker(self):
        client = open_broker(self.cfg.broker)
        try:
            client.ping()
        except BrokerUnavailable as exc:
            raise LaunchError(f"{exc}; start the broker's server or fix the broker: section") from None
        return client

    def _broker_ready(self, proc: Component):
        alive = lambda: proc.proc.poll() is None  # noqa: E731
        try:
            return open_broker_when_ready(self.cfg.broker, within_s=BROKER_START_S, alive=alive)
        except BrokerUnavailable:
            raise LaunchError(f"the broker did not start:\n{proc.tail()}") from None

    # ------------------------------------------------------------------------------------------- watch
    def _watch(self, bar: contextlib.ExitStack) -> Component | None:
        """Until the learner exits cleanly (None) or a process's exit ends the run (that process). The learner's
        progress bar goes into `bar` once the models thread is done: a terminal holds one live display, and that
        thread may be drawing a build's or an evaluation's (the components wait for those models anyway)."""
        rank0 = Slot("learner", self.learner_ranks[0])  # rank 0: the run's learner
        self._asked_to_stop = False
        while True:
            # the newest process of rank 0: the learner group may have been restarted
            learner = self.supervisor.get(rank0)
            self.models.check()  # a model that could not be found, built or evaluated ends the run
            if self._asked_to_stop and learner.proc.poll() == -signal.SIGTERM:
                # Our SIGTERM reached it while it was still importing, before its handler existed (the first
                # seconds of a run): that is the interrupt, not a failure of the learner.
                return None
            try:  # before judging exits: a member started by hand may have just said it is alive
                self.monitor.drain()
            except BrokerUnavailable:
                pass
            failed = self.supervisor.failure(self.monitor.run_over, self._reported)
            if failed is not None:
                return failed
            if not self._bar_shown and self.models.done():
                bar.enter_context(self.monitor.progress())
                self._bar_shown = True
            if not self.interrupted:
                self.scaler.tick()  # `opd scale` requests, the autoscaler, per-scorer throughput records
            self.monitor.show()
            if learner.proc.poll() == 0:
                return None
            if self.interrupted and self.supervisor.restarting("learner"):
                self.supervisor.cancel_restarts()  # between a learner group's death and its restart: nothing to stop
                return None
            self._stop_learner_if_interrupted(learner)
            time.sleep(WATCH_PERIOD_S)

    def _stop_learner_if_interrupted(self, learner: Component) -> None:
        if self.interrupted and not self._asked_to_stop and learner.proc.poll() is None:
            # Once only: Python restores default handlers while it shuts down, so a repeated SIGTERM would kill
            # a learner that is already exiting cleanly.
            learner.proc.send_signal(signal.SIGTERM)  # it saves, announces stop, and exits
            self._asked_to_stop = True

    def _reported(self, role: str) -> list:
        """The members of `role` heard from lately on the metrics stream, started here or by hand."""
        return self.monitor.live(role, self.cfg.supervision.liveness_s)

    # ----------------------------------------------------------------------------------------- cleanup
    def _cleanup(self) -> None:
        """Stop the workers, read what they sent last, then stop the broker they sent it through."""
        comps = self.supervisor.components
        self.supervisor.stop([c for c in comps if c.role != "broker"], self.cfg.run.shutdown_grace_s)
        if self.monitor is not None:
            try:
                self.monitor.drain()
            except BrokerUnavailable:
                pass
        self.supervisor.stop([c for c in comps if c.role == "broker"], BROKER_STOP_S)
        if self.models is not None:  # nothing is left to start: the directory as it was
            self.models.ready_file.unlink(missing_ok=True)

    def _report(self, failed: Component | None) -> int:
        if failed is not None:
            console.print(
                f"[red bold]{self.supervisor.verdict}[/]; the log of {failed.name} ({failed.log_path}):"
            )
            console.print(failed.tail(), markup=False)
            return 1
        if self.interrupted and not (self.out / "learner_summary.json").exists():
            console.print("[bold]interrupted[/] before the learner summed up its run; no summary.json")
            return 130
        from opd.launch import report

        summary = report.write_summary(
            self.cfg,
            self.out,
            self.monitor.state,
            self.models.result(),
            self.started,
            self.interrupted,
            supervision=self.supervisor.summary(),
        )
        console.print(report.done_line(summary, self.out))
        return 130 if self.interrupted else 0
