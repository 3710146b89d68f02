"""`opd run`: every component as its own process on this machine, joined by the embedded ZeroMQ broker.

The launcher owns the processes (start, watch, stop, no orphans) and the run's report; the components know
nothing of it and run the same way when started by hand (`opd actor ...`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from broker import BrokerUnavailable, connect
from opd import tasks
from opd.config import Config, dump_config
from opd.models.builds import ensure_assets, evaluate, load_asset
from opd.models.loading import load_causal_lm, load_tokenizer
from opd.protocol import ProtocolError, Streams, unpack_control
from opd.runtime.lifecycle import trajectory_id
from opd.runtime.prometheus import write_port_map

console = Console(highlight=False, soft_wrap=True)


class LaunchError(RuntimeError):
    """The run could not start; the message says which part and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_run(cfg: Config) -> Config:
    """Fill what a run needs decided once for all processes: id, directory, ports."""
    cfg = cfg.model_copy(deep=True)
    if cfg.run.run_id is None:
        cfg.run.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{random.randrange(16**4):04x}"
    if cfg.run.output_dir is None:
        cfg.run.output_dir = Path("runs") / cfg.run.run_id
    if cfg.broker.type == "zmq" and cfg.broker.port == 0:
        cfg.broker.port = free_port()
    if cfg.weight_sync.port == 0:
        cfg.weight_sync.port = free_port()
    return cfg


@dataclass
class Component:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class RunState:
    latest: dict[str, dict] = field(default_factory=dict)  # component -> newest metrics record
    learner_records: list[dict] = field(default_factory=list)
    dead_letters: int = 0
    eval_accuracy: float | None = None  # newest held-out accuracy the learner reported
    last_status: tuple[float, dict[str, float]] = (0.0, {})


def resolve_resume(cfg: Config) -> Config:
    """`opd run CONFIG --resume`: continue the run in run.output_dir (or runs/<run.run_id>) under its own run id,
    so its streams, checkpoints and replay log are the ones picked up."""
    if cfg.run.output_dir is None and cfg.run.run_id is None:
        raise LaunchError(
            "--resume needs the run to continue: set run.output_dir=runs/<id> (or run.run_id=<id>)"
        )
    out = Path(cfg.run.output_dir or Path("runs") / cfg.run.run_id)
    previous = out / "config.yaml"
    if not previous.exists():
        raise LaunchError(f"nothing to resume in {out}: no config.yaml there; start it without --resume")
    cfg = cfg.model_copy(deep=True)
    cfg.run.run_id = yaml.safe_load(previous.read_text())["run"]["run_id"]
    cfg.run.output_dir = out
    return resolve_run(cfg)


class LocalLauncher:
    def __init__(self, cfg: Config, resume: bool = False, spawner=None):
        self.cfg, self.resume = cfg, resume
        self.lost: set[str] = set()  # components that died without ending the run
        self.spawner = (
            spawner  # places a process elsewhere (opd/ray_launcher.py); None = a child process here
        )
        self.retired: set[str] = set()  # scorers stopped on purpose by scaling: their exit is no failure
        self.scaler = None  # opd/scaling.py, once the components run
        self.out = Path(cfg.run.output_dir)
        self.components: list[Component] = []
        self.state = RunState()
        self.interrupted = False
        self.config_path = self.out / "config.yaml"

    # ------------------------------------------------------------------------------ processes
    def _spawn(self, name: str, role: str, *extra: str) -> Component:
        log_path = self.out / "logs" / f"{name}.log"
        cmd = [sys.executable, "-m", "opd", role, "--config", str(self.config_path), *extra]
        env = {**os.environ, "OPD_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        if self.spawner is not None:
            proc = self.spawner(name, cmd, env, log_path)  # a Popen-like handle
        else:
            with open(log_path, "ab") as fh:
                proc = subprocess.Popen(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        comp = Component(name, proc, log_path)
        self.components.append(comp)
        return comp

    def _start_all(self) -> None:
        if self.cfg.broker.type == "redis":
            self.broker = self._connect_redis()
        else:
            self.broker = self._start_zmq_broker()
        self._spawn("learner", "learner", *(["--resume"] if self.resume else []))
        for i in range(self.cfg.actor.num_actors):
            self._spawn(f"actor-{i}", "actor", "--index", str(i))
        for i in range(self.cfg.scorer.num_scorers):
            self._spawn(f"scorer-{i}", "scorer", "--index", str(i))
        self._start_scaling()

    def _start_scaling(self) -> None:
        """`opd scale` and the autoscaler act through this launcher's own spawn and stop (opd/scaling.py)."""
        from opd.launch.scaling import LauncherPool, ScorerScaler

        self.scaler = ScorerScaler(
            self.cfg, self.broker, LauncherPool(self), self.out, lambda: self.state.latest, console.print
        )

    def _connect_redis(self):
        client = connect(self.cfg.broker)
        try:
            client.ping()
        except BrokerUnavailable as exc:
            raise LaunchError(f"{exc}; start redis-server or fix broker.url") from None
        return client

    def _start_zmq_broker(self):
        broker = self._spawn("broker", "broker")
        client = connect(self.cfg.broker)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.timeout_s = 1.0
                client.ping()
                break
            except BrokerUnavailable:
                if broker.proc.poll() is not None or time.monotonic() > deadline:
                    raise LaunchError(f"the broker did not start:\n{broker.tail()}") from None
        client.timeout_s = self.cfg.broker.request_timeout_s
        return client

    def _failed(self) -> Component | None:
        """A component that died; a clean exit counts only once the learner has finished (it sends stop)."""
        learner_done = (self.out / "learner_summary.json").exists()
        for c in self.components:
            if c.name in self.retired:
                continue
            code = c.proc.poll()
            if code is not None and (code != 0 or not (learner_done or c.name == "learner")):
                if self._survivable(c):
                    continue
                return c
        return None

    def _survivable(self, dead: Component) -> bool:
        """A worker may die while another of its kind still runs. An actor holds no broker entries and weight
        sync is elastic; a scorer's pending rollouts come back only on Redis (redelivery)."""
        role = dead.name.split("-")[0]
        if role not in ("actor", "scorer") or (role == "scorer" and self.cfg.broker.type != "redis"):
            return False
        alive = [
            c
            for c in self.components
            if c.name.startswith(role + "-") and c is not dead and c.proc.poll() in (None, 0)
        ]
        if dead.name not in self.lost and alive:
            self.lost.add(dead.name)
            what = (
                f"its pending rollouts are redelivered after broker.claim_idle_s={self.cfg.broker.claim_idle_s:g}s"
                if role == "scorer"
                else "it leaves the weight-sync group at the next version; `opd actor` with the run's config rejoins"
            )
            console.print(
                f"[yellow]{dead.name} exited with code {dead.proc.returncode}[/]; continuing on "
                f"{', '.join(c.name for c in alive)}; {what}"
            )
        return bool(alive)

    def _stop(self, comps: list[Component], grace: float) -> None:
        for c in comps:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in comps:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                console.print(f"[yellow]{c.name} did not stop within {grace:.0f}s; killing it[/]")
                c.proc.kill()
                c.proc.wait()

    # ----------------------------------------------------------------------------- monitoring
    def _drain(self) -> None:
        run_id = self.cfg.run.run_id
        metrics = self.broker.consume(
            Streams(run_id).metrics, Streams.LAUNCHER_GROUP, Streams.LAUNCHER_GROUP, 256, 0.0
        )
        for msg in metrics:
            try:
                rec = unpack_control(msg.data)
            except ProtocolError:
                continue
            self.state.latest[rec.get("component", "?")] = rec
            if rec.get("component") == "learner" and "loss" in rec:
                self.state.learner_records.append(rec)
                if "eval_accuracy" in rec:
                    self.state.eval_accuracy = rec["eval_accuracy"]
        self.broker.ack(Streams(run_id).metrics, Streams.LAUNCHER_GROUP, [m.id for m in metrics])
        dead = self.broker.consume(
            Streams(run_id).dead_letter, Streams.LAUNCHER_GROUP, Streams.LAUNCHER_GROUP, 256, 0.0
        )
        if dead:
            with open(self.out / "dead_letter.jsonl", "a") as fh:
                for msg in dead:
                    try:
                        rec = unpack_control(msg.data)
                        rec.pop("head", None)
                        data = rec.pop("data", None)
                        rec["replayable"] = data is not None
                        if rec.get("trajectory_id") is None and data is not None:
                            rec["trajectory_id"] = trajectory_id(data)
                        fh.write(json.dumps(rec) + "\n")
                    except ProtocolError:
                        pass
            self.state.dead_letters += len(dead)
            self.broker.ack(Streams(run_id).dead_letter, Streams.LAUNCHER_GROUP, [m.id for m in dead])

    def _totals(self, key: str, prefix: str) -> float:
        return sum(r.get(key, 0) for n, r in self.state.latest.items() if n.startswith(prefix))

    def _status_line(self) -> str:
        rec = self.state.learner_records[-1]
        now = time.time()
        totals = {
            "gen": self._totals("tokens_generated", "actor"),
            "score": self._totals("tokens_scored", "scorer"),
            "train": self._totals("tokens_trained", "learner"),
        }
        then, before = self.state.last_status
        dt = max(now - then, 1e-9) if then else max(now - self.started, 1e-9)
        rates = {k: (v - before.get(k, 0)) / dt for k, v in totals.items()}
        self.state.last_status = (now, totals)
        run_id = self.cfg.run.run_id
        depth = (
            f"queue {self.broker.depth(Streams(run_id).rollouts)}/{self.broker.depth(Streams(run_id).scored)}"
        )
        acc = f" acc {self.state.eval_accuracy:.3f}" if self.state.eval_accuracy is not None else ""
        return (
            f"step {rec['step']}/{self.cfg.learner.max_steps} v{rec['weight_version']} | tok/s gen {rates['gen']:.0f} "
            f"score {rates['score']:.0f} train {rates['train']:.0f} | {depth} | rkl {rec['reverse_kl']:.3f} "
            f"w {rec['importance_weight']:.2f} lag {rec['staleness_mean']:.1f}{acc}"
        )

    def _monitor(self, progress: Progress | None, task_id) -> Component | None:
        learner = next(c for c in self.components if c.name == "learner")
        shown, asked_to_stop = 0, False
        while True:
            failed = self._failed()
            if failed is not None:
                return failed
            try:
                self._drain()
            except BrokerUnavailable:
                pass
            if self.scaler is not None and not self.interrupted:
                self.scaler.tick()  # `opd scale` requests, the autoscaler, per-scorer throughput records
            recs = self.state.learner_records
            if recs and recs[-1]["step"] != shown:
                every = self.cfg.run.status_every
                crossed = recs[-1]["step"] // every != shown // every
                shown = recs[-1]["step"]
                if progress is not None:
                    progress.update(task_id, completed=shown)
                if crossed:
                    console.print(self._status_line())
            if learner.proc.poll() == 0:
                return None
            if self.interrupted and not asked_to_stop and learner.proc.poll() is None:
                # Once only: Python restores default handlers while it shuts down, so a repeated SIGTERM
                # would kill a learner that is already exiting cleanly.
                learner.proc.send_signal(signal.SIGTERM)  # it saves, announces stop, and exits
                asked_to_stop = True
            time.sleep(0.2)

    # ---------------------------------------------------------------------------------- run
    def _report_models(self) -> dict[str, float | None]:
        assets = ensure_assets(self.cfg, log=console.print)
        problems = tasks.eval_set(self.cfg.task)
        mode, max_new = tasks.verifier_mode(self.cfg.task), self.cfg.sampling.max_new_tokens
        acc = {}
        for role, asset in (("teacher", assets.teacher), ("student", assets.student)):
            if asset.eval_accuracy is not None:
                acc[role] = asset.eval_accuracy
            elif role == "teacher" and self.cfg.scorer.engine == "remote":
                acc[role] = None  # the teacher lives on its server; `teacher:` may name nothing loadable here
            elif problems:
                model, tok = load_asset(asset)
                acc[role] = evaluate(model, tok, problems, max_new, mode)
            else:
                acc[role] = None
        console.print(
            f"teacher held-out accuracy {_fmt(acc['teacher'])}; student before {_fmt(acc['student'])}"
        )
        return acc

    def _final_accuracy(self) -> float | None:
        """Evaluate the saved checkpoint as a user would load it: `from_pretrained` on the run directory."""
        final = self.out / "student"
        problems = tasks.eval_set(self.cfg.task)
        if not final.is_dir() or not problems:
            return None
        model, tok = load_causal_lm(final), load_tokenizer(final)
        return evaluate(
            model, tok, problems, self.cfg.sampling.max_new_tokens, tasks.verifier_mode(self.cfg.task)
        )

    def run(self) -> int:
        leftovers = [n for n in ("metrics.jsonl", "summary.json", "student") if (self.out / n).exists()]
        if self.resume:
            for stale in ("learner_summary.json", "summary.json"):  # the earlier incarnation's end, not ours
                (self.out / stale).unlink(missing_ok=True)
        elif leftovers:
            raise LaunchError(
                f"run.output_dir {self.out} already holds a run ({', '.join(leftovers)}); "
                "add --resume to continue it, or choose another run.output_dir"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.config_path.write_text(dump_config(self.cfg))
        console.print(f"[bold]opd run[/] {self.cfg.run.run_id} -> {self.out}")
        try:
            ports = write_port_map(self.cfg, self.out)
        except ValueError as exc:
            raise LaunchError(str(exc)) from None
        if ports:  # once, so a person can point a browser or a scraper at them
            where = ", ".join(f"{n} {self.cfg.metrics.host}:{p}" for n, p in ports.items())
            console.print(f"Prometheus metrics: {where} (also in {self.out / 'metrics_ports.json'})")
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        before = self._report_models()
        self.started = time.time()
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True))
        failed = None
        try:
            self._start_all()
            failed = self._run_monitored()
        finally:
            workers = [c for c in self.components if c.name != "broker"]
            self._stop(workers, self.cfg.run.shutdown_grace_s)
            if hasattr(self, "broker"):
                try:
                    self._drain()
                except BrokerUnavailable:
                    pass
            self._stop([c for c in self.components if c.name == "broker"], 5.0)
            signal.signal(signal.SIGINT, previous)
        if failed is not None:
            console.print(
                f"[red bold]{failed.name} exited with code {failed.proc.returncode}[/]; its log ({failed.log_path}):"
            )
            console.print(failed.tail(), markup=False)
            return 1
        summary = self._summary(before)
        console.print(
            f"[bold]done[/] in {summary['wall_seconds']:.0f}s: {summary['learner_steps']} steps, weight version "
            f"{summary['weight_version']}, reverse KL {_fmt(summary['reverse_kl_first'])} -> {_fmt(summary['reverse_kl_last'])}, "
            f"student accuracy {_fmt(summary['student_accuracy_before'])} -> {_fmt(summary['student_accuracy_after'])} "
            f"(teacher {_fmt(summary['teacher_accuracy'])}); summary in {self.out / 'summary.json'}"
        )
        return 130 if self.interrupted else 0

    def _run_monitored(self) -> Component | None:
        show = self.cfg.run.progress and sys.stdout.isatty()
        if not show:
            return self._monitor(None, None)
        columns = (TextColumn("learner"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            return self._monitor(progress, progress.add_task("steps", total=self.cfg.learner.max_steps))

    def _summary(self, before: dict[str, float | None]) -> dict:
        learner = json.loads((self.out / "learner_summary.json").read_text())
        summary = {
            "run_id": self.cfg.run.run_id,
            **learner,
            "trajectories_generated": int(self._totals("trajectories_generated", "actor")),
            "trajectories_scored": int(self._totals("trajectories_scored", "scorer")),
            "dead_lettered": self.state.dead_letters,
            "actor_weight_versions": {
                n: r.get("weight_version") for n, r in self.state.latest.items() if n.startswith("actor")
            },
            # each component's last counters (tokens, *_seconds, service_pad_seconds): per-stage costs, e.g. for
            # calibrating pipeline.service_time (benchmarks/pipeline.py)
            "components": {n: r for n, r in sorted(self.state.latest.items()) if n != "learner"},
            "teacher_accuracy": before["teacher"],
            "student_accuracy_before": before["student"],
            "student_accuracy_after": self._final_accuracy(),
            "wall_seconds": time.time() - self.started,
            "interrupted": self.interrupted,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
