"""`opd dead-letter ls|replay`: see what a run rejected and why, and put it back once the cause is fixed.

Listing reads the run's dead_letter stream without consuming it, so it can be repeated and does not take the
records from the launcher. Replay publishes a record's original bytes to the stream it came from and then
deletes the record, so a replayed message is never in both places for long; a message that fails again is
dead-lettered again with its new reason.
"""

from __future__ import annotations

import json
import sys

from broker import capabilities
from opd.config import Config
from opd.protocol import ProtocolError, Streams, trajectory_id, unpack_control
from opd.runtime.broker import open_broker


class DeadLetterError(RuntimeError):
    """The run's broker cannot serve dead letters (the embedded broker keeps nothing after its run)."""


def _records(cfg: Config):
    if not capabilities(cfg.broker).keeps_dead_letters:
        raise DeadLetterError(
            f"the {cfg.broker.type} broker keeps no dead letters after its run: read runs/<id>/dead_letter.jsonl, "
            "or run with a broker that keeps them (broker.type: redis) to inspect and replay them"
        )
    broker = open_broker(cfg.broker)
    stream = Streams(cfg.run.run_id).dead_letter
    out = []
    for entry_id, data in broker.entries(stream):
        try:
            out.append((entry_id, unpack_control(data)))
        except ProtocolError as exc:
            out.append((entry_id, {"reason": f"unreadable dead-letter record: {exc}"}))
    return broker, stream, out


def list_dead_letters(cfg: Config, out=None) -> int:
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirected stdout
    _, _, records = _records(cfg)
    for entry_id, rec in records:
        shown = {
            "entry": entry_id,
            "from": rec.get("source"),
            "stream": rec.get("stream"),
            "trajectory_id": rec.get("trajectory_id")
            or (trajectory_id(rec["data"]) if rec.get("data") else None),
            "size": rec.get("size"),
            "replayable": rec.get("data") is not None,
            "reason": rec.get("reason"),
        }
        out.write(json.dumps(shown) + "\n")
    return len(records)


def replay_dead_letters(cfg: Config, entries: list[str] | None, out=None) -> int:
    """Re-publish the chosen records (all when `entries` is None) to their source streams."""
    out = out or sys.stdout
    broker, stream, records = _records(cfg)
    done = 0
    for entry_id, rec in records:
        if entries is not None and entry_id not in entries:
            continue
        data, source = rec.get("data"), rec.get("stream")
        if data is None or not isinstance(source, str):
            out.write(f"{entry_id}: not replayable (its bytes were not kept: {rec.get('size')} bytes)\n")
            continue
        if broker.publish(source, [data]) is None:
            out.write(f"{entry_id}: {source} is full; try again when the run has drained it\n")
            continue
        broker.delete(stream, [entry_id])
        done += 1
    out.write(f"replayed {done} message(s)\n")
    return done
