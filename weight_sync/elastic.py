"""Elastic weight sync: actors join and leave between versions, and a dead actor never stalls the learner.

A collective needs a fixed set of ranks, so membership is fixed per *epoch*: at each sync the learner takes the
actors that are alive (their heartbeat counter in the learner's TCPStore moved within `liveness_s`), and when
that set differs from the last one it starts epoch e+1 with a fresh group (store prefix `.../weights/e`, ranks
by name). The version announcement on `control` carries epoch and members, so each actor knows whether and with
which rank to take part. If forming the group or the broadcast fails (an actor died in between), the learner
waits until the dead heartbeat is stale and retries the same version in a new epoch.

Heartbeats are counters, not timestamps, and their age is judged on the learner's clock only, so hosts need no
synchronised clocks. A joining actor takes whatever version is broadcast: every broadcast carries all weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from weight_sync.broadcast import SyncStats, WeightBroadcaster, WeightReceiver
from weight_sync.group import make_group

REGISTRY_COUNT = "actors/count"
VERSION_KEY = "weights/version"  # the learner's current version: a joining actor waits for it before sampling


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
    ):
        self.store, self.prefix, self.backend = store, prefix, backend
        self.tx, self.announce = broadcaster, announce
        self.membership = Membership(store, liveness_s)
        self.join_timeout_s, self.attempts, self.log = join_timeout_s, attempts, log
        self.epoch, self.members = 0, []

    def sync(self, version: int) -> SyncStats | None:
        """None when no actor is alive (nothing to send; a joining actor gets the next version)."""
        self.store.set(VERSION_KEY, str(version))
        for attempt in range(self.attempts):
            members = self.membership.alive()
            if not members:
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
                self.members, self.tx.group = [], None
                if attempt + 1 < self.attempts:
                    time.sleep(self.membership.liveness_s)
        raise RuntimeError(f"weight sync of version {version} failed {self.attempts} times")


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
    ):
        self.name, self.prefix, self.backend = name, prefix, backend
        self.rx, self.join_timeout_s = receiver, join_timeout_s
        self.store = _client(host, port, timeout_s)
        self.rx.check_manifest(self.store)
        register(self.store, name)
        self.heartbeat = Heartbeat(host, port, name, heartbeat_s, timeout_s)
        self.epoch: int | None = None
        self.version = 0

    def apply(self, version: int, epoch: int, members: list[str]) -> SyncStats | None:
        """Receive `version` if this actor is a member of `epoch`; None when not (or when the epoch failed)."""
        if self.name not in members or version <= self.version and epoch == self.epoch:
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
            self.epoch, self.rx.group = None, None
            return None
        self.version = version
        return stats

    def learner_version(self) -> int:
        return int(self.store.get(VERSION_KEY)) if self.store.check([VERSION_KEY]) else 0

    def close(self) -> None:
        self.heartbeat.stop()
