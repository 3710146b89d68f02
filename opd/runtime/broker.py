"""TEMP stub (dropped at merge): how components and the launcher open the run's broker."""

from broker import Broker, connect


def open_broker(section) -> Broker:
    """A connected client for the broker named in `broker:`."""
    return connect(section)
