"""The weight-sync channel under a stranger, and the suspect-actor catch-up, across real processes over gloo.

The learner side runs in the test; each actor is a spawned process following announcements through the store
(the control stream's stand-in, as in test_elastic_sync.py). The stranger is a spawned process that knows the
store's host and port and the run's key layout but not the secret; it uses raw store operations only, as anyone
who found the port would."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from tests.conftest import free_port, wait_for
from weight_sync import WeightBroadcaster, WeightReceiver, make_store
from weight_sync.elastic import ElasticBroadcaster, ElasticReceiver
from weight_sync.verify import DigestLog, read_digests, weights_digest

LIVENESS_S, JOIN_TIMEOUT_S = 1.0, 4.0
SECRET = "the run's weight-sync secret, 32+ chars"
PREFIX = "t/weights"
ANNOUNCE, STOP, PAUSE = "test/announce", "test/stop", "test/pause/"
GO, RESTART = "test/stranger", "test/restart"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def _actor(host: str, port: int, name: str, run_dir: str, seed: int, start_after: str | None = None) -> None:
    """A real follower; it stops reading announcements while PAUSE/<name> exists (busy generating), while its
    heartbeat thread goes on. With `start_after`, it starts once that store key exists (process start-up is
    slow: the test spawns early and starts it at the moment it needs). Its warnings go to <run_dir>/<name>.log."""
    import logging
    from datetime import timedelta

    torch.set_num_threads(1)
    logging.basicConfig(filename=f"{run_dir}/{name}.log", level=logging.WARNING)
    if start_after is not None:
        dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=120)).wait([start_after])
    named = list(_model(seed).named_parameters())
    digests = DigestLog(Path(run_dir) / "digests", name)
    follower = ElasticReceiver(
        host,
        port,
        name,
        PREFIX,
        "gloo",
        WeightReceiver(None, named, 0.01),
        timeout_s=60,
        join_timeout_s=JOIN_TIMEOUT_S,
        heartbeat_s=LIVENESS_S / 5,
        secret=SECRET,
        on_weights=lambda v, source: digests.record(v, named, source),
    )
    store = follower.store
    while not store.check([STOP]):
        if store.check([ANNOUNCE]) and not store.check([PAUSE + name]):
            version, epoch, members, *auth = json.loads(store.get(ANNOUNCE))
            follower.apply(version, epoch, members, *auth)
        time.sleep(0.02)
    follower.close()


def _spawn(target, *args):
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    return proc


class _Learner:
    def __init__(self, host: str, port: int, run_dir: Path):
        self.store = make_store(host, port, 0, None, 30)
        self.model = _model(0)
        self.announced: list[tuple[int, int]] = []
        self.logged: list[str] = []
        self.sync = ElasticBroadcaster(
            self.store,
            PREFIX,
            "gloo",
            WeightBroadcaster(None, list(self.model.named_parameters()), 0.01),
            announce=self._announce,
            liveness_s=LIVENESS_S,
            join_timeout_s=JOIN_TIMEOUT_S,
            secret=SECRET,
            bind=host,
            log=self.logged.append,
        )
        self.digests = DigestLog(run_dir / "digests", "learner")
        self.version = 0

    def _announce(self, version: int, epoch: int, members: list[str], *auth: str) -> None:
        self.announced.append((version, epoch))
        self.store.set(ANNOUNCE, json.dumps([version, epoch, members, *auth]))

    def idle(self) -> bool:
        """What the learner does about once a second while it waits for a batch (WeightPublisher.catch_up)."""
        self.sync.repair()
        return False

    def timed_sync(self, version: int) -> float:
        t0 = time.monotonic()
        self.sync.sync(version)
        return time.monotonic() - t0

    def step(self) -> float:
        """A training step, then the sync of its version; the seconds the sync took."""
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        self.version += 1
        self.digests.record(self.version, list(self.model.named_parameters()), "learner")
        return self.timed_sync(self.version)


def _stop(learner: _Learner, procs: dict) -> dict[str, int | None]:
    learner.store.set(STOP, "1")
    codes = {}
    for name, p in procs.items():
        p.join(30)
        codes[name] = p.exitcode
        if p.is_alive():
            p.kill()
    return codes


# ------------------------------------------------------------------------------------------- the stranger
def _stranger(host: str, port: int, run_dir: str, report) -> None:
    """Knows host, port and the run's key names, not the secret. Registers two fake actors (one joins any
    group it is named in, to take the weights, and marks every announcement read; one never does, to stall the
    learner), heartbeats them, and writes a bogus manifest and a forged announcement. Reports whether it ever
    received weights."""
    from datetime import timedelta

    torch.set_num_threads(1)
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=120))
    store.wait([GO])  # the test says when (once a real actor is in)
    names = {}
    for name in ("actor-x", "actor-y"):
        index = int(store.add("actors/count", 1))
        store.set(f"actors/{index}", name)  # unsigned
        names[name] = index
    forged = int(store.add("actors/count", 1))  # signed with a wrong secret: a signature, but not the run's
    store.set(f"actors/{forged}", b"actor-z" + bytes(32))
    store.set("weight_manifest", json.dumps([["bogus", [1], "torch.float32"]]))
    store.set(ANNOUNCE, json.dumps([99, 99, ["actor-0", "actor-1"], "0" * 64]))
    report.put("ready")
    model = _model(7)
    named = list(model.named_parameters())
    got, beat = None, 0
    while not store.check([STOP]):
        beat += 1
        for name, index in names.items():
            store.add(f"beat/{name}", 1)  # the key layout before signing
            store.set(f"beat/{index}", str(beat))
        version, epoch, members = json.loads(store.get(ANNOUNCE))[:3]
        store.set("seen/actor-x", str(epoch))  # "I read it": so that it is no suspect (the old key layout)
        store.set(f"seen/{names['actor-x']}", str(epoch))
        if "actor-x" in members and got is None:
            try:
                scoped = dist.PrefixStore(f"{PREFIX}/{epoch}", store)
                group = dist.ProcessGroupGloo(
                    scoped, 1 + members.index("actor-x"), 1 + len(members), timedelta(seconds=3)
                )
                WeightReceiver(group, named, 0.01).receive(version)
                got = (version, weights_digest(named))
            except Exception:
                pass
        time.sleep(0.1)
    report.put(("got", got))


def test_a_stranger_without_the_secret_gets_no_weights_no_membership_and_stalls_nothing(tmp_path):
    port = free_port()
    learner = _Learner("127.0.0.1", port, tmp_path)
    report = mp.get_context("spawn").Queue()
    procs = {"actor-0": _spawn(_actor, "127.0.0.1", port, "actor-0", str(tmp_path), 10)}
    procs["stranger"] = _spawn(_stranger, "127.0.0.1", port, str(tmp_path), report)
    # a "restarted" actor, which starts once the stranger's bogus manifest is in the store
    procs["actor-1"] = _spawn(_actor, "127.0.0.1", port, "actor-1", str(tmp_path), 11, RESTART)
    actor1_log = tmp_path / "actor-1.log"
    try:
        wait_for(lambda: learner.idle() or learner.sync.membership.alive() == ["actor-0"], 120, "actor-0")
        learner.store.set(GO, "1")
        assert report.get(timeout=120) == "ready"
        learner.store.set(RESTART, "1")
        # it read the bogus manifest, ignored it, and waits (nothing repairs the store until the learner's next
        # idle look or sync), meanwhile the stranger's fake actors heartbeat
        ignored = lambda: actor1_log.exists() and "ignored a weight manifest" in actor1_log.read_text()  # noqa: E731
        wait_for(
            lambda: ignored() or not procs["actor-1"].is_alive(), 120, "actor-1 reading the bogus manifest"
        )
        assert procs["actor-1"].is_alive(), "a bogus manifest made the actor exit"
        seconds = [learner.step() for _ in range(2)]
        wait_for(
            lambda: learner.idle() or "actor-1" in learner.sync.membership.alive(), 120, "the restarted actor"
        )
        seconds += [learner.step() for _ in range(2)]
        members = list(learner.sync.members)
        stranger_alive = procs["stranger"].is_alive()
    finally:
        codes = _stop(learner, procs)
    got = report.get(timeout=30)
    assert stranger_alive
    assert got == ("got", None)  # it never received the weights
    assert members == ["actor-0", "actor-1"]  # never a fake name
    assert max(seconds) < JOIN_TIMEOUT_S / 2, seconds  # no sync waited for a fake member
    assert learner.sync.failed_versions == 0
    assert codes["actor-0"] == 0 and codes["actor-1"] == 0, codes
    assert any("refused weight-sync registration" in line for line in learner.logged), learner.logged
    truth = {r["version"]: r["sha256"] for r in read_digests(tmp_path / "digests" / "learner.jsonl")}
    for name in ("actor-0", "actor-1"):
        taken = read_digests(tmp_path / "digests" / f"{name}.jsonl")
        assert taken[-1]["version"] == 4 and taken[-1]["sha256"] == truth[4], name  # synced; never exited


# ----------------------------------------------------------------------------------------------- binding
def _other_local_address(but: str) -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.address != but and not a.address.startswith("127."):
                return a.address
    return None


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
        except OSError:
            return True
    return False


def test_the_store_listens_on_weight_sync_host_only():
    """Bound to 127.0.0.1, the store is not reachable on 127.0.0.2 (also this machine on Linux) nor on another
    address of this machine; the TCPStore used to listen on every interface."""
    port = free_port()
    store = make_store("127.0.0.1", port, 0, None, 10)
    assert store.port == port and not _refused("127.0.0.1", port)
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not an address of this machine")
    finally:
        probe.close()
    assert _refused("127.0.0.2", port)
    other = _other_local_address("127.0.0.1")
    if other is not None:
        assert _refused(other, port)


def _listening() -> set[tuple[str, int]]:
    conns = psutil.Process().net_connections(kind="tcp")
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def test_gloo_pairs_listen_on_weight_sync_host(tmp_path):
    """With weight_sync.host a non-loopback address of this machine, every socket the learner listens on (the
    store and the group's gloo pairs) is on that address, not on what the hostname resolves to."""
    host = _other_local_address("127.0.0.1")
    if host is None:
        pytest.skip("this machine has no address besides loopback")
    port = free_port()
    before = _listening()  # earlier tests' stores may still be open in this process
    learner = _Learner(host, port, tmp_path)
    procs = {"actor-0": _spawn(_actor, host, port, "actor-0", str(tmp_path), 10)}
    try:
        wait_for(lambda: learner.sync.membership.alive() == ["actor-0"], 120, "the actor")
        learner.step()
        assert learner.sync.members == ["actor-0"]
        opened = _listening() - before
    finally:
        codes = _stop(learner, procs)
    assert codes["actor-0"] == 0
    assert len(opened) >= 2, opened  # the store and the group's pairs
    assert {ip for ip, _ in opened} == {host}, opened
    assert _refused("127.0.0.1", port)


# ------------------------------------------------------------------------------------------ suspect actor
def test_a_suspect_actor_costs_no_resend_to_an_unchanged_epoch(tmp_path):
    """actor-0 keeps heartbeating but stops reading announcements (busy): the sync naming it fails once after
    the join timeout and it is left out as a suspect. Catching up (re-sending the current version, as the
    learner does for actors it does not have in its epoch) must then target a fresh epoch or not happen: never
    the unchanged epoch, whose members skip a version they hold while the learner waits out the timeout."""
    port = free_port()
    learner = _Learner("127.0.0.1", port, tmp_path)
    procs = {
        n: _spawn(_actor, "127.0.0.1", port, n, str(tmp_path), 10 + i)
        for i, n in enumerate(["actor-0", "actor-1"])
    }
    try:
        wait_for(lambda: learner.sync.membership.alive() == ["actor-0", "actor-1"], 120, "two actors")
        learner.store.set(PAUSE + "actor-0", "1")
        first = learner.step()  # epoch 1 fails on actor-0, epoch 2 goes to actor-1 alone
        assert JOIN_TIMEOUT_S <= first < 2 * JOIN_TIMEOUT_S, first
        assert learner.sync.members == ["actor-1"] and "actor-0" in learner.sync.suspects
        assert "actor-0" in learner.sync.membership.alive()  # still heartbeating
        assert learner.sync.newcomers() == []  # a suspect that reads nothing is no one to catch up
        again = learner.timed_sync(1)  # the catch-up's resend of the current version
        assert again < 1.0, again
        learner.store.delete_key(PAUSE + "actor-0")  # it reads announcements again: seen moves past its epoch
        wait_for(lambda: learner.sync.newcomers() == ["actor-0"], 30, "the suspect came back")
        epoch = learner.sync.epoch
        back = learner.timed_sync(1)
        assert back < JOIN_TIMEOUT_S / 3, back
        assert learner.sync.members == ["actor-0", "actor-1"] and learner.sync.epoch == epoch + 1
    finally:
        codes = _stop(learner, procs)
    assert codes == {"actor-0": 0, "actor-1": 0}, codes
    assert len(learner.announced) == len(set(learner.announced)), learner.announced  # never the same twice
    assert learner.sync.failed_versions == 0
    taken = read_digests(tmp_path / "digests" / "actor-0.jsonl")
    truth = read_digests(tmp_path / "digests" / "learner.jsonl")[0]
    assert taken[-1]["version"] == 1 and taken[-1]["sha256"] == truth["sha256"]


# ------------------------------------------------------------------------------------------ pair proofs
def _impostor(port: int, report) -> None:
    """Holds a working gloo connection to the learner (as a stranger that won a pair's handshake would) but not
    the secret."""
    from datetime import timedelta

    from weight_sync.auth import Signer, Unauthenticated, prove_members

    store = make_store("127.0.0.1", port, 1, None, 30)
    group = dist.ProcessGroupGloo(dist.PrefixStore("g", store), 1, 2, timedelta(seconds=20))
    try:
        prove_members(group, 1, 2, Signer("not the run's secret, but long").with_session("s"), "g", "cpu")
        report.put("accepted")
    except Unauthenticated:
        report.put("refused")


def test_a_peer_that_cannot_prove_the_secret_is_refused_before_any_weight_moves():
    """gloo's pairs carry no authentication: after a group forms, each rank proves the secret to each other over
    their own connection, and a rank that cannot is refused on both sides."""
    from datetime import timedelta

    from weight_sync.auth import Signer, Unauthenticated, prove_members

    port = free_port()
    store = make_store("127.0.0.1", port, 0, None, 30)
    report = mp.get_context("spawn").Queue()
    proc = _spawn(_impostor, port, report)
    try:
        group = dist.ProcessGroupGloo(dist.PrefixStore("g", store), 0, 2, timedelta(seconds=60))
        with pytest.raises(Unauthenticated, match=r"rank\(s\) \[1\]"):
            prove_members(group, 0, 2, Signer(SECRET).with_session("s"), "g", "cpu")
        assert report.get(timeout=60) == "refused"
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
