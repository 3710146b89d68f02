"""The broker contract every component codes against, whatever carries the bytes.

Semantics follow Redis Streams so that the Redis implementation fits without touching components: a stream is
an append-only log; each consumer *group* sees every entry once, shared among its consumers; an entry stays
pending until acknowledged. Work streams (rollouts, scored) are bounded and refuse producers while full
(backpressure); log streams (control, metrics, dead_letter) keep only their newest entries and never refuse.

What differs between brokers (durability, redelivery, where the broker runs) is declared once per broker class
in `Capabilities`, so callers ask the broker what it can do instead of asking which broker it is.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

WORK_STREAMS = ("rollouts", "scored")
LOG_STREAMS = ("control", "metrics", "dead_letter")
# A teacher's own work stream, `<run>:rollouts:<teacher>` or `<run>:scored:<teacher>` (opd.protocol.Streams
# rollouts_for / scored_for; the name rule is opd.protocol.TEACHER_NAME, repeated here because the broker imports
# nothing of the project).
_TEACHER_ROLLOUTS = re.compile(r"(?P<run>.+):(?:rollouts|scored):[a-z][a-z0-9_]{0,31}")


def is_work_stream(stream: str) -> bool:
    """A bounded, redelivered work stream: `<run>:rollouts`, `<run>:scored`, or a teacher's `<run>:rollouts:<t>` or
    `<run>:scored:<t>`."""
    return stream.rsplit(":", 1)[-1] in WORK_STREAMS or _TEACHER_ROLLOUTS.fullmatch(stream) is not None


def dead_letter_stream(stream: str) -> str:
    """The run's `dead_letter` stream for an entry of `stream` (a teacher's rollouts or scored too: one per run)."""
    teacher = _TEACHER_ROLLOUTS.fullmatch(stream)
    return (teacher["run"] if teacher else stream.rsplit(":", 1)[0]) + ":dead_letter"


class BrokerUnavailable(ConnectionError):
    """The broker did not answer in time; the caller decides whether that is fatal."""


class NoEmbeddedBroker(RuntimeError):
    """`opd broker` was asked to serve a broker that opd does not run itself (the message names the fix)."""


@dataclass(frozen=True)
class Capabilities:
    """What a broker type promises; callers branch on these, never on `broker.type`."""

    needs_server: bool  # an external server (redis-server) must already run: opd starts none
    embedded_process: bool  # opd runs the broker itself as a process (`opd broker`; `opd run` spawns it)
    redelivers: bool  # unacknowledged entries come back to the group: a consumer may leave a failure pending
    keeps_dead_letters: (
        bool  # dead letters outlive the run and can be listed/replayed/deleted (entries, delete)
    )
    multi_host: bool  # components on several hosts can join one run (the cluster launchers require it)


@dataclass(frozen=True)
class Message:
    id: str
    data: bytes


# poison_record(source, reason, **fields) -> the bytes of a dead-letter record; the broker cannot build one
# itself because the record format belongs to the protocol (opd.protocol.dead_letter_record), which it must not import
PoisonRecord = Callable[..., bytes]


class Broker(Protocol):
    """A client of one broker; one per thread."""

    capabilities: ClassVar[Capabilities]
    timeout_s: float  # a request unanswered for this long raises BrokerUnavailable (callers may shorten it)
    stopping: Callable[
        [], bool
    ]  # the component's stop flag: once true, a lost broker is given up on in seconds

    def publish(self, stream: str, payloads: list[bytes]) -> list[str] | None:
        """Append entries, in order; their ids. A work stream takes only as many as it has room for under
        `max_depth` (checked and appended in one atomic step, so concurrent producers cannot overshoot): the
        ids are then of a prefix of `payloads`, and None means it is full (nothing appended). A stream never
        holds more than `max_depth` entries, and a producer whose batch only partly fits is not starved by
        consumers that hold entries pending (`publish_with_backpressure` sends the rest as room appears)."""

    def consume(self, stream: str, group: str, consumer: str, count: int, timeout_s: float) -> list[Message]:
        """Up to `count` entries not yet delivered to `group`, waiting at most `timeout_s` for the first."""

    def ack(self, stream: str, group: str, ids: list[str]) -> None:
        """Mark entries done for `group`; only then may they be trimmed."""

    def release(self, stream: str, group: str, ids: list[str]) -> None:
        """Give entries back unacknowledged, to be delivered again (a redelivering broker hands them to any
        consumer of `group`, this one included, after its idle time, and counts the delivery). An entry
        neither acknowledged nor released is still being worked on: a redelivering broker keeps it with this
        consumer for as long as the client lives. A broker that never redelivers keeps it pending (callers
        dead-letter instead)."""

    def depth(self, stream: str) -> int:
        """Entries held (not yet acknowledged by every group)."""

    def skip_to_end(self, stream: str, group: str) -> None:
        """Start `group` after the newest entry: a restarted reader of `control` must not act on what an
        earlier incarnation of the run announced (old weight versions, an old stop)."""

    def drop_group(self, stream: str, group: str) -> None:
        """Forget `group` for good (a reader that leaves, such as `opd top`): a broker keeps a group's cursor
        and pending entries until told, so a departed reader would otherwise leave them behind."""

    def ping(self) -> None:
        """Return once the broker answers; BrokerUnavailable after `timeout_s`."""

    def close(self) -> None: ...

    # Only when `capabilities.keeps_dead_letters` (others raise NotImplementedError naming the alternative):
    def entries(self, stream: str, count: int = 10000) -> list[tuple[str, bytes]]:
        """(id, bytes) of up to `count` oldest entries, read without consuming: for `opd dead-letter ls`."""

    def delete(self, stream: str, ids: list[str]) -> None:
        """Remove entries outright (a replayed dead letter), whatever any group thinks of them."""


class BrokerType(Protocol):
    """The class side of a broker: what the registry (broker/__init__.py) and the launchers use."""

    capabilities: ClassVar[Capabilities]
    unreachable_hint: ClassVar[str]  # what to do when the broker does not answer at start

    @classmethod
    def from_config(cls, section: Any, **hooks: Any) -> Broker:
        """A client for the `broker:` config section; hooks: poison_record (PoisonRecord)."""

    @classmethod
    def serve(cls, section: Any, ready: Callable[[], None] | None = None) -> None:
        """Run the broker in the foreground until SIGTERM/SIGINT; NoEmbeddedBroker when opd runs none."""

    @classmethod
    def address(cls, section: Any) -> str:
        """Where the broker is, for messages (no secrets)."""

    @classmethod
    def resolve(cls, section: Any, free_port: Callable[[], int]) -> None:
        """Fill in place what a run decides once for all its processes (a free port for port 0)."""

    @classmethod
    def missing(cls, section: Any) -> list[str]:
        """Settings still undecided, which a component started by hand cannot decide alone."""


def stream_name(run_id: str, name: str) -> str:
    """Streams are prefixed by the run id, so several runs can share one broker (opd.protocol.Streams names
    them for the components; this stays for tests and benchmarks that talk to a broker directly)."""
    return f"{run_id}:{name}"


def publish_with_backpressure(
    broker: Broker,
    stream: str,
    payloads: list[bytes],
    *,
    should_stop: Callable[[], bool] = lambda: False,
    while_waiting: Callable[[], None] = lambda: None,
    poll_s: float = 0.05,
) -> list[str] | None:
    """Publish all of `payloads`, in order, waiting while the stream is full (a work stream may take a prefix
    at a time: its depth never exceeds max_depth); `while_waiting` keeps the caller's duties (weight syncs)
    going so a full queue cannot deadlock the pipeline. Returns the ids of all of them, or, if asked to stop
    first, the ids of those already appended (shorter than `payloads`: the caller accounts for just those),
    None when none were."""
    ids: list[str] = []
    while len(ids) < len(payloads):
        got = broker.publish(stream, payloads[len(ids) :])
        if got:
            ids += got
            continue  # room for part of it: try the rest at once, it may have freed up meanwhile
        if should_stop():
            return ids or None
        while_waiting()
        time.sleep(poll_s)
    return ids


def max_message_bytes(section: Any) -> int:
    """broker.max_message_mb in bytes (every broker refuses larger messages before sending them)."""
    return int(section.max_message_mb * (1 << 20))
