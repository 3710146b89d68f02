"""Transport between components: a small interface (base.py), one file per broker, and one registry.

A broker type is one entry in BROKERS and one class that declares its `Capabilities` and builds itself from its
`broker:` config section (`from_config`); everything here dispatches on `section.type` so that no code outside
broker/ has to. Classes are imported on first use: a zmq run never imports redis-py.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from broker.base import (
    Broker,
    BrokerType,
    BrokerUnavailable,
    Capabilities,
    Message,
    NoEmbeddedBroker,
    PoisonRecord,
    publish_with_backpressure,
    stream_name,
)

# broker.type -> "module:Class"; a new broker is one file in broker/ and one line here (plus its config section)
BROKERS: dict[str, str] = {
    "zmq": "broker.zmq:ZmqBroker",
    "redis": "broker.redis:RedisBroker",
}


class UnknownBroker(ValueError):
    """broker.type names no registered broker."""


def broker_type(section: Any) -> type[BrokerType]:
    """The class registered for `section.type` (the `broker:` config section, or anything with a `type`)."""
    name = getattr(section, "type", None)
    target = BROKERS.get(name) if isinstance(name, str) else None
    if target is None:
        raise UnknownBroker(
            f"broker.type {name!r} is not a known broker; choose one of {', '.join(map(repr, BROKERS))} "
            "(a new one is registered in BROKERS in broker/__init__.py)"
        )
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def connect(section: Any, *, poison_record: PoisonRecord | None = None) -> Broker:
    """A client for the broker of `section`. `poison_record` builds the dead-letter record for an entry a
    redelivering broker gives up on; components pass opd.protocol.dead_letter_record through
    opd.runtime.broker.open_broker, tools that never consume a work stream may leave it out."""
    return broker_type(section).from_config(section, poison_record=poison_record)


def capabilities(section: Any) -> Capabilities:
    """What the broker of `section` can do, without connecting to it."""
    return broker_type(section).capabilities


def serve(section: Any, ready: Callable[[], None] | None = None) -> None:
    """Run the embedded broker in the foreground (`opd broker`); NoEmbeddedBroker, naming the fix, when this
    broker type is a server opd does not run."""
    broker_type(section).serve(section, ready)


def address(section: Any) -> str:
    """Where the broker of `section` is, for messages (credentials left out)."""
    return broker_type(section).address(section)


def resolve(section: Any, free_port: Callable[[], int]) -> None:
    """Decide in place what a run fixes once for all its processes (zmq: a free port for port 0)."""
    broker_type(section).resolve(section, free_port)


def missing(section: Any) -> list[str]:
    """Dotted names of broker settings still undecided (zmq: `broker.port` while 0); a component started by
    hand needs them set, since only the launcher decides them for a whole run."""
    return broker_type(section).missing(section)


def wait_ready(
    section: Any,
    *,
    within_s: float,
    alive: Callable[[], bool] = lambda: True,
    poison_record: PoisonRecord | None = None,
) -> Broker:
    """A client once the broker answers a ping: for a launcher that has just spawned the embedded broker or
    expects an external server. Gives up after `within_s`, or as soon as `alive()` turns false (the spawned
    broker process died), with BrokerUnavailable saying what to do."""
    kind = broker_type(section)
    client = kind.from_config(section, poison_record=poison_record)
    deadline = time.monotonic() + within_s
    while True:
        client.timeout_s = min(1.0, section.request_timeout_s)
        try:
            client.ping()
            break
        except BrokerUnavailable as exc:
            if not alive() or time.monotonic() > deadline:
                client.close()
                raise BrokerUnavailable(f"{exc}; {kind.unreachable_hint}") from None
            time.sleep(0.1)
    client.timeout_s = section.request_timeout_s
    return client


__all__ = [
    "BROKERS",
    "Broker",
    "BrokerUnavailable",
    "Capabilities",
    "Message",
    "NoEmbeddedBroker",
    "UnknownBroker",
    "address",
    "broker_type",
    "capabilities",
    "connect",
    "missing",
    "publish_with_backpressure",
    "resolve",
    "serve",
    "stream_name",
    "wait_ready",
]
