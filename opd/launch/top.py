"""`opd top`: a live terminal view of a run, read from its broker's `metrics` stream (no Prometheus needed).

It reads under a consumer group of its own (`top-<host>-<pid>`): log streams fan out to every group on both brokers,
so the launcher's group still gets every record. Entries are acknowledged at once so nothing stays pending for us
(on Redis an acknowledgement never deletes a log entry; the zmq broker trims only what every existing group has
passed, and the launcher's group exists from the start of a run).
Rates come from the records themselves (counter deltas over the component's own uptime, within one incarnation:
a restarted component starts from 0 under a new one), so they are true for a finished run too and never negative;
totals are sums over a component's incarnations. A finished zmq run has no broker left; then the view is rebuilt from runs/<id>/metrics.jsonl and
summary.json.
With several teachers (`teachers:`) a table per teacher follows: its pool's live scorers, scored tokens/s, its own
queues' depths, mean seconds per scored batch, failures (teacher failures + dead letters) and its share of the
trajectories trained (opd/launch/teacher_stats.py); a run of one teacher shows no such table.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from broker import BrokerUnavailable
from broker.base import WORK_STREAMS
from opd.config import Config
from opd.launch.report_page import trajectories_of
from opd.launch.teacher_stats import JOIN_TIMEOUTS, TRAINED, per_teacher, pool_members
from opd.protocol import ProtocolError, Streams, unpack_control
from opd.runtime.broker import open_broker

RATE_WINDOW_S = 10.0  # rates are averaged over this much of a component's own uptime
STAGE = {"actor": "generated", "scorer": "scored", "learner": "trained"}
READ_BATCH = 1000
# summary.json's reverse_kl_last is the mean of the learner's last KL_WINDOW per-step values (learner/state.py,
# which this light process does not import: tests/unit/test_top_view.py keeps the two equal)
KL_WINDOW = 5
CONNECT_TIMEOUT_S = 3.0


@dataclass
class TopState:
    """Newest record and a short history per component, enough for rates and the learner's figures."""

    history: dict[str, deque] = field(default_factory=dict)  # the newest incarnation's recent records
    current: dict[str, str] = field(default_factory=dict)  # component -> its newest incarnation
    counts: dict[tuple[str, str], dict[str, Any]] = field(
        default_factory=dict
    )  # newest record per incarnation
    eval_accuracy: float | None = None
    depths: dict[str, int] = field(default_factory=dict)
    last_step: dict[str, Any] = field(default_factory=dict)  # the learner's newest per-step record
    last_sync_s: float | None = None  # no sync follows the last step, so the newest step may have none
    kl_recent: deque = field(default_factory=lambda: deque(maxlen=KL_WINDOW))  # newest steps' reverse KL
    kl_steps: int = 0  # learner steps whose reverse KL was seen
    kl_last_step: int = -1
    finished: bool = False
    source: str = ""
    teacher_depths: dict[str, dict[str, int]] = field(default_factory=dict)  # teacher -> kind -> entries
    # the learner's per-teacher running totals (`trajectories_trained:<teacher>`, `join_timeouts:<teacher>`)
    per_teacher: dict[str, float] = field(default_factory=dict)

    def ingest(self, rec: dict[str, Any]) -> None:
        name, inc = str(rec.get("component", "?")), str(rec.get("incarnation", ""))
        known = self.counts.get((name, inc))
        seq = rec.get("seq")
        if known is not None and isinstance(seq, int) and seq <= known.get("seq", -1):
            return  # an older record (a heartbeat sent from its own connection) arriving late
        self.counts[(name, inc)] = {**(known or {}), **rec}
        if known is None and self.current.get(name) != inc:  # a new incarnation: rates start again from it
            self.current[name] = inc
            self.history[name] = deque()
        elif self.current.get(name) != inc:
            return  # a late record of an incarnation already replaced: its totals only
        hist = self.history[name]
        hist.append(rec)
        while (
            len(hist) > 2 and float(rec.get("uptime", 0)) - float(hist[1].get("uptime", 0)) >= RATE_WINDOW_S
        ):
            hist.popleft()
        if name == "learner" and "step" in rec:
            self.last_step = rec
            self._note_kl(rec)
        if name == "learner" and isinstance(rec.get("weight_sync_seconds"), int | float):
            self.last_sync_s = float(rec["weight_sync_seconds"])
        if isinstance(rec.get("eval_accuracy"), int | float):
            self.eval_accuracy = float(rec["eval_accuracy"])
        if name == "learner" and rec.get("final"):
            self.finished = True
        if (
            name == "learner"
        ):  # running totals (restored from the checkpoint on resume): the newest is the run's
            keys = (TRAINED, JOIN_TIMEOUTS)
            self.per_teacher.update({k: float(v) for k, v in rec.items() if k.startswith(keys)})

    def _note_kl(self, rec: dict[str, Any]) -> None:
        step, kl = rec.get("step"), rec.get("reverse_kl")
        if isinstance(step, int) and isinstance(kl, int | float) and step > self.kl_last_step:
            self.kl_recent.append(float(kl))
            self.kl_steps, self.kl_last_step = self.kl_steps + 1, step

    def reverse_kl(self) -> float | None:
        """The summary's reverse_kl_last, computed the same way: the mean over the last min(KL_WINDOW,
        steps // 2) steps (at least one). A single step's KL is noisy; this is the figure the run ends with."""
        if not self.kl_recent:
            return None
        w = min(KL_WINDOW, max(1, self.kl_steps // 2), len(self.kl_recent))
        return sum(list(self.kl_recent)[-w:]) / w

    def latest(self, name: str) -> dict[str, Any]:
        return self.history[name][-1]

    def counts_of(self, name: str) -> dict[str, float]:
        """Every counter of component `name` summed over its incarnations."""
        out: dict[str, float] = {}
        for (n, _), rec in self.counts.items():
            if n == name:
                for k, v in rec.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        out[k] = out.get(k, 0.0) + float(v)
        return out

    def total(self, name: str, key: str) -> float | None:
        """Counter `key` of component `name` summed over its incarnations (None if none reported it)."""
        values = [
            r[key] for (n, _), r in self.counts.items() if n == name and isinstance(r.get(key), int | float)
        ]
        return float(sum(values)) if values else None

    def rate(self, name: str, key: str) -> float | None:
        """Per second over the window: counter delta over uptime delta (or the average since start)."""
        hist = self.history[name]
        new, old = hist[-1], hist[0]
        dt = float(new.get("uptime", 0)) - float(old.get("uptime", 0))
        if key not in new:
            return None
        if len(hist) < 2 or dt <= 0:
            up = float(new.get("uptime", 0))
            return max(0.0, float(new[key])) / up if up > 0 else None
        return max(0.0, float(new[key]) - float(old.get(key, 0))) / dt

    def wait_fraction(self) -> float | None:
        """The learner's time waiting for data over wall time, across the window's step records."""
        steps = [r for r in self.history.get("learner", ()) if "wait_seconds" in r and "time" in r]
        if not steps:
            return None
        if len(steps) == 1:
            r = steps[0]
            return r["wait_seconds"] / max(r["wait_seconds"] + r.get("step_seconds", 0), 1e-9)
        wall = steps[-1]["time"] - steps[0]["time"]
        return min(1.0, sum(r["wait_seconds"] for r in steps[1:]) / wall) if wall > 0 else None


def _role(name: str) -> str:
    return name.split("-")[0]


def _num(value: Any, fmt: str) -> str:
    if not isinstance(value, int | float):
        return "-"
    return format(int(value) if fmt == "d" else value, fmt)


def _count(value: Any) -> str:
    """A counter in at most 6 characters (12345, 1.23M), so the table fits 80 columns on a long run."""
    if not isinstance(value, int | float):
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M")):
        if abs(value) >= limit:
            return f"{value / limit:.2f}{suffix}"
    return f"{value:.0f}"


def _short(value: Any) -> str:
    """A float in at most 9 characters: 3 decimals in the usual range, else 3 significant digits."""
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.3f}" if value == 0 or 0.001 <= abs(value) < 1000 else f"{value:.2e}"


def _table(title: str, columns: tuple[str, ...], caption: str | None = None) -> Table:
    """Headers never wrap or shorten: every header and value of our tables fits 80 columns as written."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in ("component", "teacher") else "right", no_wrap=True)
    return table


def component_table(state: TopState) -> Table:
    table = _table(
        "components",
        ("component", "weights", "traj/s", "tok/s", "trajs", "tokens", "dead", "up s"),
        "weights: weight version; trajs, tokens: totals over restarts; dead: dead-lettered",
    )
    order = {"learner": 0, "actor": 1, "scorer": 2}
    for name in sorted(state.history, key=lambda n: (order.get(_role(n), 3), n)):
        rec, stage = state.latest(name), STAGE.get(_role(name), "")
        traj, tok = f"trajectories_{stage}", f"tokens_{stage}"
        table.add_row(
            name,
            _num(rec.get("weight_version"), "d"),
            _num(state.rate(name, traj), ".1f"),
            _count(state.rate(name, tok)),
            _count(state.total(name, traj)),
            _count(state.total(name, tok)),
            _count(state.total(name, "dead_lettered") or 0),
            _count(rec.get("uptime")),
        )
    return table


def learner_table(state: TopState, max_steps: int) -> Table:
    table = _table(
        "learner",
        ("step", "loss", "rev KL", "lag", "accuracy", "wait", "sync s"),
        f"rev KL: mean of the last steps (up to {KL_WINDOW}), as summary.json's reverse_kl_last; "
        "lag: mean/max weight versions behind, over the trained tokens; wait: fraction of time waiting for data",
    )
    rec = state.last_step
    step = f"{rec['step']}/{max_steps}" if isinstance(rec.get("step"), int) else "-"
    table.add_row(
        step,
        _short(rec.get("loss")),
        _short(state.reverse_kl()),
        f"{_num(rec.get('staleness_mean'), '.1f')}/{_num(rec.get('staleness_max'), 'd')}",
        _num(state.eval_accuracy, ".3f"),
        _num(state.wait_fraction(), ".2f"),
        _num(state.last_sync_s, ".3f"),
    )
    return table


def stream_table(state: TopState) -> Table | None:
    """Streaming actors (actor.generation: stream): sequences in flight now, the share of decode steps where a
    slot was busy, the mean wait from a trajectory's end to its publication, weight versions per trajectory.
    None when no actor streams."""
    actors = [n for n in sorted(state.history) if _role(n) == "actor" and state.total(n, "slot_steps")]
    if not actors:
        return None
    table = _table(
        "streaming actors",
        ("component", "in flight", "busy", "publish s", "versions/traj"),
        "busy: share of decode steps where a slot was busy; publish s: mean seconds from a trajectory's end to "
        "its publication; versions/traj: weight versions that sampled one trajectory's tokens",
    )
    for name in actors:
        published = state.total(name, "trajectories_generated") or 0
        table.add_row(
            name,
            _num(state.latest(name).get("inflight"), "d"),
            _num((state.total(name, "slot_busy_steps") or 0) / state.total(name, "slot_steps"), ".2f"),
            _num((state.total(name, "publish_delay_seconds") or 0) / published if published else None, ".3f"),
            _num((state.total(name, "trajectory_versions") or 0) / published if published else None, ".2f"),
        )
    return table


def ranks_table(state: TopState) -> Table | None:
    """The learner's ranks (learner.num_ranks > 1): their number and the last step's token imbalance (both on the
    metrics stream), and per rank step/comm seconds and tokens where the record has them (metrics.jsonl: a
    finished run read from its files; the stream carries numbers only)."""
    rec = state.last_step
    if not isinstance(rec.get("learner_ranks"), int) or rec["learner_ranks"] < 2:
        return None
    step_s, comm_s, tokens = (
        rec.get(k) or [] for k in ("rank_step_seconds", "rank_comm_seconds", "rank_tokens")
    )
    imbalance = f"token imbalance {_num(rec.get('rank_token_imbalance'), '.3f')} (heaviest rank / mean)"
    where = "" if step_s else "; per rank: metrics.jsonl and Prometheus (opd_learner_rank_*)"
    table = _table(
        f"learner ranks: {rec['learner_ranks']}", ("rank", "step s", "comm s", "tokens"), imbalance + where
    )
    for rank in range(len(step_s)):
        cells = ((step_s, _short), (comm_s, _short), (tokens, _count))
        table.add_row(str(rank), *(fmt(c[rank]) if rank < len(c) else "-" for c, fmt in cells))
    return table


def queue_table(state: TopState) -> Table:
    table = _table("queues (entries)", WORK_STREAMS)
    table.add_row(*(_count(state.depths.get(s)) for s in WORK_STREAMS))
    return table


def _pool_rate(state: TopState, members: list[str], key: str) -> float | None:
    rates = [state.rate(n, key) for n in members]
    known = [r for r in rates if r is not None]
    return sum(known) if known else None


def teacher_table(state: TopState, teachers: list[str]) -> Table:
    """One row per teacher of a run of several (render shows it only then)."""
    table = _table(
        "teachers",
        ("teacher", "scorers", "tok/s", "rollouts", "scored", "batch s", "failed", "share"),
        "scorers: live members of its pool; tok/s: scored; rollouts, scored: its own queues (entries); "
        "batch s: mean seconds per scored batch; failed: teacher failures + dead letters + joins timed out "
        "without its copy; share: of the "
        "trajectories trained (a mixture by its route's weights)",
    )
    totals = {n: state.counts_of(n) for n in state.history}
    rows = per_teacher(teachers, totals, state.per_teacher)
    for t, row in rows.items():
        members = pool_members(t, state.history)
        alive = sum(1 for n in members if not state.latest(n).get("final"))
        seconds, batches = (_pool_rate(state, members, k) for k in ("score_seconds", "score_batches"))
        latency = seconds / batches if seconds is not None and batches else row["batch_seconds"]
        depths = state.teacher_depths.get(t, {})
        table.add_row(
            t,
            str(alive),
            _count(_pool_rate(state, members, "tokens_scored")),
            _count(depths.get("rollouts")),
            _count(depths.get("scored")),
            _short(latency),
            _count(row["failures"]),
            "-" if row["share"] is None else f"{row['share']:.1%}",
        )
    return table


def render(state: TopState, cfg: Config) -> Group:
    status = "finished" if state.finished else "running"
    head = f"opd top | run {cfg.run.run_id} | {status} | {state.source}"
    tables = [component_table(state), learner_table(state, cfg.learner.max_steps)]
    if (stream := stream_table(state)) is not None:
        tables.append(stream)
    ranks = ranks_table(state)
    if ranks is not None:
        tables.append(ranks)
    if state.depths:  # a finished run read from its files has no queues to show
        tables.append(queue_table(state))
    teachers = list(cfg.teacher_pools())
    if len(teachers) > 1:
        tables.append(teacher_table(state, teachers))
    return Group(head, *tables)


class StreamReader:
    """Reads new `metrics` records under this viewer's own consumer group, and the work queues' depths."""

    def __init__(self, cfg: Config):
        quick = cfg.broker.model_copy(update={"request_timeout_s": CONNECT_TIMEOUT_S})
        self.broker = open_broker(quick)
        self.run_id = cfg.run.run_id
        self.teachers = list(cfg.teacher_pools())  # a queue's depth: the sum over its teachers' streams
        self.stream = Streams(self.run_id).metrics
        self.group = f"top-{socket.gethostname()}-{os.getpid()}"

    def poll(self, state: TopState) -> None:
        while True:
            msgs = self.broker.consume(self.stream, self.group, self.group, READ_BATCH, 0.0)
            for m in msgs:
                try:
                    state.ingest(unpack_control(m.data))
                except ProtocolError:
                    continue
            if msgs:
                self.broker.ack(self.stream, self.group, [m.id for m in msgs])
            if len(msgs) < READ_BATCH:
                break
        streams = Streams(self.run_id)
        per = {
            s: dict(
                zip(
                    self.teachers, map(self.broker.depth, streams.for_teachers(s, self.teachers)), strict=True
                )
            )
            for s in WORK_STREAMS
        }
        state.depths = {s: sum(d.values()) for s, d in per.items()}
        state.teacher_depths = {t: {s: per[s][t] for s in WORK_STREAMS} for t in self.teachers}

    def close(self) -> None:
        try:  # a broker keeps a group until told (Redis): leave no trace per viewer
            self.broker.drop_group(self.stream, self.group)
        except Exception:  # gone with the server, or never created: nothing to tidy
            pass
        self.broker.close()


def state_from_files(cfg: Config) -> TopState | None:
    """A finished run whose broker is gone: the learner from metrics.jsonl, the workers' totals from summary.json."""
    out = Path(cfg.run.output_dir or Path("runs") / str(cfg.run.run_id))
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return None
    state = TopState(source=f"broker gone; from {out}/metrics.jsonl and summary.json")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    start = (
        records[0]["time"] - records[0].get("step_seconds", 0) - records[0].get("wait_seconds", 0)
        if records
        else 0
    )
    tokens = trajs = 0
    for r in records:
        tokens += r.get("tokens", 0)
        trajs += trajectories_of(r)
        state.ingest(
            {**r, "component": "learner", "uptime": r["time"] - start, "tokens_trained": tokens,
             "trajectories_trained": trajs}
        )  # fmt: skip
    if records:  # each teacher's queues at the last step (`queue_<kind>:<teacher>`, several teachers only)
        for key, depth in records[-1].items():
            kind, _, teacher = key.removeprefix("queue_").partition(":")
            if key.startswith("queue_") and teacher and kind in WORK_STREAMS:
                state.teacher_depths.setdefault(teacher, {})[kind] = depth
    summary = out / "summary.json"
    if summary.exists():
        _ingest_summary(state, json.loads(summary.read_text()))
    return state


def _ingest_summary(state: TopState, s: dict[str, Any]) -> None:
    """The workers of a finished run: each component's last record (weight version, counters summed over its
    incarnations, uptime) as the launcher kept it in summary.json; runs written before it kept them give one
    total per role."""
    state.finished = True
    teachers = s.get("teachers") if isinstance(s.get("teachers"), dict) else {}
    for t, row in teachers.items():  # the learner's per-teacher totals, as the launcher kept them
        for prefix, key in ((TRAINED, "trajectories_trained"), (JOIN_TIMEOUTS, "join_timeouts")):
            if isinstance(row, dict) and isinstance(row.get(key), int | float):
                state.per_teacher[prefix + t] = float(row[key])
    components = {n: r for n, r in (s.get("components") or {}).items() if isinstance(r, dict)}
    for name, rec in components.items():
        state.ingest({**rec, "component": name, "incarnation": "summary"})
    for role, stage in (("actor", "generated"), ("scorer", "scored")):
        total = s.get(f"trajectories_{stage}")
        if isinstance(total, int | float) and not any(_role(n) == role for n in components):
            state.ingest(
                {
                    "component": f"{role}-all",
                    "uptime": s.get("wall_seconds", 0),
                    f"trajectories_{stage}": total,
                }
            )


def run_top(cfg: Config, once: bool, interval_s: float = 1.0, console: Console | None = None) -> int:
    console = console or Console()
    state = TopState(source=f"{cfg.broker.type} broker metrics stream")
    reader = StreamReader(cfg)
    try:
        reader.poll(state)
    except BrokerUnavailable:
        reader.close()
        fallback = state_from_files(cfg)
        if fallback is None:
            console.print(
                f"opd top: the run's broker does not answer and {cfg.run.output_dir} has no metrics.jsonl"
            )
            return 1
        console.print(render(fallback, cfg))
        return 0
    if once:
        console.print(render(state, cfg))
        reader.close()
        return 0
    try:
        with Live(render(state, cfg), console=console, refresh_per_second=4) as live:
            while not state.finished:
                time.sleep(interval_s)
                try:
                    reader.poll(state)
                except BrokerUnavailable:  # the run is over: its directory has every step, the stream may not
                    final = state_from_files(cfg)
                    if final is None:
                        state.source = "broker gone (run over?)"
                    state = final or state
                    state.finished = True
                live.update(render(state, cfg))
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()
    return 0
