"""Prometheus endpoints: every component serves its counters and gauges over HTTP for scraping.

The exporter is fed from the same places that feed the broker's `metrics` stream (runtime.Reporter's counters and
the learner's per-step record), so Prometheus, `opd top` and metrics.jsonl cannot disagree about what happened.
Counters stay cumulative per process (dashboards take rate()); a restarted process starts its counters at 0,
which rate() treats as a counter reset.

Several teachers (`teachers:`): the stage families (trajectories, tokens, busy seconds, dead letters, errors) and
the scoring latency carry a `teacher` label, the pool of the scorer that exports them (`default` for the one
teacher of a run without `teachers:`, empty for actors and the learner, which Prometheus stores as no label), so
`sum by (teacher)` splits scoring per pool and every query without it sums as before. The learner exports each
pool's queue depths (`opd_teacher_queue_depth{teacher, kind}`) and the trajectories it trained per teacher
(`opd_teacher_trajectories_trained`, a mixture's shared by its route's weights). Label values are pool names from
the run's config (anything else is counted as `other`), so their number is bounded by the config.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from opd.config import Config
from opd.protocol import DEFAULT_TEACHER

log = logging.getLogger("opd")

PREFIX = "opd_"

# Reporter counter -> (metric attribute, extra labels). Counters not listed here still reach the broker stream.
COUNTER_MAP: dict[str, tuple[str, dict[str, str]]] = {
    "trajectories_generated": ("trajectories", {"stage": "generated"}),
    "trajectories_scored": ("trajectories", {"stage": "scored"}),
    "trajectories_trained": ("trajectories", {"stage": "trained"}),
    "tokens_generated": ("tokens", {"stage": "generated"}),
    "tokens_scored": ("tokens", {"stage": "scored"}),
    "tokens_trained": ("tokens", {"stage": "trained"}),
    "dead_lettered": ("dead_letters", {}),
    # prompts with images: images sent with the trajectories, and the encoded bytes of the trajectories
    "images_generated": ("images", {"stage": "generated"}),
    "images_scored": ("images", {"stage": "scored"}),
    "rollout_bytes": ("message_bytes", {"stage": "generated"}),
    "score_failures": ("errors", {"kind": "teacher_failure"}),
    "temperature_mismatch": ("errors", {"kind": "temperature_mismatch"}),
    "dropped_stale": ("dropped_stale", {}),
    "duplicates_skipped": ("duplicates", {}),
    "weight_syncs": ("weight_syncs_received", {}),
    "generate_seconds": ("busy_seconds", {"stage": "generate"}),
    "score_seconds": ("busy_seconds", {"stage": "score"}),
    "staleness_pause_seconds": ("staleness_pause_seconds", {}),
    # stream generation (actors/streaming.py)
    "slot_steps": ("slot_steps", {"kind": "total"}),
    "slot_busy_steps": ("slot_steps", {"kind": "busy"}),
    "publish_delay_seconds": ("publish_delay_seconds", {}),
    "trajectory_versions": ("trajectory_versions", {}),
    "sequences_dropped_at_stop": ("sequences_dropped", {}),
    # a teacher of another tokenizer (teacher_scorers/backends/cross_tokenizer.py)
    "alignment_failures": ("errors", {"kind": "alignment_failure"}),
    "alignment_responses": ("alignment", {"quantity": "responses"}),
    "alignment_chunks": ("alignment", {"quantity": "chunks"}),
    "alignment_student_tokens": ("alignment", {"quantity": "student_tokens"}),
    "alignment_topk_positions": ("alignment", {"quantity": "topk_positions"}),
    "alignment_topk_matched_mass": ("alignment", {"quantity": "topk_matched_mass"}),
}
# Learner step-record key -> gauge attribute.
STEP_GAUGES = {
    "reverse_kl": "reverse_kl",
    "loss": "loss",
    "eval_accuracy": "eval_accuracy",
    "importance_weight": "importance_weight",
    "staleness_mean": "staleness_mean",
    "step": "learner_step",
    "weight_sync_gbps": "weight_sync_gbps",
    "weight_sync_members": "weight_sync_members",
}
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SYNC_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OWN_STAGE = {"actor": "generated", "scorer": "scored", "learner": "trained"}
# Step-record list (one value per learner rank) -> the `phase` of opd_learner_rank_seconds (learner.num_ranks > 1).
RANK_PHASES = {"rank_step_seconds": "step", "rank_comm_seconds": "comm", "rank_apply_seconds": "apply"}
# Stage families that carry the `teacher` label (a scorer's pool; empty elsewhere).
TEACHER_LABELLED = {
    "trajectories",
    "tokens",
    "busy_seconds",
    "dead_letters",
    "errors",
    "alignment",
    "images",
    "message_bytes",
}
# Reporter counter prefix of the learner's trajectories trained per teacher (learner/learner.py teacher_shares).
TRAINED_BY_TEACHER = "trajectories_trained:"
# ... and of mixtures whose join timed out without this teacher's copy (learner/intake.py): its failures too.
JOIN_TIMEOUTS = "join_timeouts:"
SCORE_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OTHER_TEACHER = "other"  # a teacher name not of this run's config (bounded label values)


def component_teacher(component: str) -> str:
    """The teacher whose pool a component serves: `scorer-<i>` -> `default`, `scorer-<teacher>-<i>` -> teacher;
    "" for actors and the learner (they serve every teacher)."""
    role, _, rest = component.partition("-")
    if role != "scorer":
        return ""
    pool, _, _index = rest.rpartition("-")
    return pool or DEFAULT_TEACHER


def metrics_port(cfg: Config, component: str) -> int | None:
    """The port of `component` ("learner", "actor-3", "scorer-1", "scorer-<teacher>-1"), or None when metrics are off.

    One base port for every process on a host: learner +0, actor i +1+i, scorer j +1+A+j (A = actor.num_actors), so
    scorers added later (`opd scale`, `--index`) stay clear of the actors. An actor started by hand beyond A would
    land on a scorer's port, so extra actors count downwards instead: actor i >= A gets base-1-(i-A).
    metrics.port_layout: fixed gives every component the base port (one component per container)."""
    base = cfg.metrics.port
    if not base:
        return None
    role, _, rest = component.partition("-")
    pool, _, index = rest.rpartition("-")  # "scorer-<teacher>-<i>": a named teacher's pool
    i = int(index or 0)
    actors = cfg.actor.num_actors
    if cfg.metrics.port_layout == "fixed":  # one component per container/host: all serve the same port
        port = base
    elif role == "learner":
        port = base
    elif role == "actor":
        port = base + 1 + i if i < actors else base - 1 - (i - actors)
    elif role == "scorer":
        port = base + 1 + actors + _pool_offset(cfg, pool) + i
    else:
        return None
    if not 1024 <= port <= 65535:
        raise ValueError(
            f"metrics.port {base} puts {component} on port {port}, outside 1024-65535; choose another metrics.port"
        )
    return port


POOL_STRIDE = 100  # ports per named teacher's pool: room for `opd scale` to add scorers without collisions


def _pool_offset(cfg: Config, pool: str) -> int:
    """Scorers of the default teacher start right after the actors, as before; named teachers' pools follow one
    block of POOL_STRIDE ports each, in config order."""
    if not pool:
        return 0
    names = list(cfg.teacher_pools())
    if pool not in names:
        raise ValueError(f"no teacher named {pool!r} for metrics; the run's teachers: {names}")
    return names.index(pool) * POOL_STRIDE


def port_map(cfg: Config) -> dict[str, int]:
    """name -> port of the components `opd run` starts, in launch order."""
    names = ["learner"]
    names += [f"actor-{i}" for i in range(cfg.actor.num_actors)]
    for teacher, pool in cfg.teacher_pools().items():
        prefix = "scorer" if cfg.teachers is None else f"scorer-{teacher}"
        names += [f"{prefix}-{j}" for j in range(pool.scorer.num_scorers)]
    if cfg.metrics.port and cfg.metrics.port_layout == "fixed" and len(names) > 1:
        raise ValueError(
            "metrics.port_layout: fixed gives every component the same port, so they cannot share this host; "
            "use metrics.port_layout=offset with `opd run`"
        )
    return {n: metrics_port(cfg, n) for n in names} if cfg.metrics.port else {}


def write_port_map(cfg: Config, out_dir: Path) -> dict[str, int]:
    """runs/<id>/metrics_ports.json, so a scrape config or a person can find each endpoint."""
    ports = port_map(cfg)
    if ports:
        tmp = out_dir / "metrics_ports.json.tmp"
        tmp.write_text(json.dumps({"host": cfg.metrics.host, "ports": ports}, indent=2))
        tmp.rename(out_dir / "metrics_ports.json")
    return ports


class LagHistogram:
    """opd_lag_versions: response tokens trained per lag (weight versions behind the learner), as a histogram.

    A step's lag_histogram holds one count per token (hundreds of thousands with long responses), and
    Histogram.observe takes one sample at a time, so the cumulative counts are kept here and exposed as a
    histogram family: adding a step costs one pass over its max_staleness + 1 counts. The series appears with the
    first step, as a labelled Histogram's would."""

    NAME = "opd_lag_versions"
    HELP = "Staleness of trained response tokens in weight versions (each at the version that sampled it)."

    def __init__(self, component: str, max_staleness: int, registry: CollectorRegistry):
        self.component = component
        self.counts = [0] * (max_staleness + 1)  # tokens at lag 0..max_staleness; a larger lag counts in +Inf
        self.beyond = 0
        self.sum = 0.0
        self.stepped = False
        registry.register(self)

    def add(self, counts: list[int]) -> None:
        """One step record's lag_histogram: tokens per lag 0, 1, ..."""
        self.stepped = True
        for lag, n in enumerate(counts):
            if lag < len(self.counts):
                self.counts[lag] += int(n)
            else:
                self.beyond += int(n)
            self.sum += lag * int(n)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.NAME, self.HELP, labels=["component"])

    def describe(self):
        yield self._family()

    def collect(self):
        family = self._family()
        if self.stepped:
            cumulative = list(itertools.accumulate(self.counts))
            buckets = [(floatToGoString(float(le)), n) for le, n in enumerate(cumulative)]
            family.add_metric(
                [self.component], [*buckets, ("+Inf", cumulative[-1] + self.beyond)], sum_value=self.sum
            )
        yield family


class Exporter:
    """One component's metric families in a private registry (so tests can build several in one process)."""

    def __init__(
        self,
        component: str,
        max_staleness: int = 4,
        teachers: tuple[str, ...] = (DEFAULT_TEACHER,),
    ):
        self.component = component
        self.teacher = component_teacher(component)  # the `teacher` label of the stage families
        self.teachers = set(teachers)  # the run's pools: the only values the learner's teacher labels take
        self.registry = r = CollectorRegistry()
        c, g, ct = ["component"], ["component"], ["component", "teacher"]
        self.trajectories = Counter(
            "opd_trajectories", "Trajectories per pipeline stage.", [*ct, "stage"], registry=r
        )
        self.tokens = Counter("opd_tokens", "Response tokens per pipeline stage.", [*ct, "stage"], registry=r)
        self.images = Counter(
            "opd_images",
            "Prompt images carried by trajectories per pipeline stage.",
            [*ct, "stage"],
            registry=r,
        )
        self.message_bytes = Counter(
            "opd_message_bytes",
            "Encoded trajectory bytes (images inline) per stage: rate over rate(opd_trajectories) is bytes per "
            "trajectory.",
            [*ct, "stage"],
            registry=r,
        )
        self.busy_seconds = Counter(
            "opd_busy_seconds", "Seconds spent generating or scoring.", [*ct, "stage"], registry=r
        )
        self.dead_letters = Counter(
            "opd_dead_letters", "Messages this component dead-lettered.", ct, registry=r
        )
        self.errors = Counter(
            "opd_errors",
            "Failures by kind (teacher_failure, skipped_step, weight_sync_failed, join_timeout, alignment_failure).",
            [*ct, "kind"],
            registry=r,
        )
        self.alignment = Counter(
            "opd_alignment",
            "A teacher of another tokenizer: responses aligned, their chunks and student tokens, top-k positions "
            "mapped and their matched mass (rate(chunks) / rate(responses): chunks per response; "
            "rate(topk_matched_mass) / rate(topk_positions): the share of the teacher's top-k mass the student's "
            "vocabulary holds).",
            [*ct, "quantity"],
            registry=r,
        )
        self.score_seconds = Histogram(
            "opd_score_seconds",
            "Seconds a scorer took to score one batch of rollouts (its teacher's latency).",
            ct,
            buckets=SCORE_SECONDS_BUCKETS,
            registry=r,
        )
        self.teacher_queue_depth = Gauge(
            "opd_teacher_queue_depth",
            "Entries held in one teacher's work stream (kind: rollouts waiting for its pool, scored waiting for "
            "the learner).",
            [*ct, "kind"],
            registry=r,
        )
        self.teacher_trained = Counter(
            "opd_teacher_trajectories_trained",
            "Trajectories the learner trained per teacher, a mixture's shared by its route's weights (rate over "
            "the sum: each teacher's share).",
            ct,
            registry=r,
        )
        self.dropped_stale = Counter("opd_dropped_stale", "Samples dropped as too stale.", c, registry=r)
        self.duplicates = Counter("opd_duplicates", "Redelivered samples skipped as trained.", c, registry=r)
        self.weight_syncs_received = Counter(
            "opd_weight_syncs_received", "Weight versions an actor applied.", c, registry=r
        )
        self.staleness_pause_seconds = Counter(
            "opd_staleness_pause_seconds", "Seconds an actor paused to bound staleness.", c, registry=r
        )
        # Stream generation (actors/streaming.py): slot occupancy, the wait from a trajectory's end to its
        # publication, weight versions per trajectory, sequences in flight.
        self.slot_steps = Counter(
            "opd_actor_slot_steps",
            "Decode steps x slots (kind: total) and the slots busy in them (kind: busy): rate(busy) / rate(total) "
            "is the share of decode steps where a slot was busy.",
            [*c, "kind"],
            registry=r,
        )
        self.publish_delay_seconds = Counter(
            "opd_actor_publish_delay_seconds",
            "Seconds from a trajectory's last token to its publication, summed (a group waits for its last "
            "member): over rate(opd_trajectories{stage='generated'}), the mean delay.",
            c,
            registry=r,
        )
        self.trajectory_versions = Counter(
            "opd_actor_trajectory_versions",
            "Distinct weight versions among the tokens of each published trajectory, summed: "
            "rate(opd_tokens{stage='generated'}) over it is the tokens per version per trajectory.",
            c,
            registry=r,
        )
        self.sequences_dropped = Counter(
            "opd_actor_sequences_dropped",
            "Sequences in flight dropped at stop (actor.on_stop: drop), never published.",
            c,
            registry=r,
        )
        self.inflight = Gauge("opd_actor_inflight", "Sequences an actor has generating now.", g, registry=r)
        # Learner-only families carry the component label too: a labelled family shows no sample until it is
        # set, so an actor exports no fake zeros and accuracy is absent (not 0) before the first evaluation.
        self.wait_seconds = Counter(
            "opd_learner_wait_seconds", "Seconds the learner waited for scored data.", c, registry=r
        )
        self.wall_seconds = Counter(
            "opd_learner_wall_seconds", "Wall seconds covered by learner steps.", c, registry=r
        )
        self.step_seconds = Histogram(
            "opd_learner_step_seconds",
            "Seconds of one learner update.",
            c,
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.wait_fraction = Gauge(
            "opd_learner_wait_fraction", "Last step's wait for data over its wall time.", g, registry=r
        )
        self.weight_sync_seconds = Histogram(
            "opd_weight_sync_seconds",
            "Seconds of one weight broadcast.",
            c,
            buckets=SYNC_SECONDS_BUCKETS,
            registry=r,
        )
        self.lag = LagHistogram(component, max_staleness, r)
        self.queue_depth = Gauge(
            "opd_queue_depth", "Entries held in a broker stream.", [*g, "stream"], registry=r
        )
        self.weight_version = Gauge("opd_weight_version", "Weight version a component holds.", g, registry=r)
        for key in STEP_GAUGES.values():
            setattr(self, key, Gauge(PREFIX + key, f"Newest learner {key}.", g, registry=r))
        # Learner ranks (learner.num_ranks > 1), from rank 0's step record (it holds every rank's figures, so one
        # endpoint serves them): a `rank` label per rank, the last step's seconds as gauges and running totals as
        # counters, so a dashboard shows both the newest step and rates (tokens/s, communication share).
        self.rank_seconds = Gauge(
            "opd_learner_rank_seconds",
            "Last step's seconds per learner rank and phase (step: its whole step, comm: the gradient all-reduce, "
            "apply: the optimiser step).",
            [*g, "rank", "phase"],
            registry=r,
        )
        self.rank_busy_seconds = Counter(
            "opd_learner_rank_busy_seconds",
            "Seconds per learner rank and phase, summed over steps (rate(): the share of time in each).",
            [*c, "rank", "phase"],
            registry=r,
        )
        self.rank_tokens = Counter(
            "opd_learner_rank_tokens",
            "Prompt+response tokens each learner rank ran.",
            [*c, "rank"],
            registry=r,
        )
        self.rank_token_imbalance = Gauge(
            "opd_learner_rank_token_imbalance",
            "Last step's heaviest learner rank's tokens over the mean (1 = balanced).",
            g,
            registry=r,
        )
        self.learner_ranks = Gauge("opd_learner_ranks", "Learner ranks training together.", g, registry=r)
        self.up = Gauge(
            "opd_component_up", "1 while the component runs (a scorer: with its teacher).", ct, registry=r
        )
        self.up.labels(component, self.teacher).set(1)
        self._last_step_end: float | None = None
        self._skipped_seen = 0.0

    # ----------------------------------------------------------------------------- feeds
    def labels(self, attr: str, **labels: str):
        """Family `attr`'s child for this component (and its teacher, on the families that carry one)."""
        if attr in TEACHER_LABELLED:
            labels = {"teacher": self.teacher, **labels}
        return getattr(self, attr).labels(component=self.component, **labels)

    def add(self, deltas: dict[str, float]) -> None:
        """Reporter.add's increments. A scorer adds `score_seconds` once per batch it scored, so each is also one
        observation of the scoring latency; the learner's `trajectories_trained:<teacher>` feed the per-teacher
        share."""
        for key, value in deltas.items():
            if key.startswith((TRAINED_BY_TEACHER, JOIN_TIMEOUTS)):
                self._per_teacher(key, value)
                continue
            if key == "score_seconds" and value >= 0:
                self.score_seconds.labels(self.component, self.teacher).observe(value)
            target = COUNTER_MAP.get(key)
            if target is None or value <= 0:
                continue
            attr, labels = target
            self.labels(attr, **labels).inc(value)

    def _per_teacher(self, key: str, value: float) -> None:
        """The learner's per-teacher counters (`<prefix><teacher>`), labelled with that teacher, never a name
        outside the run's config."""
        prefix, _, name = key.partition(":")
        name = name if name in self.teachers else OTHER_TEACHER
        if value <= 0:
            return
        if prefix + ":" == TRAINED_BY_TEACHER:
            self.teacher_trained.labels(self.component, name).inc(value)
        else:
            self.errors.labels(component=self.component, teacher=name, kind="join_timeout").inc(value)

    def observe(self, fields: dict[str, Any]) -> None:
        """Reporter.maybe_send's extra fields (weight version and the like)."""
        if isinstance(fields.get("weight_version"), int | float):
            self.weight_version.labels(self.component).set(fields["weight_version"])
        if isinstance(fields.get("inflight"), int | float):
            self.inflight.labels(self.component).set(fields["inflight"])

    def step(self, record: dict[str, Any], depths: dict[str, int]) -> None:
        """The learner's per-step record (the one written to metrics.jsonl) and the queue depths at that moment."""
        now = time.monotonic()
        for key, attr in STEP_GAUGES.items():
            value = record.get(key)
            if isinstance(value, int | float):
                getattr(self, attr).labels(self.component).set(value)
        self.observe(record)
        step_s, wait_s = record.get("step_seconds"), record.get("wait_seconds")
        if isinstance(step_s, int | float) and isinstance(wait_s, int | float):
            wall = now - self._last_step_end if self._last_step_end is not None else step_s + wait_s
            wall = max(wall, step_s + wait_s, 1e-9)
            me = self.component
            self.step_seconds.labels(me).observe(step_s)
            self.wait_seconds.labels(me).inc(wait_s)
            self.wall_seconds.labels(me).inc(wall)
            self.wait_fraction.labels(me).set(wait_s / wall)
        self._last_step_end = now
        if isinstance(record.get("weight_sync_seconds"), int | float):
            self.weight_sync_seconds.labels(self.component).observe(record["weight_sync_seconds"])
        if isinstance(record.get("lag_histogram"), list):
            self.lag.add(record["lag_histogram"])
        skipped = record.get("skipped_steps")
        if isinstance(skipped, int | float) and skipped > self._skipped_seen:  # a running total in the record
            self.labels("errors", kind="skipped_step").inc(skipped - self._skipped_seen)
            self._skipped_seen = skipped
        if record.get("weight_sync_failed"):
            self.labels("errors", kind="weight_sync_failed").inc()
        for stream, depth in depths.items():
            self.queue_depth.labels(self.component, stream).set(depth)
        self._teacher_depths(depths)
        self._ranks(record)

    def _teacher_depths(self, depths: dict[str, int]) -> None:
        """Each teacher's own queues: `<kind>:<teacher>` with several teachers; with one, the kind's whole stream
        is the default teacher's."""
        named = {s: d for s, d in depths.items() if ":" in s}
        per = named or {f"{s}:{DEFAULT_TEACHER}": d for s, d in depths.items()}
        for stream, depth in per.items():
            kind, _, teacher = stream.partition(":")
            teacher = teacher if teacher in self.teachers else OTHER_TEACHER
            self.teacher_queue_depth.labels(self.component, teacher, kind).set(depth)

    def _ranks(self, record: dict[str, Any]) -> None:
        """The per-rank lists of a learner of several ranks (absent with one rank: no series then)."""
        if not isinstance(record.get("learner_ranks"), int):
            return
        me = self.component
        self.learner_ranks.labels(me).set(record["learner_ranks"])
        if isinstance(record.get("rank_token_imbalance"), int | float):
            self.rank_token_imbalance.labels(me).set(record["rank_token_imbalance"])
        for key, phase in RANK_PHASES.items():
            for rank, seconds in enumerate(record.get(key) or []):
                if isinstance(seconds, int | float):
                    self.rank_seconds.labels(me, str(rank), phase).set(seconds)
                    self.rank_busy_seconds.labels(me, str(rank), phase).inc(max(seconds, 0.0))
        for rank, tokens in enumerate(record.get("rank_tokens") or []):
            if isinstance(tokens, int | float) and tokens > 0:
                self.rank_tokens.labels(me, str(rank)).inc(tokens)

    # ------------------------------------------------------------------------------ serve
    def serve(self, host: str, port: int) -> bool:
        """Serve /metrics from a daemon thread; a port in use is logged, not fatal (the run matters more)."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics endpoint %s:%d not started (%s); choose another metrics.port", host, port, exc)
            return False
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        return True


def exporter_for(cfg: Config, component: str) -> Exporter | None:
    """The serving exporter of this component, or None when metrics.port is 0."""
    try:
        port = metrics_port(cfg, component)
    except ValueError as exc:  # e.g. a Slurm job id as --index: the component runs on, without an endpoint
        log.error("no Prometheus endpoint for %s: %s (or set metrics.port_layout=fixed)", component, exc)
        return None
    if port is None:
        return None
    exporter = Exporter(component, cfg.learner.max_staleness, tuple(cfg.teacher_pools()))
    stage = OWN_STAGE.get(component.partition("-")[0])
    if stage is not None:  # its own stage's counters exist from the start, so rate() has a first point at 0
        exporter.labels("trajectories", stage=stage)
        exporter.labels("tokens", stage=stage)
    if exporter.teacher:  # a scorer's latency series exists (empty) from the start, like its stage counters
        exporter.score_seconds.labels(component, exporter.teacher)
    exporter.serve(cfg.metrics.host, port)
    return exporter


def exported_series() -> set[str]:
    """Every series name our exporter can produce (counters with _total, histograms with _bucket/_sum/_count):
    the dashboard test checks its queries against this, not against a copy of the list."""
    exporter = Exporter("probe")
    names: set[str] = set()
    for family in exporter.registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names
