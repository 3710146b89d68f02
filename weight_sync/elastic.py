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

Every sync attempt targets a fresh epoch or does not happen: a version the current epoch's members already hold is
not sent again (each member would skip it and the learner would wait out the join timeout for nothing), which is
what a catch-up for an actor left out as a suspect used to do.

Nothing here trusts the store (auth.py): registrations, heartbeats, `seen` marks, the manifest, the learner's
version and session are signed with the run's secret, and announcements carry a signature (`auth`). An unsigned
registration never becomes a member (so it cannot make a sync wait for it), and an actor ignores an unsigned
announcement rather than joining a group that will never form.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from weight_sync.auth import Signer, fetch, put
from weight_sync.broadcast import MANIFEST_KEY, SyncStats, WeightBroadcaster, WeightReceiver
from weight_sync.group import local_address, make_group
from weight_sync.snapshot import SnapshotStore, load_snapshot

SESSION_KEY = "session"  # the learner's random token of this start, signed without a session
REGISTRY_COUNT = "actors/count"
SEEN_PREFIX = "seen/"  # seen/<registration>: the newest epoch announcement the actor has read
VERSION_KEY = "weights/version"  # the learner's current version: a joining actor waits for it before sampling
# the newest version the learner gave up sending (a lockstep actor stops waiting for it)
GIVEN_UP_KEY = "weights/given_up"
SCAN_WINDOW = 64  # registrations the learner reads per look: a stranger bumping the counter costs it no more
POLL_S = 0.2
WARN_EVERY_S = 10.0
STORE_RETRY_S = 1.0  # a follower that lost the store probes it (a plain TCP connect) at most this often
_log = logging.getLogger(__name__)


def _client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    """Whether anything listens at the store's address: a plain connect, so a store that is gone costs no torch
    error (each failed store call prints a C++ warning with a stack trace)."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


class _Warnings:
    """Refusals are logged, but a stranger writing in a loop must not flood the log: one line per kind per
    WARN_EVERY_S, with the count since the last."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.last, self.count = log, {}, {}

    def __call__(self, kind: str, message: str) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        now = time.monotonic()
        if now - self.last.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self.log(f"{message} (refused {self.count[kind]}x)")
            self.last[kind], self.count[kind] = now, 0


def publish_session(store: dist.Store, signer: Signer) -> None:
    put(store, signer.with_session(""), SESSION_KEY, signer.session)


def read_session(store: dist.Store, secret: str | bytes, timeout_s: float, warn: _Warnings) -> Signer:
    """The learner's session, signed with the secret: what every other signature of this life is bound to."""
    base, deadline = Signer(secret), time.monotonic() + timeout_s
    while True:
        session = fetch(store, base, SESSION_KEY)
        if session:
            return base.with_session(session)
        if store.check([SESSION_KEY]):
            warn(
                "session",
                "ignored a weight-sync session not signed with this process's secret (is OPD_WEIGHT_SYNC_SECRET "
                "or weight_sync.secret_file the run's?)",
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no weight-sync session signed with this process's secret from the learner within {timeout_s:.0f}s"
                " (OPD_WEIGHT_SYNC_SECRET, weight_sync.secret_file or <run dir>/weight_sync.secret must hold the "
                "run's secret)"
            )
        time.sleep(POLL_S)


def register(store: dist.Store, signer: Signer, name: str) -> int:
    """Signed registration of `name`; its index keys the actor's heartbeat and `seen` mark."""
    index = int(store.add(REGISTRY_COUNT, 1))
    put(store, signer, f"actors/{index}", name)
    return index


def mark_seen(store: dist.Store, signer: Signer, index: int, epoch: int) -> None:
    put(store, signer, f"{SEEN_PREFIX}{index}", str(epoch))


def _signed_int(store: dist.Store, signer: Signer, key: str) -> int | None:
    value = fetch(store, signer, key)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


class Heartbeat:
    """Writes a signed, growing counter to `beat/<registration>` every `every_s`, from a thread with its own
    store connection. The learner counts a beat only when the counter grows, so replaying an old value is no
    beat.

    When the store is gone (the learner died or restarts) one warning is logged, and the thread then only
    probes the port with a plain TCP connect until it accepts again: every write on a dead TCPStore client makes
    torch log a warning with a C++ backtrace, once a second for as long as the actor lives. Whether the learner
    is gone for good is the learner watch's call (supervision.learner_silence_s), not this thread's."""

    def __init__(
        self,
        host: str,
        port: int,
        index: int,
        signer: Signer,
        every_s: float,
        timeout_s: float,
        log: Callable[[str], None] | None = None,
    ):
        self.key, self.signer, self.every_s, self.count = f"beat/{index}", signer, every_s, 0
        self.host, self.port, self.timeout_s, self.log = host, port, timeout_s, log or _log.warning
        self.store: dist.TCPStore | None = _client(host, port, timeout_s)
        self.failures = 0  # writes that failed since the store last answered
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        if self.store is None:
            if not _reachable(self.host, self.port, min(self.every_s, 1.0) or 1.0):
                return
            self.store = _client(self.host, self.port, min(self.timeout_s, 5.0))
        self.count += 1
        put(self.store, self.signer, self.key, str(self.count))
        if self.failures:
            self.log(f"weight-sync store at {self.host}:{self.port} answers again; heartbeating")
        self.failures = 0

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._beat()
            except Exception as exc:  # the learner (store host) is gone or restarting: retried quietly
                self.store = None
                self.failures += 1
                if self.failures == 1:
                    self.log(
                        f"weight-sync store at {self.host}:{self.port} unreachable ({exc}); retrying quietly "
                        "(the learner is judged gone after supervision.learner_silence_s)"
                    )
            self.stopped.wait(self.every_s)

    def stop(self) -> None:
        self.stopped.set()


class Membership:
    """The learner's view of which registered actors are alive: signed registrations whose signed heartbeat
    counter grew within `liveness_s`. Anything unsigned is refused and logged, never a member."""

    def __init__(self, store: dist.Store, signer: Signer, liveness_s: float, warn: _Warnings):
        self.store, self.signer, self.liveness_s, self.warn = store, signer, liveness_s, warn
        self.registrations: dict[str, int] = {}  # name -> its newest signed registration
        self.read: set[int] = set()  # registrations already judged
        # name -> (registration, last counter, when it last grew on the learner's clock)
        self.seen: dict[str, tuple[int, int, float]] = {}

    def _scan(self) -> None:
        """The newest SCAN_WINDOW registrations not judged yet (an index whose value is not written yet is
        looked at again next time; nothing here blocks on a key)."""
        if not self.store.check([REGISTRY_COUNT]):
            return
        count = int(self.store.add(REGISTRY_COUNT, 0))
        for i in range(max(1, count - SCAN_WINDOW + 1), count + 1):
            key = f"actors/{i}"
            if i in self.read or not self.store.check([key]):
                continue
            self.read.add(i)
            name = fetch(self.store, self.signer, key)
            if name is None:
                self.warn(
                    "register", f"refused weight-sync registration #{i}: not signed with the run's secret"
                )
            elif i > self.registrations.get(name, 0):
                self.registrations[name] = i

    def index(self, name: str) -> int | None:
        return self.registrations.get(name)

    def alive(self) -> list[str]:
        self._scan()
        now, out = time.monotonic(), []
        for name, index in sorted(self.registrations.items()):
            beat = _signed_int(self.store, self.signer, f"beat/{index}")
            if beat is None and self.store.check([f"beat/{index}"]):
                self.warn("beat", f"ignored a heartbeat of {name} not signed with the run's secret")
            last = self.seen.get(name)
            if last is None or last[0] != index or (beat or 0) > last[1]:
                self.seen[name] = (index, beat or 0, now)
            if self.seen[name][1] > 0 and now - self.seen[name][2] <= self.liveness_s:
                out.append(name)
        return out


class ElasticBroadcaster:
    """Learner side: broadcast each version to the actors alive now, re-forming the group when they change.

    `announce(version, epoch, members, auth)` tells the actors (on `control`); `auth` is the signature they check.
    `bind` is the address the learner's gloo pairs listen on (weight_sync.host); `stopping` the process's stop
    flag: a sync in progress is abandoned when it turns true, and no further attempt is made."""

    def __init__(
        self,
        store: dist.Store,
        prefix: str,
        backend: str,
        broadcaster: WeightBroadcaster,
        announce: Callable[[int, int, list[str], str], None],
        liveness_s: float,
        join_timeout_s: float,
        secret: str | bytes,
        bind: str | None = None,
        attempts: int = 3,
        log=None,
        version: int = 0,
        stopping: Callable[[], bool] = lambda: False,
    ):
        self.store, self.prefix, self.backend, self.bind = store, prefix, backend, bind
        self.stopping = stopping
        self.tx, self.announce = broadcaster, announce
        self.signer = Signer(secret).with_session(secrets.token_hex(8))
        self.warn = _Warnings(log or _log.warning)
        self.membership = Membership(store, self.signer, liveness_s, self.warn)
        self.join_timeout_s, self.attempts, self.log = join_timeout_s, attempts, log
        self.epoch, self.members = 0, []
        self.sent = -1  # the newest version the current epoch's members received
        self.failed_versions = 0
        # Alive by heartbeat but absent from a failed epoch (hung, or busy past the timeout): left out until it
        # shows it read a later announcement, so one stuck actor does not cost every version a timeout.
        self.suspects: dict[str, int] = {}  # name -> the epoch it missed
        self.version = version
        self.publish_version(version)

    def _seen(self, name: str) -> int:
        index = self.membership.index(name)
        seen = None if index is None else _signed_int(self.store, self.signer, f"{SEEN_PREFIX}{index}")
        return -1 if seen is None else seen

    def _candidates(self) -> list[str]:
        out = []
        for name in self.membership.alive():
            if name in self.suspects and self._seen(name) <= self.suspects[name]:
                continue
            self.suspects.pop(name, None)
            out.append(name)
        return out

    def newcomers(self) -> list[str]:
        """Actors that would be sent weights now but are not in the current epoch (joined, or suspects that
        came back); a suspect that still does not read announcements is not one."""
        return [name for name in self._candidates() if name not in self.members]

    def _suspect_absent(self, members: list[str]) -> None:
        for name in members:
            if self._seen(name) < self.epoch:
                self.suspects[name] = self.epoch

    def publish_version(self, version: int) -> None:
        """Joining actors wait for (and bootstrap from snapshots up to) the version named here. The session and
        the manifest are written again too: anyone can overwrite a store key, and this repairs it."""
        self.version = version
        publish_session(self.store, self.signer)
        self.tx.publish_manifest(self.store, self.signer)
        put(self.store, self.signer, VERSION_KEY, str(version))

    def repair(self) -> None:
        """Write the session, manifest and version again when someone without the secret overwrote them: an
        actor waits past a value that is not signed, for this. Call it while idle (the learner does about once
        a second, `WeightPublisher.catch_up`); every sync writes them anyway."""
        intact = (
            fetch(self.store, self.signer.with_session(""), SESSION_KEY) == self.signer.session
            and fetch(self.store, self.signer, MANIFEST_KEY) is not None
            and fetch(self.store, self.signer, VERSION_KEY) is not None
        )
        if not intact:
            self.warn("repair", "rewrote weight-sync keys overwritten by someone without the run's secret")
            self.publish_version(self.version)

    def _announce(self, version: int, members: list[str]) -> None:
        self.announce(version, self.epoch, members, self.signer.tag("announce", version, self.epoch, members))

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping() and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def _attempt(self, version: int, members: list[str]) -> SyncStats:
        """Form the group (if new; a stop abandons the wait for its members) and broadcast."""
        if self.tx.group is None:
            self.tx.group = make_group(
                self.store,
                f"{self.prefix}/{self.signer.session}/{self.epoch}",
                0,
                1 + len(members),
                self.backend,
                self.join_timeout_s,
                self.signer,
                self.bind,
                self.stopping,
            )
        return self.tx.broadcast(version)

    def sync(self, version: int) -> SyncStats | None:
        """None when no actor is alive (nothing to send; a joining actor gets the next version), when the current
        epoch's members already hold `version`, or when every attempt failed (`failed_versions` counts those)."""
        self.publish_version(version)
        for attempt in range(self.attempts):
            members = self._candidates()
            if not members:
                if self.suspects:  # an empty epoch, announced so that a suspect can show it reads them again
                    self.epoch, self.members, self.tx.group, self.sent = self.epoch + 1, [], None, -1
                    self._announce(version, [])
                return None
            if members != self.members:
                self.epoch += 1
                self.members, self.tx.group, self.sent = members, None, -1
            elif version <= self.sent:
                return None  # each member would skip it: a fresh epoch or nothing, never a wait for no one
            self._announce(version, members)
            try:
                stats = self._attempt(version, members)
                self.sent = version
                return stats
            except Exception as exc:  # a member died between the heartbeat and the collective
                if self.log:
                    self.log(
                        f"weight sync v{version} to {members} failed ({exc}); retrying without dead actors"
                    )
                self._suspect_absent(members)
                self.members, self.tx.group, self.sent = [], None, -1
                if self.stopping():
                    return None  # shutting down: the next attempt would only delay the exit
                if attempt + 1 < self.attempts:
                    self._pause(self.membership.liveness_s)
        if self.stopping():
            return None
        self.failed_versions += 1
        put(self.store, self.signer, GIVEN_UP_KEY, str(version))
        if self.log:
            self.log(f"weight sync of version {version} failed {self.attempts} times; giving it up")
        return None


class ElasticReceiver:
    """Actor side: register, heartbeat, and take part in the epochs that name this actor.

    `secret` is the run's weight-sync secret; announcements and store values not signed with it are ignored and
    logged (through `log`), never acted on."""

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
        secret: str | bytes,
        snapshots: SnapshotStore | None = None,
        on_weights: Callable[[int, str], None] | None = None,
        fallback_after: int = 2,
        log: Callable[[str], None] | None = None,
    ):
        self.name, self.prefix, self.backend = name, prefix, backend
        self.rx, self.join_timeout_s = receiver, join_timeout_s
        self.snapshots, self.on_weights, self.fallback_after = snapshots, on_weights, fallback_after
        self.warn = _Warnings(log or _log.warning)
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.store = _client(host, port, timeout_s)
        self.store_lost_at: float | None = None  # when a read of the learner's numbers last failed
        self.signer = read_session(self.store, secret, timeout_s, self.warn)
        self.rx.check_manifest(self.store, self.signer, timeout_s)
        self.bind = local_address(
            host, port
        )  # our gloo pairs listen on the interface that reaches the learner
        self.epoch: int | None = None
        # An epoch this actor failed in is never re-entered: its rendezvous keys are spent, and the learner has
        # already moved on (re-joining it would block in gloo's connect on the stale peers until timeout).
        self.failed_epoch: int | None = None
        self.seen_epoch = 0
        self.version, self.source, self.failures = 0, "initial", 0
        self._learner_version, self._given_up = 0, -1
        self.take_snapshot()  # before registering: the learner may name us in a sync right after
        self.index = register(self.store, self.signer, name)
        self.heartbeat = Heartbeat(host, port, self.index, self.signer, heartbeat_s, timeout_s, log)

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

    def apply(
        self, version: int, epoch: int, members: list[str], auth: str | None = None
    ) -> SyncStats | None:
        """Receive `version` if this actor is a member of `epoch`; None when not (or when the epoch failed). An
        announcement whose `auth` is not the learner's signature is ignored (and logged)."""
        if not self.signer.verify(auth, "announce", version, epoch, members):
            self.warn("announce", "ignored a weights announcement not signed with the run's secret")
            return None
        if epoch > self.seen_epoch:  # tells the learner this actor is responsive (see `suspects`)
            self.seen_epoch = epoch
            mark_seen(self.store, self.signer, self.index, epoch)
        if self.name not in members or version <= self.version and epoch == self.epoch:
            return None
        if epoch == self.failed_epoch:
            return None
        try:
            if epoch != self.epoch:
                self.rx.group = make_group(
                    self.store,
                    f"{self.prefix}/{self.signer.session}/{epoch}",
                    1 + members.index(self.name),
                    1 + len(members),
                    self.backend,
                    self.join_timeout_s,
                    self.signer,
                    self.bind,
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

    def _learner_int(self, key: str, last: int) -> int:
        """A signed number the learner writes; the last good one while the key holds something unsigned, or
        while the learner (the store's host) is gone: the actor then goes on until the learner's silence stops it
        (supervision.learner_silence_s) or the launcher restarts it with a new learner, rather than dying here of
        a connection error that names neither. A lost store is probed by a plain connect at most every
        STORE_RETRY_S and reconnected once something listens again."""
        if self.store_lost_at is not None and not self._store_back():
            return last
        try:
            value = _signed_int(self.store, self.signer, key)
            if value is None and self.store.check([key]):
                self.warn(key, f"ignored {key} not signed with the run's secret")
        except (dist.DistError, OSError) as exc:
            self.store_lost_at = time.monotonic()
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            self.warn(
                "store",
                f"weight-sync store unreachable ({first}); keeping {key}={last} "
                "(the learner is judged gone after supervision.learner_silence_s)",
            )
            return last
        return last if value is None else value

    def _store_back(self) -> bool:
        """After a failed read: a new connection to the store once it listens again, probed quietly."""
        if time.monotonic() - self.store_lost_at < STORE_RETRY_S:
            return False
        self.store_lost_at = time.monotonic()
        if not _reachable(self.host, self.port, 1.0):
            return False
        try:
            self.store = _client(self.host, self.port, min(self.timeout_s, 5.0))
        except (dist.DistError, OSError):
            return False
        self.store_lost_at = None
        return True

    def learner_version(self) -> int:
        self._learner_version = self._learner_int(VERSION_KEY, self._learner_version)
        return self._learner_version

    def given_up_version(self) -> int:
        """The newest version the learner stopped trying to send: one that will never arrive here."""
        self._given_up = self._learner_int(GIVEN_UP_KEY, self._given_up)
        return self._given_up

    def close(self) -> None:
        self.heartbeat.stop()
