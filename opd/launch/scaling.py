"""Teacher scorers added and removed while a run trains: `opd scale scorers=N` and the optional autoscaler.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker import Broker, BrokerUnavailable
from opd.config import Config, ScalingConfig
from opd.launch.supervisor import Supervisor
from opd.protocol import ProtocolError, Streams, scale_record, unpack_control
from opd.runtime.broker import open_broker

SCALE_KIND = "scale"
CONTROL_GROUP = "launcher-scaling"  # its own group: the launcher must not take entries meant for components


class ScaleError(ValueError):
    """An `opd scale` request that cannot be sent; the message says how to write it."""


# ------------------------------------------------------------------------------------------ `opd scale`
def parse_targets(items: list[str]) -> tuple[int, list[str]]:
    """Split `scorers=N` from the dotted config overrides that may follow it."""
    target, overrides = None, []
    for item in items:
        key, sep, value = item.partition("=")
        if key == "scorers" and sep:
            try:
                target = int(value)
            except ValueError:
                raise ScaleError(f"scorers={value!r} is not a whole number; write e.g. scorers=3") from None
        else:
            overrides.append(item)
    if target is None:
        raise ScaleError("say how many scorers the run should have, e.g. `opd scale --config ... scorers=3`")
    if target < 1:
        raise ScaleError(f"scorers={target}: a run needs at least 1 scorer to make progress")
    return target, overrides


def publish_scale(cfg: Config, scorers: int, source: str = "opd scale") -> str:
    """Ask the run's launcher for `scorers` teacher scorers; returns the control entry id."""
    if cfg.run.run_id is None:
        raise ScaleError("run.run_id is not set: pass the run's own runs/<id>/config.yaml to --config")
    broker = open_broker(cfg.broker)
    try:
        ids = broker.publish(
            Streams(cfg.run.run_id).control,
            [scale_record("scorer", scorers, source)],
        )
    finally:
        broker.close()
    return ids[0]


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
    """What a launcher offers the scaler: its live scorers, and starting or retiring one."""

    def active_scorers(self) -> list[str]:
        """Names of the scorers running and not being retired, oldest first."""

    def start_scorer(self, index: int) -> None: ...

    def retire_scorer(self, name: str) -> None:
        """SIGTERM it; it finishes the batch in hand. Its exit is not a component failure."""

    def reap(self) -> list[tuple[str, int]]:
        """Retired scorers that have exited since the last call, with their exit codes; kill one that outlived
        run.shutdown_grace_s."""


class ScorerScaler:
    """Driven from a launcher's watch loop: reads `scale` records, runs the autoscaler, applies the target and
    records per-interval scored counts per scorer."""

    def __init__(
        self,
        cfg: Config,
        broker: Broker,
        pool: ScorerPool,
        out_dir: Path,
        latest: Callable[[], dict[str, dict]],
        log: Callable[[str], None],
    ):
        self.cfg, self.broker, self.pool, self.latest, self.log = cfg, broker, pool, latest, log
        self.path = Path(out_dir) / "scaling.jsonl"
        streams = Streams(cfg.run.run_id)
        self.control, self.rollouts = streams.control, streams.rollouts
        self.next_index = cfg.scorer.num_scorers
        now = time.monotonic()
        self.last_change = now
        self.depths: list[tuple[float, int]] = []
        self.last_interval = (now, self._scored_totals())
        self.run_over = False  # the learner announced stop: scorers exit by themselves, none is replaced
        # An earlier incarnation's commands (before --resume) are not for this launcher.
        broker.skip_to_end(self.control, CONTROL_GROUP)

    def tick(self) -> None:
        try:
            self._read_commands()
            if self.cfg.scaling.autoscale and not self.run_over:
                self._autoscale()
            self._record_interval()
        except BrokerUnavailable:
            pass  # the launcher's own loop notices a broker that is gone
        for name, code in self.pool.reap():
            self.log(f"{name} stopped (exit code {code}) after scaling down")
            self._write(event="stopped", name=name, code=code)

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
            if self.run_over:
                self.log("[yellow]scale: ignored, the run is stopping[/]")
                continue
            target = rec.get("target")
            if not isinstance(target, int) or target < 1:
                self.log(
                    f"[yellow]scale: ignored a request for {target!r} scorers (needs a whole number >= 1)[/]"
                )
                continue
            self.apply(Decision(target, f"requested by {rec.get('source', '?')}"), "opd scale")
        self.broker.ack(self.control, CONTROL_GROUP, [m.id for m in msgs])

    def _autoscale(self) -> None:
        now = time.monotonic()
        self.depths.append((now, self.broker.depth(self.rollouts)))
        window = self.cfg.scaling.cooldown_s
        self.depths = [(t, d) for t, d in self.depths if now - t <= window]
        mean_depth = sum(d for _, d in self.depths) / len(self.depths)
        current = len(self.pool.active_scorers())
        decision = autoscale_decision(current, mean_depth, self.cfg.scaling, now - self.last_change)
        if decision is not None and decision.target != current:
            self.apply(decision, "autoscaler")

    # -------------------------------------------------------------------------------- actions
    def apply(self, decision: Decision, source: str) -> None:
        active = self.pool.active_scorers()
        self.last_change = time.monotonic()
        self.depths.clear()  # the next window judges the new size only
        self.log(f"[bold]scale[/] scorers {len(active)} -> {decision.target} ({source}: {decision.reason})")
        self._write(
            event="decision",
            source=source,
            before=len(active),
            target=decision.target,
            reason=decision.reason,
        )
        for _ in range(decision.target - len(active)):
            index, self.next_index = self.next_index, self.next_index + 1
            try:
                self.pool.start_scorer(index)
            except Exception as exc:  # a scorer that cannot be placed must not end a run that is training
                self.log(f"[yellow]scale: could not start scorer-{index}: {exc}[/]")
                self._write(event="start_failed", name=f"scorer-{index}", error=str(exc))
                continue
            self.log(f"scale: started scorer-{index}")
            self._write(event="started", name=f"scorer-{index}")
        surplus = len(active) - decision.target
        for name in reversed(active[len(active) - surplus :] if surplus > 0 else []):  # newest first
            self.pool.retire_scorer(name)
            self.log(f"scale: stopping {name} (SIGTERM: it finishes the batch in hand first)")
            self._write(event="retired", name=name)

    def _scored_totals(self) -> dict[str, float]:
        return {
            name: rec.get("trajectories_scored", 0)
            for name, rec in self.latest().items()
            if name.startswith("scorer-")
        }

    def _record_interval(self) -> None:
        """Scored trajectories per scorer since the last record: what each scorer contributed while it ran."""
        now = time.monotonic()
        then, before = self.last_interval
        if now - then < self.cfg.scaling.interval_s:
            return
        totals = self._scored_totals()
        scored = {n: int(v - before.get(n, 0)) for n, v in sorted(totals.items()) if v != before.get(n, 0)}
        self.last_interval = (now, totals)
        self._write(
            event="interval",
            seconds=round(now - then, 3),
            active=self.pool.active_scorers(),
            scored=scored,
            scored_total=sum(scored.values()),
            rollouts_depth=self.broker.depth(self.rollouts),
        )

    def _write(self, **record) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")


class SupervisorPool:
    """The ScorerPool of `opd run` (local or Ray): the supervisor's scorers, through its public spawn and retire."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def active_scorers(self) -> list[str]:
        return [c.name for c in self.supervisor.active("scorer")]

    def start_scorer(self, index: int) -> None:
        self.supervisor.spawn("scorer", index)

    def retire_scorer(self, name: str) -> None:
        comp = next(c for c in self.supervisor.active("scorer") if c.name == name)
        self.supervisor.retire(comp.slot.role, comp.slot.index)

    def reap(self) -> list[tuple[str, int]]:
        return [(c.name, code) for c, code in self.supervisor.reap()]
