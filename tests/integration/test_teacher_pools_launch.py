"""The launcher's side of several teachers (issue 18), with real child processes and a real broker: `opd run`
starts each teacher's scorer pool under its own names (`scorer-<i>` for the default teacher, `scorer-<t>-<i>`),
the supervisor judges each pool's liveness on its own (a pool with no scorer stalls its teacher's trajectories
however many scorers the other pools have), `opd scale scorers.<teacher>=N` reaches that pool only (and
`scorers=N` is refused when the run has several), and the autoscaler decides per pool from that pool's queue."""

from __future__ import annotations

import importlib.util
import json
import signal
import time

import pytest

from broker import stream_name
from broker.zmq import ZmqBroker
from opd.config import SupervisionConfig, load_config
from opd.launch.cli import main
from opd.launch.monitor import Incarnation
from opd.launch.scaling import ScorerScaler, spawn_scorer_pools, supervisor_pools
from opd.launch.supervisor import Slot, Supervisor, teacher_of, unit_of
from opd.protocol import Streams, unpack_control
from tests.conftest import wait_for
from tests.integration.test_launch_parts import SLEEP, ScriptSpawner

TWO = [
    "teachers={adder: {}, speller: {scorer: {num_scorers: 2}}}",
    "routing.default={adder: 1, speller: 1}",
]
RUN = "pools-test"


def _supervisor(tmp_path, names, scripts=None, survivable=("scorer",), **policy) -> Supervisor:
    (tmp_path / "logs").mkdir(parents=True, exist_ok=True)
    logged: list[str] = []
    sup = Supervisor(
        tmp_path / "config.yaml",
        tmp_path,
        ScriptSpawner({**dict.fromkeys(names, SLEEP), **(scripts or {})}),
        2.0,
        {role: "the broker redelivers" for role in survivable},
        logged.append,
        SupervisionConfig(**{"role_grace_s": 0.0, **policy}),
    )
    sup.logged = logged
    return sup


@pytest.fixture
def cleanup():
    made: list[Supervisor] = []
    yield made.append
    for sup in made:  # only what these supervisors started, by handle
        for c in sup.components:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()


def test_names_units_and_argv_of_a_pools_scorer():
    assert Slot.scorer("default", 2).name == "scorer-2" and Slot.scorer("default", 2).argv() == [
        "--index",
        "2",
    ]
    adder = Slot.scorer("adder", 0)
    assert (adder.name, adder.unit, adder.teacher) == ("scorer-adder-0", "scorer-adder", "adder")
    assert adder.argv() == ["--index", "0", "--teacher", "adder"]
    for name, unit, teacher in (
        ("scorer-3", "scorer", "default"),
        ("scorer-adder-12", "scorer-adder", "adder"),
        ("scorer-all", "scorer-all", "all"),  # opd top's replay row: a name, never spawned
        ("actor-0", "actor", None),
        ("learner", "learner", None),
        ("learner-1", "learner", None),
    ):
        assert (unit_of(name), teacher_of(name)) == (unit, teacher)


def test_opd_run_spawns_each_teachers_pool_under_its_own_names(tmp_path, cleanup):
    cfg = load_config(None, TWO)
    names = ["scorer-adder-0", "scorer-speller-0", "scorer-speller-1"]
    sup = _supervisor(tmp_path, names)
    cleanup(sup)
    spawn_scorer_pools(cfg, sup)
    assert [c.name for c in sup.components] == names
    assert [c.name for c in sup.active("scorer-speller")] == names[1:] and sup.active("scorer") == []
    argvs = [a[a.index("scorer") :] for a in sup.spawner.argvs]
    assert argvs[2] == [
        "scorer",
        "--config",
        str(tmp_path / "config.yaml"),
        "--index",
        "1",
        "--teacher",
        "speller",
    ]
    assert (tmp_path / "logs" / "scorer-speller-1.log").exists()

    one = _supervisor(tmp_path / "one", ["scorer-0", "scorer-1"])
    cleanup(one)
    spawn_scorer_pools(load_config(None, ["scorer.num_scorers=2"]), one)  # no teachers: as before
    assert [c.name for c in one.components] == ["scorer-0", "scorer-1"]
    assert all("--teacher" not in a for a in one.spawner.argvs)


def _until_failure(sup: Supervisor, timeout: float, reported=lambda role: []):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = sup.failure(lambda: False, reported)
        if failed is not None:
            return failed
        time.sleep(0.05)
    return None


def test_a_pool_without_scorers_ends_the_run_though_other_pools_have_some(tmp_path, cleanup):
    sup = _supervisor(tmp_path, ["scorer-0"], {"scorer-adder-0": "raise SystemExit(4)"}, role_grace_s=0.3)
    cleanup(sup)
    sup.spawn_slot(Slot.scorer("default", 0))
    sup.spawn_slot(Slot.scorer("adder", 0))
    failed = _until_failure(sup, 20)
    assert failed is not None and failed.name == "scorer-adder-0"
    assert sup.verdict.startswith(
        "no scorer of teacher adder (scorer-adder-*; its trajectories are not scored)"
    )
    assert "scorer-adder-0 exited with code 4" in sup.verdict
    assert sup.summary() == {"restarts": {}, "lost": ["scorer-adder-0"]}
    assert any("no scorer of teacher adder" in line and "is alive" in line for line in sup.logged)


def test_a_pool_carries_on_with_its_own_scorers_or_one_heard_from(tmp_path, cleanup):
    sup = _supervisor(
        tmp_path, ["scorer-adder-1"], {"scorer-adder-0": "raise SystemExit(1)"}, role_grace_s=0.3
    )
    cleanup(sup)
    sup.spawn_slot(Slot.scorer("adder", 0))
    sup.spawn_slot(Slot.scorer("adder", 1))
    assert _until_failure(sup, 0.6) is None
    assert any("continuing on scorer-adder-1" in line for line in sup.logged)

    # The default pool's scorers heard on the metrics stream do not keep a named pool alive; its own do.
    lone = _supervisor(tmp_path / "lone", [], {"scorer-adder-0": "raise SystemExit(1)"}, role_grace_s=0.3)
    cleanup(lone)
    lone.spawn_slot(Slot.scorer("adder", 0))
    heard = {"host": "elsewhere", "pid": 1}
    other_pool = lambda role: [Incarnation("scorer-0", heard)] if role == "scorer" else []  # noqa: E731
    by_hand = lambda role: [Incarnation("scorer-adder-7", heard)] if role == "scorer" else []  # noqa: E731
    assert _until_failure(lone, 0.6, by_hand) is None
    failed = _until_failure(lone, 5, other_pool)
    assert failed is not None and failed.name == "scorer-adder-0"


def test_a_pools_restart_keeps_its_teacher(tmp_path, cleanup):
    marker = tmp_path / "failed-once"
    fail_once = (
        f"import os, sys, time\nif not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close(); sys.exit(3)\ntime.sleep(60)\n"
    )
    sup = _supervisor(
        tmp_path,
        [],
        {"scorer-adder-0": fail_once},
        restart="on-failure",
        restart_backoff_s=0.1,
        max_restarts=2,
    )
    cleanup(sup)
    sup.spawn_slot(Slot.scorer("adder", 0))
    wait_for(lambda: _until_failure(sup, 0.2) is None and len(sup.components) == 2, 20, "the restart")
    assert sup.spawner.argvs[1][-2:] == ["--teacher", "adder"]
    assert sup.summary() == {"restarts": {"scorer-adder-0": 1}, "lost": []}


# ------------------------------------------------------------------------------------------ opd scale
def _run_args(zmq_broker: str) -> list[str]:
    return [f"run.run_id={RUN}", f"broker.port={zmq_broker.rsplit(':', 1)[1]}"]


def _scale_records(zmq_broker: str) -> list[dict]:
    broker = ZmqBroker(zmq_broker)
    control = stream_name(RUN, "control")
    try:
        msgs = broker.consume(control, "reader", "reader", 64, 0.0)
        broker.ack(control, "reader", [m.id for m in msgs])
    finally:
        broker.close()
    return [unpack_control(m.data) for m in msgs]


def _config_file(tmp_path) -> str:
    """A run's config without a teacher section (a teachers: section names each teacher's model instead)."""
    path = tmp_path / "config.yaml"
    path.write_text("run: {seed: 0}\n")
    return str(path)


def test_opd_scale_names_a_pool_and_is_refused_without_one_when_there_are_several(
    zmq_broker, tmp_path, capsys
):
    reader = ZmqBroker(zmq_broker)
    reader.skip_to_end(stream_name(RUN, "control"), "reader")
    reader.close()
    base = ["scale", "--config", _config_file(tmp_path), *_run_args(zmq_broker)]
    assert main([*base, *TWO, "scorers.speller=3", "scorers.adder=2"]) == 0
    assert "3 scorers of teacher speller, 2 scorers of teacher adder" in capsys.readouterr().out
    assert main([*base, "scorers=2"]) == 0  # one teacher: the old form, its pool named in the record
    got = [(r["role"], r["teacher"], r["target"]) for r in _scale_records(zmq_broker)]
    assert got == [("scorer", "speller", 3), ("scorer", "adder", 2), ("scorer", "default", 2)]

    for targets, says in (
        (["scorers=2"], "several teachers (adder, speller)"),
        (["scorers.nobody=2"], "no teacher 'nobody' in this run; its teachers: adder, speller"),
        (["scorers.adder=0"], "at least 1 scorer"),
        (["scorers.adder=2", "scorers=2"], "several teachers"),
    ):
        assert main([*base, *TWO, *targets]) == 2
        assert says in capsys.readouterr().err
    assert _scale_records(zmq_broker) == []  # a refused request publishes nothing, not even its valid part


def test_opd_scorer_refuses_a_teacher_the_run_does_not_have(tmp_path, capsys):
    argv = [
        "scorer",
        "--config",
        _config_file(tmp_path),
        "run.run_id=x",
        "broker.port=5",
        *TWO,
        "--teacher",
        "nobody",
    ]
    assert main(argv) == 2
    assert (
        "--teacher nobody: not a teacher of this run; its teachers: adder, speller" in capsys.readouterr().err
    )


# ------------------------------------------------------------------------------------------ scaler per pool
def test_the_scaler_acts_on_each_pool_from_its_own_queue(zmq_broker, tmp_path, cleanup):
    scaling = [
        "scaling.autoscale=true",
        "scaling.queue_low=1",
        "scaling.queue_high=3",
        "scaling.cooldown_s=60",
    ]
    cfg = load_config(None, [*_run_args(zmq_broker), *TWO, *scaling, "scaling.max_scorers=3"])
    names = [f"scorer-{t}-{i}" for t in ("adder", "speller") for i in range(4)]
    sup = _supervisor(tmp_path, names)
    cleanup(sup)
    spawn_scorer_pools(cfg, sup)
    broker = ZmqBroker(zmq_broker)
    streams = Streams(RUN)
    broker.publish(streams.rollouts_for("adder"), [b"x"] * 5)  # adder's queue is deep, speller's empty
    broker.publish(streams.rollouts, [b"x"] * 5)  # the default stream is no pool of this run: not counted
    logged: list[str] = []
    scaler = ScorerScaler(cfg, broker, supervisor_pools(cfg, sup), tmp_path, dict, logged.append)
    for pool in scaler.pools.values():
        pool.last_change -= 61  # past the cooldown: each pool's own
    scaler.tick()
    assert [c.name for c in sup.active("scorer-adder")] == ["scorer-adder-0", "scorer-adder-1"]
    assert [c.name for c in sup.active("scorer-speller")] == ["scorer-speller-0"]  # the newest retired
    wait_for(lambda: sup.components[2].proc.poll() is not None, 20, "the retired scorer to exit")
    scaler.tick()  # reaps it; each pool is inside its cooldown now
    assert any(
        "scorers.adder 1 -> 2 (autoscaler: rollouts depth 5.0 > scaling.queue_high=3)" in line
        for line in logged
    )
    assert any(
        "scorers.speller 2 -> 1 (autoscaler: rollouts depth 0.0 < scaling.queue_low=1)" in line
        for line in logged
    )

    # `opd scale` for one pool moves that pool only; a record naming no pool is refused with several.
    broker.publish(streams.control, [pack_scale(3, "speller"), pack_scale(1, None)])
    scaler.tick()
    assert [c.name for c in sup.active("scorer-speller")] == [
        "scorer-speller-0",
        "scorer-speller-2",
        "scorer-speller-3",
    ]
    assert len(sup.active("scorer-adder")) == 2
    assert any("ignored a request for teacher None" in line and "adder, speller" in line for line in logged)
    lines = (tmp_path / "scaling.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["event"] != "interval"]
    events = [(r["event"], r.get("teacher"), r.get("name") or r.get("target")) for r in records]
    assert events == [
        ("decision", "adder", 2),
        ("started", "adder", "scorer-adder-1"),
        ("decision", "speller", 1),
        ("retired", "speller", "scorer-speller-1"),
        ("stopped", "speller", "scorer-speller-1"),
        ("decision", "speller", 3),
        ("started", "speller", "scorer-speller-2"),  # a fresh index: scorer-speller-1's log is its own
        ("started", "speller", "scorer-speller-3"),
    ]
    assert records[4]["code"] == -signal.SIGTERM
    broker.close()


def pack_scale(target: int, teacher: str | None) -> bytes:
    from opd.protocol import scale_record

    return scale_record("scorer", target, "test", teacher=teacher)


def test_a_runs_resolved_config_with_teachers_loads_again(tmp_path):
    """runs/<id>/config.yaml is what every component loads: with `teachers:` it must not carry the (unused,
    and then refused) teacher section."""
    from opd.config import dump_config

    cfg = load_config(None, TWO)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert list(again.teacher_pools()) == ["adder", "speller"]
    assert again.teacher_pools()["speller"].scorer.num_scorers == 2
    assert "teacher" in yaml_keys(dump_config(load_config(None)))  # one teacher: as ever


def yaml_keys(text: str) -> list[str]:
    import yaml

    return list(yaml.safe_load(text))


def test_opd_top_shows_a_named_pools_scorers_as_scorers():
    from rich.console import Console

    from opd.launch.top import TopState, render

    state = TopState(source="test")
    for name, scored in (("scorer-0", 7), ("scorer-adder-0", 11)):
        state.ingest({"component": name, "incarnation": "a", "uptime": 10.0, "trajectories_scored": scored})
    console = Console(width=100, record=True, color_system=None)
    console.print(render(state, load_config(None, TWO)))
    rows = [line for line in console.export_text().splitlines() if "scorer-" in line]
    trajs = {cells[1]: cells[5] for cells in ([c.strip() for c in row.split("│")] for row in rows)}
    assert trajs == {"scorer-0": "7", "scorer-adder-0": "11"}, rows  # its stage's count: scored


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_opd_run_names_the_pool_whose_engine_needs_a_missing_package():
    from opd.launch.cli import missing_packages

    cfg = load_config(
        None, ["teachers={adder: {}, speller: {scorer: {engine: vllm}}}", "routing.default=adder"]
    )
    ((field, message),) = missing_packages(cfg)
    assert field == "teachers.speller.scorer.engine" and message.endswith(
        "set teachers.speller.scorer.engine: hf"
    )
