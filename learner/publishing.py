"""Weight publishing: the learner's side of weight sync, the mirror of the actor's follower (`actors/actor.py`).

The learner hosts the rendezvous store where actors register and heartbeat, announces each version on `control`
(`opd.protocol.weights_record`: version, sync epoch, members) and broadcasts the parameters to the actors alive
then; it also writes safetensors snapshots (the late joiner's bootstrap) and, when asked, each version's digest.
An actor that joins between versions (a restart, a resume) is sent the current version at once (`catch_up`).
The store listens on `weight_sync.host` only, and membership needs the run's secret (`opd.runtime.run_secret`):
announcements carry the learner's signature (`auth`).

The layout (names, shapes, buckets) is read from the full parameters, so it must be taken before an engine may
shard them (ZeRO-3): `record_layout` is called on the bare model, and `WeightPublisher` takes that layout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from broker import Broker
from opd.config import WeightSyncConfig
from opd.models.vision import synced_parameters
from opd.protocol import weights_record
from opd.runtime import run_secret
from opd.runtime.lifecycle import log
from weight_sync import ElasticBroadcaster, WeightBroadcaster, make_store, resolve_backend
from weight_sync.snapshot import SnapshotStore
from weight_sync.verify import DigestLog

CATCH_UP_EVERY_S = 1.0  # how often a waiting learner looks for actors that joined since the last sync
CATCH_UP_MAX_S = 60.0  # the longest wait between catch-ups that keep failing for the same actors


def record_layout(
    model: torch.nn.Module, ws: WeightSyncConfig, freeze_vision: bool = False
) -> WeightBroadcaster:
    """The broadcast layout of `model`'s full parameters (with `student.freeze_vision`, the language model's
    only: its manifest says so): call before an engine may shard them."""
    return WeightBroadcaster(None, synced_parameters(model, freeze_vision), ws.bucket_mb)


class WeightPublisher:
    def __init__(
        self,
        ws: WeightSyncConfig,
        layout: WeightBroadcaster,
        gathered: Callable[[], AbstractContextManager],
        broker: Broker,
        control: str,
        run_id: str,
        run_dir: Path,
        devices: tuple[str, str],
        version: int,
    ):
        """`gathered` is the engine's context in which the full parameters are in place; `devices` the learner's
        and the actors' (they pick gloo or NCCL); `version` the one the actors are sent first (a resumed run's)."""
        self.ws, self.layout, self.gathered = ws, layout, gathered
        self.broker, self.control = broker, control
        self.backend = backend = resolve_backend(ws.backend, *devices)
        self.store = make_store(ws.host, ws.port, 0, None, ws.timeout_s)
        self.snapshots = SnapshotStore(ws.snapshot_dir or run_dir / "weights")
        for gone in self.snapshots.drop_newer_than(version):  # from steps a resume does not restore
            log.info("removed weight snapshot %s: newer than the resumed version %d", gone.name, version)
        self.digests = DigestLog(run_dir / "weight_digests", "learner") if ws.verify_digests else None
        self.sync = ElasticBroadcaster(
            self.store,
            f"{run_id}/weights",
            backend,
            layout,
            announce=self._announce,
            liveness_s=ws.liveness_s,
            join_timeout_s=ws.join_timeout_s,
            secret=run_secret.load(ws, run_dir, create=True),
            bind=ws.host,
            log=log.warning,
            version=version,
            stopping=lambda: broker.stopping(),  # a SIGTERM ends a sync in progress (failing ones included)
        )
        self._last_catch_up = 0.0
        self._catch_up_every, self._failed_for = CATCH_UP_EVERY_S, None

    def _announce(self, version: int, epoch: int, members: list[str], auth: str) -> None:
        self.broker.publish(self.control, [weights_record(version, epoch=epoch, members=members, auth=auth)])

    def send(self, version: int) -> dict[str, float]:
        """Send `version` to the actors alive now; the step record's weight_sync_* and snapshot fields."""
        failed_before = self.sync.failed_versions
        t0 = time.perf_counter()
        with self.gathered():
            # ZeRO-3: every learner rank's shards gathered into full parameters (0 when nothing is sharded)
            gather_s = time.perf_counter() - t0
            stats = self.sync.sync(version)
            record = {**self._snapshot_and_digest(version), "weight_gather_seconds": gather_s}
        if self.sync.failed_versions > failed_before:
            return {**record, "weight_sync_members": 0, "weight_sync_failed": 1}
        if stats is None:
            return {**record, "weight_sync_members": 0}
        return {
            **record,
            "weight_sync_seconds": stats.seconds,
            "weight_sync_gbps": stats.gbps,
            "weight_sync_bytes": stats.bytes,
            "weight_sync_members": len(self.sync.members),
            "weight_sync_epoch": self.sync.epoch,
        }

    def catch_up(self, version: int) -> None:
        """An actor that joined since the last sync gets `version` now: waiting for the next step could be
        forever if everything it generates is too stale to make one.

        A catch-up that reaches none of the actors it was for (alive by heartbeat, reading announcements, but
        unable to join: a network that refuses gloo's connections) is tried again after twice the wait, up to
        CATCH_UP_MAX_S, instead of every second for ever; a different set of newcomers starts over at once."""
        now = time.monotonic()
        if now - self._last_catch_up < self._catch_up_every:
            return
        self._last_catch_up = now
        self.sync.repair()  # what a stranger overwrote in the store (an actor would wait for it)
        if version == 0:
            return
        joined = (
            self.sync.newcomers()
        )  # not a suspect that still reads no announcement: it would cost a timeout
        if not joined:
            return
        if joined != self._failed_for:
            self._catch_up_every = CATCH_UP_EVERY_S
        log.info("new actor(s) %s: sending them weight version %d", joined, version)
        self.send(version)
        if any(name in self.sync.members for name in joined):
            self._catch_up_every, self._failed_for = CATCH_UP_EVERY_S, None
        else:
            self._catch_up_every = min(2 * self._catch_up_every, CATCH_UP_MAX_S)
            self._failed_for = joined
            log.warning(
                "weight catch-up for %s reached none of them; next try in %.0fs", joined, self._catch_up_every
            )

    def _snapshot_and_digest(self, version: int) -> dict[str, float]:
        """Inside `gathered()`: the full parameters of the version just published."""
        every, named, record = self.ws.snapshot_every, self.layout.as_sent(), {}
        if self.digests is not None:
            self.digests.record(version, named, "learner")
        if every and version % every == 0 and self.snapshots.last_version != version:
            copy_s = self.snapshots.write_async(version, named)
            if copy_s is None:
                record["weight_snapshot_skipped"] = 1
            else:
                record["weight_snapshot_copy_seconds"] = copy_s
        if self.snapshots.last_error is not None:
            log.warning("weight snapshot failed: %s", self.snapshots.last_error)
            self.snapshots.last_error = None
        return record

    def finish(self) -> None:
        """Wait for the last snapshot's copy to be written."""
        self.snapshots.wait()
