"""Supervision with real processes: the supervisor restarts what it spawned (`supervision.restart: on-failure`,
at most max_restarts times, with a doubling backoff), counts as live the components heard on the metrics stream
(started by hand), and ends the run only once a role has had no live member for role_grace_s; the Reporter's
heartbeat is what makes a component started by hand heard."""

from __future__ import annotations

import socket
import time

from opd.config import SupervisionConfig, load_config
from opd.launch.monitor import RunState
from opd.launch.supervisor import Supervisor
from tests.conftest import wait_for
from tests.integration.test_launch_parts import SLEEP, ScriptSpawner

FAIL = "raise SystemExit(1)"
# fails the first time it runs (marker file {marker}), then runs until killed
FAIL_ONCE = (
    "import os, sys, time\n"
    "if not os.path.exists({marker!r}):\n"
    "    open({marker!r}, 'w').close(); sys.exit(3)\n"
    "time.sleep(60)\n"
)


def _supervisor(tmp_path, scripts, survivable=("actor",), **policy) -> Supervisor:
    (tmp_path / "logs").mkdir(exist_ok=True)
    logged: list[str] = []
    sup = Supervisor(
        tmp_path / "config.yaml",
        tmp_path,
        ScriptSpawner(scripts),
        5.0,
        {role: "it rejoins" for role in survivable},
        logged.append,
        SupervisionConfig(**policy),
    )
    sup.logged = logged
    return sup


def _until_failure(sup: Supervisor, timeout: float, reported=None, over=False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = sup.failure(lambda: over, reported or (lambda role: []))
        if failed is not None:
            return failed
        time.sleep(0.05)
    return None


def _kill_all(sup: Supervisor) -> None:
    for c in sup.components:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def test_on_failure_restarts_up_to_the_limit_with_backoff_then_the_role_is_gone(tmp_path):
    sup = _supervisor(
        tmp_path,
        {"actor-0": FAIL},
        restart="on-failure",
        max_restarts=2,
        restart_backoff_s=0.3,
        role_grace_s=0,
    )
    sup.spawn("actor", 0)
    t0 = time.monotonic()
    failed = _until_failure(sup, 30)
    assert failed is not None and failed.name == "actor-0" and len(sup.components) == 3
    assert time.monotonic() - t0 >= 0.3 + 0.6  # backoff 0.3 s, then doubled
    assert sup.summary() == {"restarts": {"actor-0": 2}, "lost": ["actor-0"]}
    assert any("restarting it in 0.3s (restart 1 of supervision.max_restarts=2)" in x for x in sup.logged)
    assert any("restarting it in 0.6s (restart 2 of" in x for x in sup.logged)
    assert any("not restarted: it has had supervision.max_restarts=2 restarts" in x for x in sup.logged)
    assert sup.verdict.startswith("no actor alive for") and "actor-0 exited with code 1" in sup.verdict


def test_a_restarted_worker_carries_the_role_and_the_run_goes_on(tmp_path):
    sup = _supervisor(
        tmp_path,
        {"actor-0": FAIL_ONCE.format(marker=str(tmp_path / "failed.once"))},
        restart="on-failure",
        restart_backoff_s=0,
        role_grace_s=0,
    )
    first = sup.spawn("actor", 0)
    try:
        wait_for(lambda: first.proc.poll() is not None, 30, "the first incarnation to fail")
        assert sup.failure(lambda: False) is None  # restart scheduled (due now): the role is not gone
        assert sup.failure(lambda: False) is None and len(sup.components) == 2
        assert sup.get(first.slot) is sup.components[1] and sup.active("actor") == [sup.components[1]]
        time.sleep(1.0)
        assert sup.failure(lambda: False) is None and sup.summary() == {
            "restarts": {"actor-0": 1},
            "lost": [],
        }
        assert any(x.startswith("restarted actor-0") for x in sup.logged)
    finally:
        _kill_all(sup)


def test_restart_no_waits_role_grace_s_then_names_the_role(tmp_path):
    sup = _supervisor(tmp_path, {"actor-0": FAIL}, role_grace_s=1.0)
    sup.spawn("actor", 0)
    wait_for(lambda: sup.components[0].proc.poll() is not None, 30, "the actor to exit")
    t0 = time.monotonic()
    assert sup.failure(lambda: False) is None  # no live actor, but within the grace
    assert (
        "no actor is alive: the run stops unless one is within supervision.role_grace_s=1s" in sup.logged[0]
    )
    failed = _until_failure(sup, 10)
    assert failed is sup.components[0] and time.monotonic() - t0 >= 0.9
    assert sup.verdict == "no actor alive for 1s (supervision.role_grace_s=1): actor-0 exited with code 1"
    assert len(sup.components) == 1  # restart: no


def test_the_role_is_not_gone_once_the_run_is_over(tmp_path):
    sup = _supervisor(tmp_path, {"actor-0": FAIL}, role_grace_s=0)
    sup.spawn("actor", 0)
    wait_for(lambda: sup.components[0].proc.poll() is not None, 30, "the actor to exit")
    assert _until_failure(sup, 1.0, over=True) is None


def test_a_member_heard_on_the_metrics_stream_keeps_the_role_alive(tmp_path):
    """The issue's sequence: scorer-0 killed, one started by hand under the same index, scorer-1 killed. The hand
    one is known only from its records; the spawned scorer-0's own last heartbeat is not taken for it."""
    sup = _supervisor(tmp_path, {"scorer-0": FAIL, "scorer-1": SLEEP}, survivable=("scorer",), role_grace_s=0)
    dead, other = sup.spawn("scorer", 0), sup.spawn("scorer", 1)
    try:
        wait_for(lambda: dead.proc.poll() is not None, 30, "scorer-0 to exit")
        state, now = RunState(), time.monotonic()
        me = socket.gethostname()
        state.ingest({"component": "scorer-0", "incarnation": "dead", "pid": dead.proc.pid, "host": me}, now)
        reported = lambda role: state.live(role, time.monotonic(), 30.0)  # noqa: E731
        assert sup.failure(lambda: False, reported) is None
        assert sup.logged == ["[yellow]scorer-0 exited with code 1[/]; continuing on scorer-1; it rejoins"]
        state.ingest({"component": "scorer-0", "incarnation": "hand", "pid": 1, "host": "elsewhere"}, now)
        other.proc.kill()
        other.proc.wait()
        assert sup.failure(lambda: False, reported) is None  # the hand-started scorer-0 carries on
        assert sup.logged[-1] == "[yellow]scorer-1 exited with code -9[/]; continuing on scorer-0; it rejoins"
        state.ingest({"component": "scorer-0", "incarnation": "hand", "final": True}, time.monotonic())
        failed = sup.failure(
            lambda: False, reported
        )  # it stopped: none left (the dead one's record is no proof)
        assert failed is dead and "scorer-0 exited with code 1, scorer-1 exited with code -9" in sup.verdict
    finally:
        _kill_all(sup)


def test_no_restart_over_a_replacement_started_by_hand(tmp_path):
    sup = _supervisor(tmp_path, {"actor-0": FAIL}, restart="on-failure", restart_backoff_s=0, role_grace_s=0)
    sup.spawn("actor", 0)
    wait_for(lambda: sup.components[0].proc.poll() is not None, 30, "the actor to exit")
    state = RunState()
    state.ingest({"component": "actor-0", "incarnation": "hand", "pid": 4242, "host": "h2"}, time.monotonic())
    assert sup.failure(lambda: False, lambda role: state.live(role, time.monotonic(), 30.0)) is None
    assert len(sup.components) == 1 and sup.summary()["restarts"] == {}
    assert "not restarted: another actor-0 (pid 4242 on h2) is running" in sup.logged[0]


def test_a_reporter_heartbeats_its_counters_until_its_final_record(zmq_broker, tmp_path):
    from broker.zmq import ZmqBroker
    from opd.protocol import Streams, unpack_control
    from opd.runtime.lifecycle import Reporter

    port = int(zmq_broker.rsplit(":", 1)[1])
    cfg = load_config(None, ["run.run_id=hb", f"broker.port={port}", f"run.output_dir={tmp_path}"])
    client = ZmqBroker(zmq_broker, 5.0)
    reporter = Reporter(client, cfg, "scorer-3", 60.0)  # its own loop would send nothing for a minute
    reporter.add(trajectories_scored=5, tokens_scored=50)
    reporter.maybe_send(weight_version=7)
    reporter.start_heartbeat(cfg.broker, 0.1)
    reporter.add(trajectories_scored=1)
    state, records = RunState(), []

    def heard(n: int) -> bool:
        for m in client.consume(Streams("hb").metrics, "t", "t", 100, 0.0):
            records.append(unpack_control(m.data))
            state.ingest(records[-1], time.monotonic())
        return len(records) >= n

    try:
        wait_for(lambda: heard(4), 20, "heartbeats")
    finally:
        reporter.maybe_send(force=True, final=True)
        reporter.stop_heartbeat()
    [inc] = state.incarnations.values()
    assert inc.record["pid"] > 0 and inc.record["heartbeat"] is True and inc.record["weight_version"] == 7
    assert inc.record["trajectories_scored"] == 6 and "tokens_scored" in inc.counters
    heard(0)
    assert inc.final and state.live("scorer", time.monotonic(), 10.0) == []
    time.sleep(0.3)
    assert client.consume(Streams("hb").metrics, "t", "t", 100, 0.0) == []  # nothing after stop_heartbeat
    client.close()
