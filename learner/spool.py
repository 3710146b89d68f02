"""The join spool: mixture copies the learner holds for a join, kept on disk so the broker can forget them at once.

Why: a broker counts an entry against its stream's `broker.max_depth` until it is acknowledged. Held copies left
unacknowledged deadlock a run whose pools finish out of order (several scorers of one pool, or pools of another
speed): teacher A's scored stream fills with copies of trajectories 0..B-1, teacher B's with copies of B/2..3B/2,
fewer than a batch join, nothing is trained, nothing is acknowledged and every scorer waits for room forever. So a
copy held for a join is appended here, flushed to disk, and only then acknowledged; the broker's depth counts what
the learner has not read yet plus the batch being trained, never the joins in waiting. How many copies wait is
still bounded: the actors' backpressure on each teacher's rollouts stream keeps them at most a few queues ahead of
the slowest teacher of a route.

The file (`ledger/learner.join_spool`, beside the other ledgers) is a sequence of msgpack records, appended:
`{"copy": {...}}` with the copy's broker entry (stream, id: for the records only), trajectory id and payload, and
`{"settled": [ids]}` once those trajectories are trained, dead-lettered or dropped as stale. A resumed learner
reads back the copies not settled and joins them again (their broker entries were acknowledged: a copy the broker
delivers again, when the crash came between the write and the acknowledgement, is a duplicate). A record cut
short by a crash is dropped (its copy was not acknowledged yet); any unreadable or foreign bytes end the read
there, with a warning naming the file and what was dropped. The file is rewritten with the live copies only
once the settled ones outweigh them, so it stays within about twice what is held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from opd.runtime.lifecycle import log

SPOOL_FILE = "learner.join_spool"
COMPACT_MIN_BYTES = 1 << 20  # below this the file is left to grow: rewriting it would cost more than it saves


@dataclass(frozen=True)
class Spooled:
    """A copy read back from the spool: its broker entry when it was spooled, its trajectory id and payload."""

    stream: str
    message_id: str
    trajectory_id: str
    payload: bytes


def _well_formed(record: object) -> bool:
    """A record this module wrote: a copy with its four fields, or a list of settled trajectory ids."""
    if not isinstance(record, dict):
        return False
    if "copy" in record:
        c = record["copy"]
        return (
            isinstance(c, dict)
            and all(isinstance(c.get(k), str) for k in ("stream", "message_id", "trajectory_id"))
            and isinstance(c.get("data"), bytes)
        )
    settled = record.get("settled")
    return isinstance(settled, list) and all(isinstance(i, str) for i in settled)


def _pack(record: dict) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


class JoinSpool:
    """Append-only file of held copies with settled marks (see the module docstring); one learner writes it."""

    def __init__(self, path: Path):
        self.path = path
        self._live: dict[str, list[bytes]] = {}  # trajectory id -> its copies' packed records
        self._live_bytes = 0
        self._file = None
        self._unsynced = (
            False  # appended since the last fsync: the intake syncs every poll, mostly with nothing new
        )

    def load(self) -> list[Spooled]:
        """The copies not settled, in the order they were spooled; drops a record cut short at the end."""
        self._live, self._live_bytes = {}, 0
        if not self.path.exists():
            return []
        records, end = [], 0
        with open(self.path, "rb") as fh:
            unpacker = msgpack.Unpacker(fh, raw=False)
            try:
                for record in unpacker:
                    if not _well_formed(record):
                        break
                    records.append(record)
                    end = unpacker.tell()
            except (
                Exception
            ):  # msgpack raises several unrelated types for corrupt bytes: the end of what is usable
                pass
        size = self.path.stat().st_size
        if end != size:
            log.warning(
                "join spool %s: %d bytes from offset %d are unreadable and dropped (a record cut short by a crash: "
                "its copy was never acknowledged and comes back from the broker; anything else: those copies are "
                "lost and their mixtures end by routing.on_join_timeout)", self.path, size - end, end,
            )  # fmt: skip
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        copies: dict[str, list[Spooled]] = {}
        for record in records:
            if "copy" in record:
                c = record["copy"]
                copies.setdefault(c["trajectory_id"], []).append(
                    Spooled(c["stream"], c["message_id"], c["trajectory_id"], c["data"])
                )
            for tid in record.get("settled", ()):
                copies.pop(tid, None)
        out = [s for group in copies.values() for s in group]
        for s in out:
            self._remember(
                s.trajectory_id, self._copy_record(s.stream, s.message_id, s.trajectory_id, s.payload)
            )
        return out

    @staticmethod
    def _copy_record(stream: str, message_id: str, trajectory_id: str, payload: bytes) -> bytes:
        return _pack(
            {
                "copy": {
                    "stream": stream,
                    "message_id": message_id,
                    "trajectory_id": trajectory_id,
                    "data": payload,
                }
            }
        )

    def _remember(self, trajectory_id: str, packed: bytes) -> None:
        self._live.setdefault(trajectory_id, []).append(packed)
        self._live_bytes += len(packed)

    def _append(self, packed: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
        self._file.write(packed)
        self._unsynced = True

    def add(self, stream: str, message_id: str, trajectory_id: str, payload: bytes) -> None:
        """Append one held copy (buffered: `sync` before acknowledging it)."""
        packed = self._copy_record(stream, message_id, trajectory_id, payload)
        self._append(packed)
        self._remember(trajectory_id, packed)

    def holds(self, trajectory_id: str) -> bool:
        return trajectory_id in self._live

    def settle(self, trajectory_ids: list[str]) -> None:
        """Mark trajectories done (trained, dead-lettered or dropped as stale): their copies are not read back."""
        ids = [i for i in trajectory_ids if i in self._live]
        if not ids:
            return
        self._append(_pack({"settled": ids}))
        for i in ids:
            self._live_bytes -= sum(len(r) for r in self._live.pop(i))
        self.sync()
        if self.path.stat().st_size > max(2 * self._live_bytes, COMPACT_MIN_BYTES):
            self._compact()

    def sync(self) -> None:
        """Flush and fsync what was appended: after this the copies may be acknowledged."""
        if self._file is not None and self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._unsynced = False

    def _compact(self) -> None:
        """Rewrite the file with the live copies only (a new file renamed over the old: a crash keeps either)."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            for records in self._live.values():
                fh.writelines(records)
            fh.flush()
            os.fsync(fh.fileno())
        self.close()
        tmp.replace(self.path)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
