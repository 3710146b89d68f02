"""Elastic weight sync across real processes over gloo, without models or a broker: the learner side runs in the
test, each actor is a spawned process following announcements through the store. One actor is SIGKILLed and one
joins mid-run (from a snapshot); every sync stays bounded in time, and every version each actor took hashes the
same as the learner's."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, wait_for
from weight_sync import WeightBroadcaster, WeightReceiver, make_store
from weight_sync.elastic import ElasticBroadcaster, ElasticReceiver, Heartbeat, mark_seen, register
from weight_sync.snapshot import SnapshotStore
from weight_sync.verify import DigestLog, read_digests

pytestmark = pytest.mark.chaos

LIVENESS_S, JOIN_TIMEOUT_S = 1.0, 4.0
SECRET = "a test secret of the run, 32 chars"
ANNOUNCE, STOP = "test/announce", "test/stop"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))


def _actor(port: int, name: str, run_dir: str, seed: int) -> None:
    """What actors/actor.py does around its follower, with the store standing in for the control stream."""
    torch.set_num_threads(1)
    model = _model(seed)  # a different init: only the sync can make it equal to the learner's
    named = list(model.named_parameters())
    digests = DigestLog(Path(run_dir) / "digests", name)
    follower = ElasticReceiver(
        "127.0.0.1",
        port,
        name,
        "t/weights",
        "gloo",
        WeightReceiver(None, named, 0.05),  # several buckets per version
        timeout_s=30,
        join_timeout_s=JOIN_TIMEOUT_S,
        heartbeat_s=LIVENESS_S / 5,
        secret=SECRET,
        snapshots=SnapshotStore(Path(run_dir) / "weights"),
        on_weights=lambda v, source: digests.record(v, named, source),
    )
    store = follower.store
    while not store.check([STOP]):
        if store.check([ANNOUNCE]):
            version, epoch, members, auth = json.loads(store.get(ANNOUNCE))
            follower.apply(version, epoch, members, auth)
        time.sleep(0.02)
    follower.close()


class _Learner:
    def __init__(self, port: int, run_dir: Path):
        self.store = make_store("127.0.0.1", port, 0, None, 30)
        self.model = _model(0)
        named = list(self.model.named_parameters())
        tx = WeightBroadcaster(None, named, 0.05)
        self.sync = ElasticBroadcaster(
            self.store,
            "t/weights",
            "gloo",
            tx,
            announce=lambda v, e, m, auth: self.store.set(ANNOUNCE, json.dumps([v, e, m, auth])),
            liveness_s=LIVENESS_S,
            join_timeout_s=JOIN_TIMEOUT_S,
            secret=SECRET,
            bind="127.0.0.1",
            log=lambda msg: print(f"{time.monotonic():.2f} {msg}", flush=True),
        )
        self.snapshots = SnapshotStore(run_dir / "weights")
        self.digests = DigestLog(run_dir / "digests", "learner")
        self.version, self.seconds, self.members = 0, [], {}

    def step(self) -> None:
        """A training step, then the sync of its version (as learner.py: digest, snapshot every 2)."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        self.version += 1
        t0 = time.monotonic()
        self.sync.sync(self.version)
        self.seconds.append(time.monotonic() - t0)
        self.members[self.version] = list(self.sync.members)
        named = self.sync.tx.named
        self.digests.record(self.version, named, "learner")
        if self.version % 2 == 0:
            self.snapshots.write(self.version, named)


def _spawn(port: int, name: str, run_dir: Path, seed: int):
    proc = mp.get_context("spawn").Process(target=_actor, args=(port, name, str(run_dir), seed))
    proc.start()
    return proc


def test_kill_one_of_three_add_one_all_bit_identical(tmp_path):
    port = free_port()
    learner = _Learner(port, tmp_path)
    procs = {f"actor-{i}": _spawn(port, f"actor-{i}", tmp_path, 10 + i) for i in range(3)}
    try:
        wait_for(lambda: len(learner.sync.membership.alive()) == 3, 120, "three actors registered")
        for _ in range(3):
            learner.step()
        os.kill(procs["actor-1"].pid, signal.SIGKILL)
        for _ in range(3):
            learner.step()  # the first of these fails on the dead member, is retried without it
        procs["actor-3"] = _spawn(port, "actor-3", tmp_path, 13)
        wait_for(lambda: "actor-3" in learner.sync.membership.alive(), 120, "actor-3 registered")
        for _ in range(4):
            learner.step()
        learner.store.set(STOP, "1")
        for name, p in procs.items():
            p.join(30)
            assert p.exitcode == (-signal.SIGKILL if name == "actor-1" else 0), (name, p.exitcode)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
    assert learner.sync.failed_versions == 0
    # bounded: a sync with a dead member costs one rendezvous timeout and a liveness wait, never a hang
    assert max(learner.seconds) < JOIN_TIMEOUT_S + LIVENESS_S + 5, learner.seconds
    assert learner.members[3] == ["actor-0", "actor-1", "actor-2"]
    assert learner.members[4] == ["actor-0", "actor-2"]
    assert learner.members[10] == ["actor-0", "actor-2", "actor-3"]
    truth = {r["version"]: r["sha256"] for r in read_digests(tmp_path / "digests" / "learner.jsonl")}
    got = {n: read_digests(tmp_path / "digests" / f"{n}.jsonl") for n in ("actor-0", "actor-2", "actor-3")}
    for name, records in got.items():
        for r in records:
            assert r["sha256"] == truth[r["version"]], (name, r)  # bit-identical at every version taken
    for name in ("actor-0", "actor-2"):  # kept receiving every version (the failed attempt at v4 is re-sent)
        assert [r["version"] for r in got[name] if r["source"] == "broadcast"] == list(range(1, 11)), name
    joined = got["actor-3"]
    assert joined[0]["source"] == "snapshot" and joined[0]["version"] == 6  # newest snapshot at its join
    # and it reached the learner's version
    assert joined[-1]["version"] == 10 and joined[-1]["source"] == "broadcast"


def test_a_member_that_never_joins_is_left_out_after_one_timeout(tmp_path):
    """Alive by heartbeat but never entering the collective (a hung process): the first sync naming it costs one
    rendezvous timeout, then it is left out (later syncs cost nothing) until it reads an announcement again."""
    port = free_port()
    learner = _Learner(port, tmp_path)
    client = make_store("127.0.0.1", port, 1, None, 30)
    signer = learner.sync.signer  # what a real actor reads from the store's signed session
    index = register(client, signer, "actor-9")
    beat = Heartbeat("127.0.0.1", port, index, signer, LIVENESS_S / 5, 30)
    try:
        wait_for(lambda: learner.sync.membership.alive() == ["actor-9"], 30, "the hung actor registered")
        t0 = time.monotonic()
        learner.step()
        first = time.monotonic() - t0
        assert JOIN_TIMEOUT_S <= first < JOIN_TIMEOUT_S + LIVENESS_S + 5, first
        assert learner.members[1] == [] and "actor-9" in learner.sync.suspects
        t0 = time.monotonic()
        learner.step()
        assert time.monotonic() - t0 < 1.0 and learner.members[2] == []  # no second timeout
        announced = json.loads(learner.store.get(ANNOUNCE))
        assert announced[1:3] == [learner.sync.epoch, []]  # empty epochs keep being announced to the suspect
        mark_seen(client, signer, index, announced[1])  # what ElasticReceiver.apply writes on reading it
        assert learner.sync._candidates() == ["actor-9"] and learner.sync.suspects == {}
        assert learner.sync.failed_versions == 0
    finally:
        beat.stop()


def test_a_version_given_up_is_visible_to_actors(tmp_path):
    """An actor alive by heartbeat that never joins the collective (hung) makes every attempt fail; the learner
    gives the version up, counts it, and says so in the store, where a lockstep (pipeline.mode: sync) actor
    waiting for that version reads that it will never come."""
    port = free_port()
    store = make_store("127.0.0.1", port, 0, None, 30)
    model = _model(0)
    tx = WeightBroadcaster(None, list(model.named_parameters()), 0.05)
    sync = ElasticBroadcaster(
        store,
        "t/weights",
        "gloo",
        tx,
        announce=lambda v, e, m, auth: None,
        secret=SECRET,
        liveness_s=2.0,
        join_timeout_s=1.0,
        attempts=1,
    )
    hung = ElasticReceiver(
        "127.0.0.1",
        port,
        "actor-0",
        "t/weights",
        "gloo",
        WeightReceiver(None, list(_model(1).named_parameters()), 0.05),
        timeout_s=30,
        join_timeout_s=1.0,
        heartbeat_s=0.1,
        secret=SECRET,
    )
    try:
        wait_for(lambda: sync.membership.alive() == ["actor-0"], 30, "the actor's heartbeat")
        assert hung.given_up_version() == -1
        assert sync.sync(1) is None
        assert sync.failed_versions == 1
        assert hung.given_up_version() == 1 and hung.version < 1
    finally:
        hung.close()


def _host_store(port: int, version: int, ready) -> None:
    """The learner's side of the store, in a process of its own so that the test can kill it as a crash would."""
    torch.set_num_threads(1)
    store = make_store("127.0.0.1", port, 0, None, 30)
    tx = WeightBroadcaster(None, list(_model(0).named_parameters()), 0.05)
    ElasticBroadcaster(
        store, "t/weights", "gloo", tx, announce=lambda *a: None, liveness_s=2.0, join_timeout_s=1.0,
        secret=SECRET, version=version,
    )  # fmt: skip
    ready.set()
    time.sleep(600)


def test_a_follower_outlives_the_learners_store(tmp_path, capfd):
    """The learner (the store's host) dies: the actor's reads of the learner's version keep the last one they
    had, with one warning naming the learner-silence rule, instead of raising a connection error that kills the
    actor before its learner watch can stop it with that rule's message (a CI failure of issue 17's stop). The
    lost store is not called again until something listens there (each failed call prints a C++ stack trace:
    an actor polling it would fill its log), and a store that listens again is read again."""
    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    host = ctx.Process(target=_host_store, args=(port, 3, ready))
    host.start()
    lines: list[str] = []
    follower = None
    try:
        assert ready.wait(60), "the store's host did not start"
        follower = ElasticReceiver(
            "127.0.0.1", port, "actor-0", "t/weights", "gloo",
            WeightReceiver(None, list(_model(1).named_parameters()), 0.05),
            timeout_s=5, join_timeout_s=1.0, heartbeat_s=0.1, secret=SECRET, log=lines.append,
        )  # fmt: skip
        assert follower.learner_version() == 3
        follower.heartbeat.stop()  # its thread's own (single) failure would count below
        time.sleep(0.3)
        capfd.readouterr()
        os.kill(host.pid, signal.SIGKILL)
        host.join(10)
        deadline = time.monotonic() + 2.5  # past STORE_RETRY_S twice: the quiet probes run too
        while time.monotonic() < deadline:
            assert follower.learner_version() == 3 and follower.given_up_version() == -1
            time.sleep(0.02)
        warned = [x for x in lines if "weight-sync store unreachable" in x and "keeping weights/version" in x]
        assert len(warned) == 1 and "supervision.learner_silence_s" in warned[0], lines
        noise = capfd.readouterr().err
        assert noise.count("TCPStore.cpp") <= 2, noise[-3000:]  # the one failed read, not one per call

        # a store listens there again (a new learner: a new session): the follower connects and reads it again,
        # but a new session's numbers are not signed for this follower's session, so it keeps its own
        again = ctx.Event()
        host = ctx.Process(target=_host_store, args=(port, 5, again))
        host.start()
        assert again.wait(60), "the second store's host did not start"
        wait_for(
            lambda: follower.learner_version() == 3 and follower.store_lost_at is None, 10, "a reconnection"
        )
        wait_for(lambda: any("not signed" in x for x in lines), 10, "the new session's numbers refused")
    finally:
        if follower is not None:
            follower.close()
        if host.is_alive():
            host.kill()
