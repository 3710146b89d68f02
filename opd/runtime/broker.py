"""How a component opens its broker: with the protocol's dead-letter record for entries that keep failing.

broker/ imports nothing of the project, so the record format (opd.protocol) reaches it as a callback here; every
component opens its broker through `open_broker` so that none forgets it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker import Broker, connect, wait_ready
from opd.protocol import dead_letter_record


def open_broker(section: Any, *, stopping: Callable[[], bool] | None = None) -> Broker:
    """A client for the `broker:` config section. `stopping` is the component's stop flag: once it is set, a
    broker that does not answer is given up on in seconds rather than after broker.request_timeout_s."""
    client = connect(section, poison_record=dead_letter_record)
    if stopping is not None:
        client.stopping = stopping
    return client


def open_broker_when_ready(section: Any, *, within_s: float, alive: Callable[[], bool]) -> Broker:
    """A client once the broker answers (a launcher that has just started the embedded broker); BrokerUnavailable
    with the broker's hint after `within_s`, or as soon as `alive()` turns false."""
    return wait_ready(section, within_s=within_s, alive=alive, poison_record=dead_letter_record)
