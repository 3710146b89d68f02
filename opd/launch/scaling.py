"""Teacher scorers added and removed while a run trains: `opd scale scorers=N` (`scorers.<teacher>=N` for one
teacher's pool of a run with several) and the optional autoscaler, which judges each pool from its own queue.

Scaling is a launcher's job, not a component's: `opd scale` only publishes a `scale` record on the run's
`control` stream, and whichever launcher owns the run (local processes or Ray) reads it with its own consumer
group, so the actors, scorers and learner (which ignore kinds they do not know) lose none of their entries. A
scorer is removed with SIGTERM: it finishes, publishes and acknowledges the batch in hand before it exits (on
the zmq broker nothing would ever redeliver it), so removing one loses nothing.

Every decision is printed with its reason and appended to runs/<id>/scaling.jsonl, together with per-interval
scored counts of each scorer, so the effect of a change can be read off afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from broker import Broker, BrokerUnavailable
from opd.config import Config, ScalingConfig
from opd.config.teachers import DEFAULT_TEACHER
from opd.launch.supervisor import Slot, Supervisor, teacher_of
from opd.protocol import ProtocolError, Streams, scale_record, unpack_control
from opd.runtime.broker import open_broker

SCALE_KIND = "scale"
CONTROL_GROUP = "launcher-scaling"  # its own group: the launcher must not take entries meant for components


class ScaleError(ValueError):
    """An `opd scale` request that cannot be sent; the message says how to write it."""


# ------------------------------------------------------------------------------------------ `opd scale`
Targets = dict[str | None, int]  # teacher (None: `scorers=N`, the run's one teacher) -> scorers wanted


def parse_targets(items: list[str]) -> tuple[Targets, list[str]]:
    """Split `scorers=N` and `scorers.<teacher>=N` from the dotted config overrides that may follow them (there
    is no `scorers` config section, so neither is ever an override)."""
    targets: Targets = {}
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        head, dot, teacher = key.partition(".")
        if head != "scorers" or not sep or dot and not teacher:
            overrides.append(item)
            continue
        try:
            n = int(value)
        except ValueError:
            raise ScaleError(f"{key}={value!r} is not a whole number; write e.g. {key}=3") from None
        if n < 1:
            raise ScaleError(f"{key}={n}: a teacher's pool needs at least 1 scorer to make progress")
        targets[teacher or None] = n
    if not targets:
        raise ScaleError(
            "say how many scorers the run should have, e.g. `opd scale --config ... scorers=3`, or for one "
            "teacher's pool of a run with several, scorers.<teacher>=3"
        )
    return targets, overrides


def resolve_targets(cfg: Config, targets: Targets) -> dict[str, int]:
    """The pools `targets` name, checked against the run's teachers: `scorers=N` is the one teacher's pool and is
    refused with several (which one would it be?); an unknown teacher is refused naming the run's."""
    pools = list(cfg.teacher_pools())
    named = ", ".join(pools)
    out: dict[str, int] = {}
    for teacher, n in targets.items():
        if teacher is None:
            if len(pools) > 1:
                raise ScaleError(
                    f"scorers={n}: this run has several teachers ({named}), each with its own scorer pool; "
                    f"scale one with scorers.<teacher>=N, e.g. scorers.{pools[0]}={n}"
                )
            teacher = pools[0]
        elif teacher not in pools:
            raise ScaleError(f"scorers.{teacher}: no teacher {teacher!r} in this run; its teachers: {named}")
        out[teacher] = n
    return out


def publish_scale(cfg: Config, scorers: int | dict[str, int], source: str = "opd scale") -> list[str]:
    """Ask the run's launcher for teacher scorers: `scorers` per teacher (an int: the run's one teacher);
    returns the control entry ids, one per pool."""
    if cfg.run.run_id is None:
        raise ScaleError("run.run_id is not set: pass the run's own runs/<id>/config.yaml to --config")
    wanted = resolve_targets(cfg, {None: scorers} if isinstance(scorers, int) else dict(scorers))
    broker = open_broker(cfg.broker)
    try:
        return broker.publish(
            Streams(cfg.run.run_id).control,
            [scale_record("scorer", n, source, teacher=t) for t, n in wanted.items()],
        )
    finally:
        broker.close()


# ------------------------------------------------------------------------------------------ autoscaler
@dataclass(frozen=True)
class Decision:
    target: int
    reason: str


def autoscale_decision(
    current: int, mean_depth: float, cfg: ScalingConfig, since_change_s: float
) -> Decision | None:
    """How many scorers the run should have now, or None to leave it. Pure, so the policy is unit-tested.

    The bounds are restored at once; otherwise one scorer at a time, at most once per cooldown, so each change
    shows its effect on the queue before the next one is made."""
    if current < cfg.min_scorers:
        return Decision(cfg.min_scorers, f"{current} scorers < scaling.min_scorers={cfg.min_scorers}")
    if current > cfg.max_scorers:
        return Decision(cfg.max_scorers, f"{current} scorers > scaling.max_scorers={cfg.max_scorers}")
    if since_change_s < cfg.cooldown_s:
        return None
    if mean_depth > cfg.queue_high and current < cfg.max_scorers:
        return Decision(current + 1, f"rollouts depth {mean_depth:.1f} > scaling.queue_high={cfg.queue_high}")
    if mean_depth < cfg.queue_low and current > cfg.min_scorers:
        return Decision(current - 1, f"rollouts depth {mean_depth:.1f} < scaling.queue_low={cfg.queue_low}")
    return None


# ------------------------------------------------------------------------------------------ launcher side
class ScorerPool(Protocol):
    """What a launcher offers the scaler for one teacher's pool: its live scorers, and starting or retiring one."""

    def active_scorers(self) -> list[str]:
        """Names of the pool's scorers running and not being retired, oldest first."""

    def start_scorer(self, index: int) -> None: ...

    def retire_scorer(self, name: str) -> None:
        """SIGTERM it; it finishes the batch in hand. Its exit is not a component failure."""

    def reap(self) -> list[tuple[str, int]]:
        """The pool's retired scorers that have exited since the last call, with their exit codes; kill one that
        outlived run.shutdown_grace_s."""


@dataclass
class PoolScaling:
    """One teacher's pool as the scaler keeps it: its processes, its queue, its own cooldown and next index."""

    teacher: str
    pool: ScorerPool
    rollouts: str  # its queue: Streams.rollouts_for(teacher)
    next_index: int
    last_change: float
    depths: list[tuple[float, int]] = field(default_factory=list)

    @property
    def target_key(self) -> str:
        """How `opd scale` and the log name this pool: `scorers` for the default teacher, `scorers.<teacher>`."""
        return "scorers" if self.teacher == DEFAULT_TEACHER else f"scorers.{self.teacher}"


class ScorerScaler:
    """Driven from a launcher's watch loop: reads `scale` records, runs the autoscaler on each teacher's pool from
    that pool's own queue, applies the targets and records per-interval scored counts per scorer and per pool.

    `pools`: teacher -> its ScorerPool (a bare ScorerPool: the run's one teacher)."""

    def __init__(
        self,
        cfg: Config,
        broker: Broker,
        pools: ScorerPool | Mapping[str, ScorerPool],
        out_dir: Path,
        latest: Callable[[], dict[str, dict]],
        log: Callable[[str], None],
    ):
        self.cfg, self.broker, self.latest, self.log = cfg, broker, latest, log
        self.path = Path(out_dir) / "scaling.jsonl"
        streams = Streams(cfg.run.run_id)
        self.control = streams.control
        teachers = cfg.teacher_pools()
        if not isinstance(pools, Mapping):
            pools = {next(iter(teachers)): pools}
        now = time.monotonic()
        self.pools = {
            t: PoolScaling(t, pool, streams.rollouts_for(t), teachers[t].scorer.num_scorers, now)
            for t, pool in pools.items()
        }
        self.last_interval = (now, self._scored_totals())
        self.run_over = False  # the learner announced stop: scorers exit by themselves, none is replaced
        # An earlier incarnation's commands (before --resume) are not for this launcher.
        broker.skip_to_end(self.control, CONTROL_GROUP)

    def tick(self) -> None:
        try:
            self._read_commands()
            if self.cfg.scaling.autoscale and not self.run_over:
                for state in self.pools.values():
                    self._autoscale(state)
            self._record_interval()
        except BrokerUnavailable:
            pass  # the launcher's own loop notices a broker that is gone
        for state in self.pools.values():
            for name, code in state.pool.reap():
                self.log(f"{name} stopped (exit code {code}) after scaling down")
                self._write(event="stopped", name=name, code=code, teacher=state.teacher)

    # -------------------------------------------------------------------------------- inputs
    def _read_commands(self) -> None:
        msgs = self.broker.consume(self.control, CONTROL_GROUP, "launcher", 64, 0.0)
        for msg in msgs:
            try:
                rec = unpack_control(msg.data)
            except ProtocolError:
                continue
            if rec["kind"] == "stop":
                self.run_over = True
            if rec["kind"] != SCALE_KIND or rec.get("role") != "scorer":
                continue
            self._request(rec)
        self.broker.ack(self.control, CONTROL_GROUP, [m.id for m in msgs])

    def _request(self, rec: dict) -> None:
        """One `scale` record: refused with a line in the log when it cannot be applied, else applied."""
        if self.run_over:
            self.log("[yellow]scale: ignored, the run is stopping[/]")
            return
        target, teacher = rec.get("target"), rec.get("teacher")
        if teacher is None and len(self.pools) == 1:  # a record of an older `opd scale`: the one pool
            teacher = next(iter(self.pools))
        if teacher not in self.pools:
            self.log(
                f"[yellow]scale: ignored a request for teacher {teacher!r}: this launcher runs the pools of "
                f"{', '.join(self.pools)} (write scorers.<teacher>=N)[/]"
            )
            return
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            self.log(
                f"[yellow]scale: ignored a request for {target!r} scorers (needs a whole number >= 1)[/]"
            )
            return
        self.apply(Decision(target, f"requested by {rec.get('source', '?')}"), "opd scale", teacher)

    def _autoscale(self, state: PoolScaling) -> None:
        now = time.monotonic()
        state.depths.append((now, self.broker.depth(state.rollouts)))
        window = self.cfg.scaling.cooldown_s
        state.depths = [(t, d) for t, d in state.depths if now - t <= window]
        mean_depth = sum(d for _, d in state.depths) / len(state.depths)
        current = len(state.pool.active_scorers())
        decision = autoscale_decision(current, mean_depth, self.cfg.scaling, now - state.last_change)
        if decision is not None and decision.target != current:
            self.apply(decision, "autoscaler", state.teacher)

    # -------------------------------------------------------------------------------- actions
    def apply(self, decision: Decision, source: str, teacher: str | None = None) -> None:
        """Bring `teacher`'s pool (None: the run's one teacher) to `decision.target` scorers: start new ones with
        fresh indices, or retire the newest."""
        state = self.pools[teacher if teacher is not None else next(iter(self.pools))]
        pool, active = state.pool, state.pool.active_scorers()
        state.last_change = time.monotonic()
        state.depths.clear()  # the next window judges the new size only
        self.log(
            f"[bold]scale[/] {state.target_key} {len(active)} -> {decision.target} ({source}: {decision.reason})"
        )
        self._write(
            event="decision",
            source=source,
            teacher=state.teacher,
            before=len(active),
            target=decision.target,
            reason=decision.reason,
        )
        for _ in range(decision.target - len(active)):
            index, state.next_index = state.next_index, state.next_index + 1
            name = Slot.scorer(state.teacher, index).name
            try:
                pool.start_scorer(index)
            except Exception as exc:  # a scorer that cannot be placed must not end a run that is training
                self.log(f"[yellow]scale: could not start {name}: {exc}[/]")
                self._write(event="start_failed", name=name, teacher=state.teacher, error=str(exc))
                continue
            self.log(f"scale: started {name}")
            self._write(event="started", name=name, teacher=state.teacher)
        surplus = len(active) - decision.target
        for name in reversed(active[len(active) - surplus :] if surplus > 0 else []):  # newest first
            pool.retire_scorer(name)
            self.log(f"scale: stopping {name} (SIGTERM: it finishes the batch in hand first)")
            self._write(event="retired", name=name, teacher=state.teacher)

    def _scored_totals(self) -> dict[str, float]:
        return {
            name: rec.get("trajectories_scored", 0)
            for name, rec in self.latest().items()
            if teacher_of(name) is not None
        }

    def _record_interval(self) -> None:
        """Scored trajectories per scorer since the last record: what each scorer contributed while it ran; with
        several teachers, each pool's scorers, scored count and queue depth under `teachers` as well (the
        top-level fields stay the whole run's, as a one-teacher run has always written them)."""
        now = time.monotonic()
        then, before = self.last_interval
        if now - then < self.cfg.scaling.interval_s:
            return
        totals = self._scored_totals()
        scored = {n: int(v - before.get(n, 0)) for n, v in sorted(totals.items()) if v != before.get(n, 0)}
        self.last_interval = (now, totals)
        per_pool = {
            t: {
                "active": state.pool.active_scorers(),
                "scored_total": sum(v for n, v in scored.items() if teacher_of(n) == t),
                "rollouts_depth": self.broker.depth(state.rollouts),
            }
            for t, state in self.pools.items()
        }
        self._write(
            event="interval",
            seconds=round(now - then, 3),
            active=[n for p in per_pool.values() for n in p["active"]],
            scored=scored,
            scored_total=sum(scored.values()),
            rollouts_depth=sum(p["rollouts_depth"] for p in per_pool.values()),
            **({"teachers": per_pool} if len(per_pool) > 1 else {}),
        )

    def _write(self, **record) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")


class SupervisorPool:
    """One teacher's ScorerPool in `opd run` (local or Ray): the supervisor's scorers of that pool, through its
    public spawn and retire."""

    def __init__(self, supervisor: Supervisor, teacher: str = DEFAULT_TEACHER):
        self.supervisor = supervisor
        self.unit = Slot.scorer(teacher, 0).unit  # the supervisor's name for the pool
        self.teacher = teacher

    def active_scorers(self) -> list[str]:
        return [c.name for c in self.supervisor.active(self.unit)]

    def start_scorer(self, index: int) -> None:
        self.supervisor.spawn_slot(Slot.scorer(self.teacher, index))

    def retire_scorer(self, name: str) -> None:
        comp = next(c for c in self.supervisor.active(self.unit) if c.name == name)
        self.supervisor.retire(comp.slot.role, comp.slot.index, comp.slot.pool)

    def reap(self) -> list[tuple[str, int]]:
        return [(c.name, code) for c, code in self.supervisor.reap(self.unit)]


def spawn_scorer_pools(cfg: Config, supervisor: Supervisor) -> None:
    """`opd run`'s scorers: each teacher's pool its own `scorer.num_scorers` (teachers.<name>.scorer over the
    scorer section), named `scorer-<i>` for the default teacher and `scorer-<teacher>-<i>` for a named one."""
    for teacher, pool in cfg.teacher_pools().items():
        for i in range(pool.scorer.num_scorers):
            supervisor.spawn_slot(Slot.scorer(teacher, i))


def supervisor_pools(cfg: Config, supervisor: Supervisor) -> dict[str, SupervisorPool]:
    """Every teacher's pool of the run, for ScorerScaler."""
    return {t: SupervisorPool(supervisor, t) for t in cfg.teacher_pools()}
