"""The broker contract every component codes against, whatever carries the bytes.

Semantics follow Redis Streams so that the Redis implementation fits without touching components: a stream is
an append-only log; each consumer *group* sees every entry once, shared among its consumers; an entry stays
pending until acknowledged. Work streams (rollouts, scored) are bounded and refuse producers while full
(backpressure); log streams (control, metrics, dead_letter) keep only their newest entries and never refuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

WORK_STREAMS = ("rollouts", "scored")
LOG_STREAMS = ("control", "metrics", "dead_letter")


@dataclass(frozen=True)
class Capabilities:
    """TEMP stub (dropped at merge): what a broker type offers, so callers branch on abilities, not on names."""

    needs_server: bool
    embedded_process: bool
    redelivers: bool
    keeps_dead_letters: bool
    multi_host: bool


class BrokerUnavailable(ConnectionError):
    """The broker did not answer in time; the caller decides whether that is fatal."""


@dataclass(frozen=True)
class Message:
    id: str
    data: bytes


class Broker(Protocol):
    def publish(self, stream: str, payloads: list[bytes]) -> list[str] | None:
        """Append entries; None (nothing appended) while a work stream is full."""

    def consume(self, stream: str, group: str, consumer: str, count: int, timeout_s: float) -> list[Message]:
        """Up to `count` entries not yet delivered to `group`, waiting at most `timeout_s` for the first."""

    def ack(self, stream: str, group: str, ids: list[str]) -> None:
        """Mark entries done for `group`; only then may they be trimmed."""

    def depth(self, stream: str) -> int:
        """Entries held (not yet acknowledged by every group)."""

    def skip_to_end(self, stream: str, group: str) -> None:
        """Start `group` after the newest entry: a restarted reader of `control` must not act on what an
        earlier incarnation of the run announced (old weight versions, an old stop)."""

    def close(self) -> None: ...


def stream_name(run_id: str, name: str) -> str:
    """Streams are prefixed by the run id, so several runs can share one broker."""
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
    """Publish, waiting while the stream is full; `while_waiting` keeps the caller's duties (weight syncs)
    going so a full queue cannot deadlock the pipeline. Returns None only if asked to stop first."""
    while True:
        ids = broker.publish(stream, payloads)
        if ids is not None:
            return ids
        if should_stop():
            return None
        while_waiting()
        time.sleep(poll_s)
