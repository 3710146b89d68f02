"""What the launcher learns of a run while it trains: the components' metrics, the dead letters, the learner's stop.

Everything arrives over the broker under the launcher's own consumer group (`Streams.LAUNCHER_GROUP`), so the
components need not know a launcher exists. The monitor keeps the newest record per incarnation of each
component (a process: a restarted component starts its counters at 0 under a new one), so the summary sums
counters over incarnations and the status line takes rates within each; when it last heard each incarnation is
what tells the supervisor which components are alive, started here or by hand. It appends each dead letter to
runs/<id>/dead_letter.jsonl, and notes when the learner says stop, which is what makes the workers' clean exits
expected rather than failures.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from broker import Broker, BrokerUnavailable
from opd.config import Config
from opd.protocol import ProtocolError, Streams, trajectory_id, unpack_control

READ_BATCH = 256
MAX_READS = 8  # per drain of the metrics stream


Counts = dict[tuple[str, str], float]  # (component, incarnation) -> a counter's value in that incarnation


@dataclass
class Incarnation:
    """One process of a component, as its records describe it (a restarted component is a new incarnation)."""

    component: str
    record: dict  # its fields, newest value of each (a heartbeat carries counters and gauges only)
    seq: int = -1  # the newest record's sequence number: an older one arriving late changes nothing
    seen: float = 0.0  # launcher's monotonic time of its newest record: what liveness is judged by
    final: bool = False  # it sent its last record (it stopped cleanly)

    @property
    def role(self) -> str:
        return self.component.split("-")[0]

    @property
    def counters(self) -> list[str]:
        return [k for k in self.record.get("counters", ()) if isinstance(self.record.get(k), int | float)]

    def ingest(self, rec: dict, now: float) -> None:
        self.seen = now
        self.final = self.final or bool(rec.get("final"))
        seq = rec.get("seq")
        seq = self.seq + 1 if not isinstance(seq, int) else seq  # records without one: arrival order
        if seq > self.seq:
            self.seq = seq
            self.record.update(rec)


@dataclass
class RunState:
    """What the components reported, kept per incarnation so that totals are sums over restarts."""

    incarnations: dict[tuple[str, str], Incarnation] = field(default_factory=dict)
    learner_records: list[dict] = field(default_factory=list)
    dead_letters: int = 0
    eval_accuracy: float | None = None  # newest held-out accuracy the learner reported
    stopped: bool = False  # the learner announced stop on `control`
    last_status: tuple[float, dict[str, Counts]] = (0.0, {})

    def ingest(self, rec: dict, now: float) -> None:
        key = (str(rec.get("component", "?")), str(rec.get("incarnation", "")))
        inc = self.incarnations.get(key)
        if inc is None:
            inc = self.incarnations[key] = Incarnation(key[0], {})
        inc.ingest(rec, now)

    def counts(self, key: str, role: str) -> Counts:
        """Counter `key` of every incarnation of every component of `role`."""
        return {
            k: float(inc.record.get(key, 0) or 0) for k, inc in self.incarnations.items() if inc.role == role
        }

    def totals(self, key: str, role: str) -> float:
        """Sum of counter `key` over every incarnation of every component of `role` (restarts included)."""
        return sum(self.counts(key, role).values())

    @property
    def latest(self) -> dict[str, dict]:
        """component -> its newest incarnation's record, with each counter summed over its incarnations and
        `incarnations` (how many processes it has had)."""
        out: dict[str, dict] = {}
        for inc in self.incarnations.values():  # first seen first: a later incarnation is the newer one
            prev = out.get(inc.component)
            rec = dict(inc.record)
            if prev is not None:
                for k in set(inc.counters) | set(prev.get("counters", ())):
                    rec[k] = float(rec.get(k, 0) or 0) + float(prev.get(k, 0) or 0)
                rec["counters"] = sorted(set(inc.counters) | set(prev.get("counters", ())))
            rec["incarnations"] = (prev or {}).get("incarnations", 0) + 1
            out[inc.component] = rec
        return out

    def live(self, role: str, now: float, liveness_s: float) -> list[Incarnation]:
        """Incarnations of `role` heard from within `liveness_s` of `now` that have not said a final word."""
        return [
            inc
            for inc in self.incarnations.values()
            if inc.role == role and not inc.final and now - inc.seen <= liveness_s
        ]


def rate(before: Counts, now: Counts, seconds: float) -> float:
    """Per second between two readings of a counter, taken within each incarnation: a new incarnation counts
    from 0, one that vanished counts nothing, and a counter never goes back, so the rate is never negative."""
    if seconds <= 0:
        return 0.0
    return sum(max(0.0, v - before.get(k, 0.0)) for k, v in now.items()) / seconds


class Monitor:
    def __init__(self, cfg: Config, broker: Broker, out_dir: Path, console: Console):
        self.cfg, self.broker, self.out, self.console = cfg, broker, Path(out_dir), console
        self.streams = Streams(cfg.run.run_id)
        self.state = RunState()
        self.started = time.time()
        self.shown_step = 0
        self.heard = time.monotonic()  # when the metrics stream last answered
        self._bar: tuple[Progress, object] | None = None  # (bar, task) while `progress()` shows one
        # An earlier incarnation's stop (before --resume) is not this run's end.
        broker.skip_to_end(self.streams.control, Streams.LAUNCHER_GROUP)

    # --------------------------------------------------------------------------------------- reading
    def drain(self) -> None:
        """Take what has arrived: metrics, dead letters, and stop from `control`."""
        self._drain_metrics()
        self._drain_dead_letters()
        self._drain_control()

    def live(self, role: str, liveness_s: float) -> list[Incarnation]:
        """The incarnations of `role` that reported within `liveness_s` of the last time the metrics stream
        answered: while the broker is away nobody's liveness ages (they could not have been heard anyway)."""
        return self.state.live(role, self.heard, liveness_s)

    def run_over(self) -> bool:
        """Whether the learner has announced stop (reading `control` first); False while the broker is gone."""
        try:
            self._drain_control()
        except BrokerUnavailable:
            pass
        return self.state.stopped

    def _consume(self, stream: str):
        return self.broker.consume(stream, Streams.LAUNCHER_GROUP, Streams.LAUNCHER_GROUP, READ_BATCH, 0.0)

    def _drain_metrics(self) -> None:
        """Everything queued (a few reads at most): after a slow loop a backlog of one read would leave a
        fresh heartbeat unseen when the supervisor next judges who is alive."""
        for _ in range(MAX_READS):
            if len(self._drain_metrics_once()) < READ_BATCH:
                return

    def _drain_metrics_once(self) -> list:
        msgs = self._consume(self.streams.metrics)
        now = self.heard = time.monotonic()
        for msg in msgs:
            try:
                rec = unpack_control(msg.data)
            except ProtocolError:
                continue
            self.state.ingest(rec, now)
            if rec.get("component") == "learner" and "loss" in rec and not rec.get("heartbeat"):
                self.state.learner_records.append(rec)
                if "eval_accuracy" in rec:
                    self.state.eval_accuracy = rec["eval_accuracy"]
        self.broker.ack(self.streams.metrics, Streams.LAUNCHER_GROUP, [m.id for m in msgs])
        return msgs

    def _drain_dead_letters(self) -> None:
        """Append each rejected message's record (reason, source, trajectory id; not its bytes) to the ledger."""
        msgs = self._consume(self.streams.dead_letter)
        if not msgs:
            return
        with open(self.out / "dead_letter.jsonl", "a") as fh:
            for msg in msgs:
                try:
                    rec = unpack_control(msg.data)
                except ProtocolError:
                    continue
                rec.pop("head", None)
                data = rec.pop("data", None)
                rec["replayable"] = data is not None
                if rec.get("trajectory_id") is None and data is not None:
                    rec["trajectory_id"] = trajectory_id(data)
                fh.write(json.dumps(rec) + "\n")
        self.state.dead_letters += len(msgs)
        self.broker.ack(self.streams.dead_letter, Streams.LAUNCHER_GROUP, [m.id for m in msgs])

    def _drain_control(self) -> None:
        msgs = self._consume(self.streams.control)
        for msg in msgs:
            try:
                if unpack_control(msg.data)["kind"] == "stop":
                    self.state.stopped = True
            except ProtocolError:
                continue
        self.broker.ack(self.streams.control, Streams.LAUNCHER_GROUP, [m.id for m in msgs])

    # --------------------------------------------------------------------------------------- showing
    @contextmanager
    def progress(self):
        """A learner progress bar while the run trains, only on a terminal and if run.progress is on."""
        if not (self.cfg.run.progress and sys.stdout.isatty()):
            yield
            return
        columns = (TextColumn("learner"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            self._bar = (bar, bar.add_task("steps", total=self.cfg.learner.max_steps))
            yield
        self._bar = None

    def show(self) -> None:
        """Advance the bar to the learner's newest step; print the status line every run.status_every steps."""
        recs = self.state.learner_records
        if not recs or recs[-1]["step"] == self.shown_step:
            return
        every = self.cfg.run.status_every
        crossed = recs[-1]["step"] // every != self.shown_step // every
        self.shown_step = recs[-1]["step"]
        if self._bar is not None:
            bar, task = self._bar
            bar.update(task, completed=self.shown_step)
        if crossed:
            self.console.print(self.status_line())

    def status_line(self) -> str:
        rec = self.state.learner_records[-1]
        now = time.time()
        counts = {
            "gen": self.state.counts("tokens_generated", "actor"),
            "score": self.state.counts("tokens_scored", "scorer"),
            "train": self.state.counts("tokens_trained", "learner"),
        }
        then, before = self.state.last_status
        rates = {k: rate(before.get(k, {}), v, now - (then or self.started)) for k, v in counts.items()}
        self.state.last_status = (now, counts)
        try:
            teachers = list(self.cfg.teacher_pools())  # each queue: the sum over its teachers' streams
            rollouts, scored = (
                sum(self.broker.depth(x) for x in self.streams.for_teachers(kind, teachers))
                for kind in ("rollouts", "scored")
            )
            depth = f"queue {rollouts}/{scored}"
        except BrokerUnavailable:  # the status line is for the eye: a broker outage must not end the launcher
            depth = "queue ?/? (broker unavailable)"
        acc = f" acc {self.state.eval_accuracy:.3f}" if self.state.eval_accuracy is not None else ""
        return (
            f"step {rec['step']}/{self.cfg.learner.max_steps} v{rec['weight_version']} | tok/s gen {rates['gen']:.0f} "
            f"score {rates['score']:.0f} train {rates['train']:.0f} | {depth} | rkl {rec['reverse_kl']:.3f} "
            f"w {rec['importance_weight']:.2f} lag {rec['staleness_mean']:.1f}{acc}"
        )
