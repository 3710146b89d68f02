"""What every component process shares: stop signals, orphan protection, metrics and dead-letter records."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from broker import Broker
from broker.base import WORK_STREAMS
from opd.config import Config
from opd.config.redact import redact_text
from opd.protocol import (
    DEFAULT_TEACHER,
    Streams,
    dead_letter_record,
    metrics_record,
    trajectory_id,
    unpack_control,
)
from opd.runtime.broker import open_broker
from opd.runtime.prometheus import exporter_for

log = logging.getLogger("opd")
# gauges a heartbeat repeats, so the newest record always carries them
HEARTBEAT_GAUGES = ("weight_version", "inflight")
# Set by `opd run` for the processes it starts: a file that exists once the run's models have been found or built
# (see wait_for_models). A component started by hand has no such variable and loads its models at once.
MODELS_READY_ENV = "OPD_MODELS_READY"
MODELS_POLL_S = 0.05


class StopFlag:
    """Set by SIGTERM/SIGINT (or a stop message); loops check it between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


def setup_process(cfg: Config, name: str) -> StopFlag:
    """Logging, thread count, signals, and death with the parent launcher (no orphans if it is killed)."""
    # torch only here: the broker process shares this module (die_with_parent) and never runs torch
    from opd.runtime.threads import pin_threads

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # component logs land in the run directory: no secret in them
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_record)
    pin_threads(cfg.run.torch_threads)  # intra- and inter-op: opd.runtime.threads says why
    stop = StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: stop.set("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stop.set("SIGINT"))
    parent = os.environ.get("OPD_PARENT_PID")
    if parent:
        die_with_parent(int(parent))
    return stop


def _redact_record(record: logging.LogRecord) -> bool:
    """Logging filter: the message with URL passwords and `password=...` values replaced (opd.config.redact)."""
    record.msg, record.args = redact_text(record.getMessage()), None
    return True


def die_with_parent(parent_pid: int) -> None:
    try:  # Linux: the kernel sends SIGTERM when the launcher dies, even by SIGKILL
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Reporter:
    """Publishes a component's counters to the `metrics` stream at most every `every_s` seconds.

    Every record names this process's incarnation (a fresh id per process, with its pid and host) and a sequence
    number, and lists which of its fields are counters. A restarted component starts its counters at 0 under a
    new incarnation, so a reader sums counters over incarnations and takes rates within one (never across a
    restart, where they would go negative). A heartbeat thread (`start_heartbeat`) re-sends the counters while
    the component's own loop is busy or idle, which is how a launcher knows a component it did not start is
    alive."""

    def __init__(self, broker: Broker, cfg: Config, component: str, every_s: float):
        self.broker, self.component, self.every_s = broker, component, every_s
        self.streams = Streams(cfg.run.run_id)
        self.stream, self.dead_stream = self.streams.metrics, self.streams.dead_letter
        self.counters: dict[str, float] = {}
        self.started = time.time()
        self._last = 0.0
        self.run_id = cfg.run.run_id
        self.teachers = list(cfg.teacher_pools())  # one rollouts and one scored stream each
        self.identity = {
            "incarnation": secrets.token_hex(8),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        self._lock = threading.Lock()  # counters, sequence and gauges are read by the heartbeat thread too
        self._seq = 0
        self._gauges: dict[str, Any] = {}  # the newest weight version, re-sent with each heartbeat
        self._final = False
        self._heartbeat: tuple[threading.Thread, threading.Event] | None = None
        self.exporter = exporter_for(
            cfg, component
        )  # Prometheus sees what the stream sees (None: metrics.port 0)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self.counters[k] = self.counters.get(k, 0) + v
        if self.exporter is not None:
            self.exporter.add(deltas)

    def queue_depths(self) -> dict[str, int]:
        """The work queues' depths now, by stream kind: the learner writes them into each step record, so the
        run's report can plot queue depth against the step (not only Prometheus, which a small run may not have).
        With several teachers each kind is the sum over the teachers' streams, and each teacher's own depth is
        there too, as `<kind>:<teacher>` (a pool falling behind shows as its own queue growing)."""
        per = {
            (kind, t): self.broker.depth(stream)
            for kind in WORK_STREAMS
            for t, stream in zip(self.teachers, self.streams.for_teachers(kind, self.teachers), strict=True)
        }
        depths = {kind: sum(d for (k, _), d in per.items() if k == kind) for kind in WORK_STREAMS}
        if self.teachers != [DEFAULT_TEACHER]:
            depths.update({f"{kind}:{t}": d for (kind, t), d in per.items()})
        return depths

    def export_step(self, record: dict[str, Any]) -> None:
        """The learner's per-step record for Prometheus, with the queue depths it carries (`queue_<kind>`)."""
        if self.exporter is not None:
            kinds = [*WORK_STREAMS, *(f"{k}:{t}" for k in WORK_STREAMS for t in self.teachers)]
            depths = {s: record[f"queue_{s}"] for s in kinds if f"queue_{s}" in record}
            self.exporter.step(record, depths)

    def maybe_send(self, force: bool = False, **extra: Any) -> None:
        if self.exporter is not None:
            self.exporter.observe(extra)
        now = time.time()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.broker.publish(self.stream, [self._record(now, extra)])

    def _record(self, now: float, extra: dict[str, Any], heartbeat: bool = False) -> bytes:
        """One metrics record: identity, counters (named in `counters`), then `extra` (a field may repeat a
        counter's total)."""
        with self._lock:
            self._seq += 1
            self._final = self._final or bool(extra.get("final"))
            self._gauges.update({k: extra[k] for k in HEARTBEAT_GAUGES if k in extra})
            counters = dict(self.counters)
            fields = {**counters, **self._gauges, **extra, "seq": self._seq}
        if heartbeat:
            fields["heartbeat"] = True
        return metrics_record(
            component=self.component,
            uptime=now - self.started,
            counters=sorted(counters),
            **self.identity,
            **fields,
        )

    # ------------------------------------------------------------------------------------------ heartbeat
    def start_heartbeat(self, section: Any, every_s: float) -> None:
        """Re-send the counters every `every_s` seconds from a thread with its own broker client (a client
        serves one thread), so the component is seen alive while it loads weights, pauses or scores a long
        batch. Stops by itself after the final record."""
        if every_s <= 0 or self._heartbeat is not None:
            return
        done = threading.Event()
        thread = threading.Thread(
            target=self._beat, args=(section, every_s, done), name="reporter", daemon=True
        )
        self._heartbeat = (thread, done)
        thread.start()

    def stop_heartbeat(self, timeout_s: float = 5.0) -> None:
        if self._heartbeat is not None:
            thread, done = self._heartbeat
            done.set()
            thread.join(timeout_s)
            self._heartbeat = None

    def _beat(self, section: Any, every_s: float, done: threading.Event) -> None:
        try:
            client = open_broker(section, stopping=done.is_set)
        except Exception as exc:  # the component's own loop notices a broker that is not there
            log.warning("no heartbeat: %s", exc)
            return
        client.timeout_s = min(client.timeout_s, max(every_s * 2, 5.0))
        warned = False
        try:
            while not done.wait(every_s) and not self._final:
                if time.time() - self._last < every_s:
                    continue  # the component's own loop has just sent its counters
                try:
                    client.publish(self.stream, [self._record(time.time(), {}, heartbeat=True)])
                    warned = False
                except Exception as exc:  # a heartbeat lost is no reason to stop the component
                    if not warned:
                        log.warning("heartbeat not sent: %s", exc)
                    warned = True
        finally:
            client.close()

    def dead_letter(self, source_stream: str, message_id: str, data: bytes, reason: str) -> None:
        """Record a rejected message with its reason; the consumer then acknowledges it and moves on."""
        log.warning("dead-lettered %s/%s (%d bytes): %s", source_stream, message_id, len(data), reason)
        self.add(dead_lettered=1)
        record = dead_letter_record(
            self.component,
            reason,
            stream=source_stream,
            message_id=message_id,
            size=len(data),
            head=data[:256],
            trajectory_id=trajectory_id(data),
            data=data if len(data) <= REPLAYABLE_BYTES else None,  # `opd dead-letter replay` re-injects it
        )
        self.broker.publish(self.dead_stream, [record])


REPLAYABLE_BYTES = 16 << 20  # dead letters up to this size keep their bytes for replay


class LearnerWatch:
    """A worker's check that its learner still exists: the learner's records (its step metrics and the heartbeat
    every supervision.heartbeat_s) on the `metrics` stream, read from a thread with its own broker client.

    Started by hand (Slurm, compose, an operator), an actor or scorer has no launcher to stop it when the learner
    dies, and no stop message ever comes; it would hold its allocation forever. Once nothing of the learner has
    been heard for `silence_s` (from this process's start: a learner that never comes counts too), the watch
    sets the stop flag with a message naming the setting, and the process exits 1. Only time between two prompt
    broker answers counts as silence: while the broker itself is unreachable the learner cannot be heard
    either, and the broker's own timeout (broker.request_timeout_s) decides. A component that does not stop
    within `grace_s` of that (blocked in a call that cannot see the flag: waiting for the learner's weight-sync
    store) is ended with os._exit(1), because a hang is what this is here to prevent."""

    POLL_S = 1.0
    SLOW_S = 5.0  # a poll slower than this spans a broker outage: that interval is not counted as silence

    def __init__(self, cfg: Config, name: str, stop: StopFlag):
        self.section, self.stop = cfg.broker, stop
        self.silence_s, self.grace_s = cfg.supervision.learner_silence_s, cfg.run.shutdown_grace_s
        self.stream, self.group = Streams(cfg.run.run_id).metrics, f"{name}.learner-watch"
        self.fired: str | None = None  # the message, once the learner was judged gone
        self.silent_s = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner-watch", daemon=True)
        self._thread.start()

    def _heard(self, client: Broker) -> bool:
        """Whether the learner wrote to `metrics` since the last look (everything read is acknowledged)."""
        msgs = client.consume(self.stream, self.group, self.group, 1024, self.POLL_S)
        if msgs:
            client.ack(self.stream, self.group, [m.id for m in msgs])
        heard = False
        for m in msgs:
            try:
                heard = heard or unpack_control(m.data).get("component") == "learner"
            except Exception:  # an unreadable record is nobody's sign of life
                continue
        return heard

    def _run(self) -> None:
        try:
            client = open_broker(self.section, stopping=self._done.is_set)
            client.timeout_s = min(client.timeout_s, self.SLOW_S)
            client.skip_to_end(self.stream, self.group)  # what the learner said before we started is no news
        except Exception as exc:  # the component's own loop meets a broker that is not there
            log.warning("not watching the learner: %s", exc)
            return
        last_ok = time.monotonic()
        try:
            while not self._done.is_set() and not self.stop():
                began = time.monotonic()
                try:
                    heard = self._heard(client)
                except Exception:  # broker unreachable: neither silence nor a sign of life
                    last_ok = None
                    self._done.wait(self.POLL_S)
                    continue
                now = time.monotonic()
                if heard:
                    self.silent_s = 0.0
                elif last_ok is not None and now - began < self.SLOW_S + self.POLL_S:
                    self.silent_s += now - last_ok
                last_ok = now
                if self.silence_s and self.silent_s >= self.silence_s:
                    self._fire()
                    return
        finally:
            with contextlib.suppress(Exception):  # a broker that is gone keeps the group; a restart reuses it
                client.drop_group(self.stream, self.group)
            client.close()

    def _fire(self) -> None:
        self.fired = (
            f"the learner is gone: nothing from it on {self.stream} for {self.silence_s:.0f}s "
            "(supervision.learner_silence_s); stopping"
        )
        log.error("%s", self.fired)
        self.stop.set(self.fired)
        if not self._done.wait(self.grace_s):  # the component did not get to its exit: end it here
            log.error("did not stop within run.shutdown_grace_s (%.0fs) of that; exiting", self.grace_s)
            logging.shutdown()
            os._exit(1)

    def close(self) -> None:
        self._done.set()


def wait_for_models(stop: StopFlag) -> bool:
    """Wait until the launcher that started this process has found or built the run's models; False if asked to
    stop first. `opd run` starts its components while it is still looking for the models (their imports take
    seconds, the look usually milliseconds), and only the launcher may build missing ones: components that each
    built them at once would share the cores three ways. Without MODELS_READY_ENV (started by hand): True."""
    path = os.environ.get(MODELS_READY_ENV)
    if not path or Path(path).exists():
        return True
    log.info("waiting for the launcher to find or build the run's models")
    while not Path(path).exists():
        if stop.wait(MODELS_POLL_S):
            return False
    return True


def process_ending() -> None:
    """Call once a process's work is done and only its exit is left. Interpreter shutdown passes the cyclic
    garbage collector over every object torch and transformers created, about a second (two on a busy machine)
    that the launcher spends waiting for the exit, and `opd run` before the prompt comes back. gc.freeze puts them
    out of the collector's reach: exit handlers still run and every file still closes (ours are closed by `with`
    blocks), only objects kept alive by reference cycles are left for the OS to reclaim instead of finalized."""
    gc.freeze()


def run_component(cfg: Config, name: str, build, watch_learner: bool = False) -> int:
    """setup -> loop -> cleanup for every component process; `build(stop)` returns an object with run()/broker
    and, if it reports, its `reporter` (which then heartbeats every supervision.heartbeat_s). A worker
    (`watch_learner`) also stops, and returns 1, once its learner has been silent for
    supervision.learner_silence_s (LearnerWatch); the watch starts before `build`, which may wait for the
    learner, and after the models are ready (wait_for_models), which may take a build's minutes."""
    stop = setup_process(cfg, name)
    if not wait_for_models(stop):
        log.info("stopping (%s) before loading the models", stop.reason)
        return 0
    watch = LearnerWatch(cfg, name, stop) if watch_learner and cfg.supervision.learner_silence_s else None
    try:
        component = build(stop)
        reporter = getattr(component, "reporter", None)
        if isinstance(reporter, Reporter):
            reporter.start_heartbeat(cfg.broker, cfg.supervision.heartbeat_s)
        try:
            component.run()
        finally:
            if isinstance(reporter, Reporter):
                reporter.stop_heartbeat()
            component.broker.close()
    finally:
        if watch is not None:
            watch.close()
    process_ending()  # a component's process ends with its run_component
    if watch is not None and watch.fired:
        log.error("exit 1: %s", watch.fired)
        return 1
    return 0
