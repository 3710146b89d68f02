"""Elastic weight sync: actors join and leave between versions, and a dead actor never stalls the learner.

A collective needs a fixed set of ranks, so membership is fixed per *epoch*: at each sync the learner takes the
actors that are alive (their heartbeat counter in the learner's TCPStore moved within `liveness_s`), and when
that set differs from the last one it starts epoch e+1 with a fresh group (store prefix `.../weights/e`, ranks
by name). The version announcement on `control` carries epoch and members, so each actor knows whether and with
which rank to take part. If forming the group or the broadcast fails (an actor died in between), the learner
waits until the dead heartbeat is stale and retries the same version in a new epoch.

Heartbeats are counters, not timestamps, and their age is judged on the learner's clock only, so hosts need no
synchronised clocks. A joining actor takes whatever version is broadcast: every broadcast carries all weights.

Snapshots (snapshot.py) cover what a broadcast cannot: before registering, a joining actor loads the newest
snapshot no newer than the learner's version and stamps that version, so it has recent weights before its first
broadcast. An actor whose receive failed after it had overwritten some buckets holds a mix of two versions; it
reloads a snapshot at once, or, with none, marks its version unknown (-1) so it samples nothing until a whole
broadcast arrives. After `fallback_after` failed receives in a row it also takes a newer snapshot when one exists.
Every collective runs under the group's timeout (`join_timeout_s`), and a version that fails `attempts` times is
given up (counted), not raised: the learner keeps training and the actors catch up at the next version.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from weight_sync.broadcast import SyncStats, WeightBroadcaster, WeightReceiver
from weight_sync.group import make_group
from weight_sync.snapshot import SnapshotStore, load_snapshot

REGISTRY_COUNT = "actors/count"
SEEN_PREFIX = "seen/"  # seen/<actor>: the newest epoch announcement the actor has read
VERSION_KEY = "weights/version"  # the learner's current version: a joining actor waits for it before sampling
# the newest version the learner gave up sending (a lockstep actor stops waiting for it)
GIVEN_UP_KEY = "weights/given_up"


def _client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def register(store: dist.Store, name: str) -> None:
    index = store.add(REGISTRY_COUNT, 1)
    store.set(f"actors/{index}", name)


class Heartbeat:
    """Bumps `beat/<name>` every `every_s` from a thread with its own store connection."""

    def __init__(self, host: str, port: int, name: str, every_s: float, timeout_s: float):
        self.key, self.every_s = f"beat/{name}", every_s
        self.store = _client(host, port, timeout_s)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.store.add(self.key, 1)
            except Exception:  # the learner (store host) is gone or restarting; keep trying until stopped
                pass
            self.stopped.wait(self.every_s)

    def stop(self) -> None:
        self.stopped.set()


class Membership:
    """The learner's view of which registered actors are alive."""

    def __init__(self, store: dist.Store, liveness_s: float):
        self.store, self.liveness_s = store, liveness_s
        self.seen: dict[
            str, tuple[int, float]
        ] = {}  # name -> (last counter, when it last moved, learner clock)

    def _names(self) -> list[str]:
        if not self.store.check([REGISTRY_COUNT]):
            return []
        count = int(self.store.add(REGISTRY_COUNT, 0))
        return sorted({self.store.get(f"actors/{i}").decode() for i in range(1, count + 1)})

    def alive(self) -> list[str]:
        now, out = time.monotonic(), []
        for name in self._names():
            beat = int(self.store.add(f"beat/{name}", 0))
            last = self.seen.get(name)
            if last is None or beat != last[0]:
                self.seen[name] = (beat, now)
            if beat > 0 and now - self.seen[name][1] <= self.liveness_s:
                out.append(name)
        return out


class ElasticBroadcaster:
    """Learner side: broadcast each version to the actors alive now, re-forming the group when they change."""

    def __init__(
        self,
        store: dist.Store,
        prefix: str,
        backend: str,
        broadcaster: WeightBroadcaster,
        announce: Callable[[int, int, list[str]], None],
        liveness_s: float,
        join_timeout_s: float,
        attempts: int = 3,
        log=None,
        version: int = 0,
    ):
        self.store, self.prefix, self.backend = store, prefix, backend
        self.tx, self.announce = broadcaster, announce
        self.membership = Membership(store, liveness_s)
        self.join_timeout_s, self.attempts, self.log = join_timeout_s, attempts, log
        self.epoch, self.members = 0, []
        self.failed_versions = 0
        # Alive by heartbeat but absent from a failed epoch (hung, or busy past the timeout): left out until it
        # shows it read a later announcement, so one stuck actor does not cost every version a timeout.
        self.suspects: dict[str, int] = {}  # name -> the epoch it missed
        self.publish_version(version)

    def _seen(self, name: str) -> int:
        key = f"{SEEN_PREFIX}{name}"
        return int(self.store.get(key)) if self.store.check([key]) else -1

    def _candidates(self) -> list[str]:
        out = []
        for name in self.membership.alive():
            if name in self.suspects and self._seen(name) <= self.suspects[name]:
                continue
            self.suspects.pop(name, None)
            out.append(name)
        return out

    def _suspect_absent(self, members: list[str]) -> None:
        for name in members:
            if self._seen(name) < self.epoch:
                self.suspects[name] = self.epoch

    def publish_version(self, version: int) -> None:
        """Joining actors wait for (and bootstrap from snapshots up to) the version named here."""
        self.store.set(VERSION_KEY, str(version))

    def sync(self, version: int) -> SyncStats | None:
        """None when no actor is alive (nothing to send; a joining actor gets the next version) or when every
        attempt failed (`failed_versions` counts those)."""
        self.publish_version(version)
        for attempt in range(self.attempts):
            members = self._candidates()
            if not members:
                if self.suspects:  # an empty epoch, announced so that a suspect can show it reads them again
                    self.epoch, self.members, self.tx.group = self.epoch + 1, [], None
                    self.announce(version, self.epoch, [])
                return None
            if members != self.members:
                self.epoch += 1
                self.members = members
                self.tx.group = None
            self.announce(version, self.epoch, members)
            try:
                if self.tx.group is None:
                    self.tx.group = make_group(
                        self.store,
                        f"{self.prefix}/{self.epoch}",
                        0,
                        1 + len(members),
                        self.backend,
                        self.join_timeout_s,
                    )
                return self.tx.broadcast(version)
            except Exception as exc:  # a member died between the heartbeat and the collective
                if self.log:
                    self.log(
                        f"weight sync v{version} to {members} failed ({exc}); retrying without dead actors"
                    )
                self._suspect_absent(members)
                self.members, self.tx.group = [], None
                if attempt + 1 < self.attempts:
                    time.sleep(self.membership.liveness_s)
        self.failed_versions += 1
        self.store.set(GIVEN_UP_KEY, str(version))
        if self.log:
            self.log(f"weight sync of version {version} failed {self.attempts} times; giving it up")
        return None


class ElasticReceiver:
    """Actor side: register, heartbeat, and take part in the epochs that name this actor."""

    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        prefix: str,
        backend: str,
        receiver: WeightReceiver,
        timeout_s: float,
        join_timeout_s: float,
        heartbeat_s: float,
        snapshots: SnapshotStore | None = None,
        on_weights: Callable[[int, str], None] | None = None,
        fallback_after: int = 2,
    ):
        self.name, self.prefix, self.backend = name, prefix, backend
        self.rx, self.join_timeout_s = receiver, join_timeout_s
        self.snapshots, self.on_weights, self.fallback_after = snapshots, on_weights, fallback_after
        self.store = _client(host, port, timeout_s)
        self.rx.check_manifest(self.store)
        self.epoch: int | None = None
        # An epoch this actor failed in is never re-entered: its rendezvous keys are spent, and the learner has
        # already moved on (re-joining it would block in gloo's connect on the stale peers until timeout).
        self.failed_epoch: int | None = None
        self.seen_epoch = 0
        self.version, self.source, self.failures = 0, "initial", 0
        self.take_snapshot()  # before registering: the learner may name us in a sync right after
        register(self.store, name)
        self.heartbeat = Heartbeat(host, port, name, heartbeat_s, timeout_s)

    def _took(self, version: int, source: str) -> None:
        self.version, self.source = version, source
        if self.on_weights is not None:
            self.on_weights(version, source)

    def take_snapshot(self, any_version: bool = False) -> int | None:
        """Load the newest snapshot no newer than the learner's version (and, unless `any_version`, newer than
        ours); its version, or None when there is none to take. A mismatched snapshot raises SnapshotMismatch."""
        if self.snapshots is None:
            return None
        found = self.snapshots.latest(self.learner_version())
        if found is None or (found[0] <= self.version and not any_version):
            return None
        try:
            version = load_snapshot(found[1], self.rx.named)
        except OSError:  # pruned between listing and reading (a newer one exists now); the next try finds it
            return None
        self._took(version, "snapshot")
        return version

    def _recover(self) -> None:
        """After a failed receive: never keep stamping a version whose weights are half overwritten."""
        if self.rx.dirty:
            if self.take_snapshot(any_version=True) is None:
                self.version, self.source = -1, "partial"  # unknown weights: sample nothing until a broadcast
        elif self.failures >= self.fallback_after:
            self.take_snapshot()

    def apply(self, version: int, epoch: int, members: list[str]) -> SyncStats | None:
        """Receive `version` if this actor is a member of `epoch`; None when not (or when the epoch failed)."""
        if epoch > self.seen_epoch:  # tells the learner this actor is responsive (see `suspects`)
            self.seen_epoch = epoch
            self.store.set(f"{SEEN_PREFIX}{self.name}", str(epoch))
        if self.name not in members or version <= self.version and epoch == self.epoch:
            return None
        if epoch == self.failed_epoch:
            return None
        try:
            if epoch != self.epoch:
                self.rx.group = make_group(
                    self.store,
                    f"{self.prefix}/{epoch}",
                    1 + members.index(self.name),
                    1 + len(members),
                    self.backend,
                    self.join_timeout_s,
                )
                self.epoch = epoch
            stats = self.rx.receive(version)
        except Exception:  # the learner gave up on this epoch (someone died); a later one will include us
            self.failed_epoch, self.epoch, self.rx.group = epoch, None, None
            self.failures += 1
            self._recover()
            return None
        self.failures = 0
        self._took(version, "broadcast")
        return stats

    def learner_version(self) -> int:
        return int(self.store.get(VERSION_KEY)) if self.store.check([VERSION_KEY]) else 0

    def given_up_version(self) -> int:
        """The newest version the learner stopped trying to send: one that will never arrive here."""
        return int(self.store.get(GIVEN_UP_KEY)) if self.store.check([GIVEN_UP_KEY]) else -1

    def close(self) -> None:
        self.heartbeat.stop()
