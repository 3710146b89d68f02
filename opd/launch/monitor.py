"""What the launcher learns of a run while it trains: the components' metrics, the dead letters, the learner's stop.

Everything arrives over the broker under the launcher's own consumer group (`Streams.LAUNCHER_GROUP`), so the
components need not know a launcher exists. The monitor keeps the newest record per component (for the status
line and the summary), appends each dead letter to runs/<id>/dead_letter.jsonl, and notes when the learner says
stop, which is what makes the workers' clean exits expected rather than failures.
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


@dataclass
class RunState:
    latest: dict[str, dict] = field(default_factory=dict)  # component -> newest metrics record
    learner_records: list[dict] = field(default_factory=list)
    dead_letters: int = 0
    eval_accuracy: float | None = None  # newest held-out accuracy the learner reported
    stopped: bool = False  # the learner announced stop on `control`
    last_status: tuple[float, dict[str, float]] = (0.0, {})

    def totals(self, key: str, role: str) -> float:
        """Sum of counter `key` over the newest records of every component of `role`."""
        return sum(r.get(key, 0) for n, r in self.latest.items() if n.split("-")[0] == role)


class Monitor:
    def __init__(self, cfg: Config, broker: Broker, out_dir: Path, console: Console):
        self.cfg, self.broker, self.out, self.console = cfg, broker, Path(out_dir), console
        self.streams = Streams(cfg.run.run_id)
        self.state = RunState()
        self.started = time.time()
        self.shown_step = 0
        self._bar: tuple[Progress, object] | None = None  # (bar, task) while `progress()` shows one
        # An earlier incarnation's stop (before --resume) is not this run's end.
        broker.skip_to_end(self.streams.control, Streams.LAUNCHER_GROUP)

    # --------------------------------------------------------------------------------------- reading
    def drain(self) -> None:
        """Take what has arrived: metrics, dead letters, and stop from `control`."""
        self._drain_metrics()
        self._drain_dead_letters()
        self._drain_control()

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
        msgs = self._consume(self.streams.metrics)
        for msg in msgs:
            try:
                rec = unpack_control(msg.data)
            except ProtocolError:
                continue
            self.state.latest[rec.get("component", "?")] = rec
            if rec.get("component") == "learner" and "loss" in rec:
                self.state.learner_records.append(rec)
                if "eval_accuracy" in rec:
                    self.state.eval_accuracy = rec["eval_accuracy"]
        self.broker.ack(self.streams.metrics, Streams.LAUNCHER_GROUP, [m.id for m in msgs])

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
        totals = {
            "gen": self.state.totals("tokens_generated", "actor"),
            "score": self.state.totals("tokens_scored", "scorer"),
            "train": self.state.totals("tokens_trained", "learner"),
        }
        then, before = self.state.last_status
        dt = max(now - (then or self.started), 1e-9)
        rates = {k: (v - before.get(k, 0)) / dt for k, v in totals.items()}
        self.state.last_status = (now, totals)
        depth = f"queue {self.broker.depth(self.streams.rollouts)}/{self.broker.depth(self.streams.scored)}"
        acc = f" acc {self.state.eval_accuracy:.3f}" if self.state.eval_accuracy is not None else ""
        return (
            f"step {rec['step']}/{self.cfg.learner.max_steps} v{rec['weight_version']} | tok/s gen {rates['gen']:.0f} "
            f"score {rates['score']:.0f} train {rates['train']:.0f} | {depth} | rkl {rec['reverse_kl']:.3f} "
            f"w {rec['importance_weight']:.2f} lag {rec['staleness_mean']:.1f}{acc}"
        )
