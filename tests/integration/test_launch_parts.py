"""The launcher's parts on their own: the supervisor judges real processes by exit status, retires on purpose and
stops what it started; the monitor reads a real broker; the CLI table parses flags among overrides; the parts
that do not load models import no torch."""

from __future__ import annotations

import ast
import inspect
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from opd.config import ConfigError
from opd.launch.cli import VERBS, _component_config, _parse
from opd.launch.spawners import SPAWNERS
from opd.launch.supervisor import LocalSpawner, Slot, Spawner, Supervisor
from tests.conftest import REPO, TINY, wait_for

LAUNCH = REPO / "opd" / "launch"
SLEEP = "import time; time.sleep(60)"
IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


# ------------------------------------------------------------------------------------------ layering
def test_only_the_report_loads_models_and_rundir_imports_no_torch():
    """A fresh interpreter imports every part but the report (and the launcher that calls it): no torch."""
    parts = ["rundir", "supervisor", "monitor", "scaling", "cli", "checks", "cluster", "deadletter", "top"]
    code = (
        "import sys\n"
        + "".join(f"import opd.launch.{p}\n" for p in parts)
        + "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        + "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    alone = subprocess.run(
        [sys.executable, "-c", "import sys, opd.launch.rundir; assert 'torch' not in sys.modules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 0, alone.stderr


def test_report_and_models_cmd_are_the_only_parts_that_import_the_model_stack():
    """The launcher's light parts never load torch; model work in the launcher process is `report.py` (accuracy,
    `opd prepare`) and `models_cmd.py` (`opd models get`: GGUF conversion)."""
    heavy = ("torch", "transformers", "opd.models")
    importers = set()
    for path in LAUNCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == h or n.startswith(h + ".") for n in names for h in heavy):
                importers.add(path.name)
    assert importers == {"report.py", "models_cmd.py"}


def test_no_launch_part_branches_on_the_broker_type():
    for path in LAUNCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute):
                assert node.left.attr != "type", f"{path.name}:{node.lineno} compares a .type"


# ------------------------------------------------------------------------------------------ supervisor
class ScriptSpawner:
    """The spawner contract with short scripts in the components' places: each slot runs the code named for it,
    as a real child process, so the supervisor's judgement is tested on real exit statuses."""

    def __init__(self, scripts: dict[str, str]):
        self.scripts, self.argvs, self.closed = scripts, [], False

    def start(self, slot: Slot, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        self.argvs.append(argv)
        with open(log_path, "ab") as fh:
            return subprocess.Popen(
                [sys.executable, "-c", self.scripts[slot.name]], stdout=fh, stderr=fh, env=env
            )

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def supervise(tmp_path):
    made = []

    def make(scripts: dict[str, str], survivable: dict[str, str] | None = None, grace_s: float = 5.0):
        (tmp_path / "logs").mkdir(exist_ok=True)
        logged: list[str] = []
        sup = Supervisor(
            tmp_path / "config.yaml",
            tmp_path,
            ScriptSpawner(scripts),
            grace_s,
            survivable or {},
            logged.append,
        )
        sup.logged = logged
        made.append(sup)
        return sup

    yield make
    for sup in made:  # only what these supervisors started, by handle
        for c in sup.components:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()


def _exited(comp) -> bool:
    return comp.proc.poll() is not None


def test_spawn_passes_role_index_and_config_and_names_the_log(supervise, tmp_path):
    sup = supervise({"scorer-3": "print('hello from the scorer')"})
    comp = sup.spawn("scorer", 3, "--extra")
    wait_for(lambda: _exited(comp), 30, "the script to end")
    argv = sup.spawner.argvs[0]
    assert argv[1:] == [
        "-m",
        "opd",
        "scorer",
        "--config",
        str(tmp_path / "config.yaml"),
        "--index",
        "3",
        "--extra",
    ]
    assert comp.slot == Slot("scorer", 3) and comp.name == "scorer-3"
    assert comp.log_path == tmp_path / "logs" / "scorer-3.log" and "hello from the scorer" in comp.tail()


def test_a_nonzero_exit_is_a_failure(supervise):
    sup = supervise({"learner": SLEEP, "actor-0": "raise SystemExit(3)"})
    sup.spawn("learner")
    actor = sup.spawn("actor", 0)
    wait_for(lambda: _exited(actor), 30, "the actor to exit")
    failed = sup.failure(lambda: True)  # even once the run is over, a crash is a crash
    assert failed is actor and failed.proc.returncode == 3


def test_a_clean_worker_exit_is_a_failure_until_the_learner_said_stop(supervise):
    sup = supervise({"learner": SLEEP, "scorer-0": "pass"})
    sup.spawn("learner")
    scorer = sup.spawn("scorer", 0)
    wait_for(lambda: _exited(scorer), 30, "the scorer to exit")
    asked = []
    assert sup.failure(lambda: asked.append(True) or False) is scorer
    assert sup.failure(lambda: asked.append(True) or True) is None
    assert asked == [True, True]  # the stop is looked up only once exits have been read


def test_no_exit_no_question_and_the_learners_clean_exit_ends_nothing(supervise):
    sup = supervise({"learner": "pass", "actor-0": SLEEP})
    learner = sup.spawn("learner")
    sup.spawn("actor", 0)
    wait_for(lambda: _exited(learner), 30, "the learner to exit")
    assert sup.failure(lambda: False) is None


def test_retired_exits_are_expected_and_reaped_once(supervise):
    sup = supervise({"scorer-0": SLEEP, "scorer-1": SLEEP})
    first, second = sup.spawn("scorer", 0), sup.spawn("scorer", 1)
    assert [c.name for c in sup.active("scorer")] == ["scorer-0", "scorer-1"]
    sup.retire("scorer", 1)
    assert sup.active("scorer") == [first]
    wait_for(lambda: _exited(second), 30, "the retired scorer to exit")
    assert sup.failure(lambda: False) is None
    assert [(c.name, code) for c, code in sup.reap()] == [("scorer-1", -signal.SIGTERM)]
    assert sup.reap() == []


def test_a_retired_process_that_ignores_sigterm_is_killed_after_the_grace(supervise):
    sup = supervise({"scorer-0": IGNORE_TERM}, grace_s=0.3)
    comp = sup.spawn("scorer", 0)
    time.sleep(1.0)  # let it install its handler
    sup.retire("scorer", 0)
    time.sleep(0.5)
    assert sup.reap() == [] and any("killing it" in line for line in sup.logged)
    wait_for(lambda: _exited(comp), 30, "the kill")
    assert [(c.name, code) for c, code in sup.reap()] == [("scorer-0", -signal.SIGKILL)]


def test_a_survivable_role_carries_on_while_another_of_it_runs(supervise):
    sup = supervise(
        {"actor-0": "raise SystemExit(1)", "actor-1": "import time; time.sleep(2); raise SystemExit(1)"},
        survivable={"actor": "it rejoins"},
    )
    first, second = sup.spawn("actor", 0), sup.spawn("actor", 1)
    wait_for(lambda: _exited(first), 30, "actor-0 to exit")
    assert sup.failure(lambda: False) is None
    assert sup.logged == ["[yellow]actor-0 exited with code 1[/]; continuing on actor-1; it rejoins"]
    wait_for(lambda: _exited(second), 30, "actor-1 to exit")
    assert sup.failure(lambda: False) is first  # none left of the role: the run cannot go on


def test_stop_terminates_and_kills_what_outlives_the_grace(supervise):
    sup = supervise({"learner": SLEEP, "actor-0": IGNORE_TERM})
    learner, actor = sup.spawn("learner"), sup.spawn("actor", 0)
    time.sleep(1.0)
    t0 = time.monotonic()
    sup.stop(sup.components, 1.0)
    assert time.monotonic() - t0 < 10
    assert learner.proc.returncode == -signal.SIGTERM and actor.proc.returncode == -signal.SIGKILL


def test_every_registered_spawner_keeps_the_contract():
    """Both launchers (and any added to SPAWNERS) offer the Spawner's methods with its parameters."""
    import importlib

    for name, target in SPAWNERS.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        for method in ("start", "close"):
            want = list(inspect.signature(getattr(Spawner, method)).parameters)
            assert list(inspect.signature(getattr(cls, method)).parameters) == want, (name, method)
        assert list(inspect.signature(cls).parameters)[:2] == ["cfg", "log"], name
    assert isinstance(LocalSpawner(None, None).close(), type(None))


# ------------------------------------------------------------------------------------------ scaling pool
def test_the_scaling_pool_acts_through_spawn_and_retire(supervise):
    from opd.launch.scaling import SupervisorPool

    sup = supervise({"scorer-0": SLEEP, "scorer-1": SLEEP})
    sup.spawn("scorer", 0)
    pool = SupervisorPool(sup)
    pool.start_scorer(1)
    assert pool.active_scorers() == ["scorer-0", "scorer-1"]
    pool.retire_scorer("scorer-1")
    assert pool.active_scorers() == ["scorer-0"]
    wait_for(lambda: _exited(sup.get(Slot("scorer", 1))), 30, "the retired scorer")
    assert pool.reap() == [("scorer-1", -signal.SIGTERM)]


# ------------------------------------------------------------------------------------------ monitor
def test_monitor_reads_metrics_dead_letters_and_stop(zmq_broker, tmp_path):
    from rich.console import Console

    from broker.zmq import ZmqBroker
    from opd.config import load_config
    from opd.launch.monitor import Monitor
    from opd.protocol import Streams, dead_letter_record, metrics_record, stop_record

    port = int(zmq_broker.rsplit(":", 1)[1])
    cfg = load_config(None, ["run.run_id=mon", f"broker.port={port}"])
    client = ZmqBroker(zmq_broker, 5.0)
    streams = Streams("mon")
    client.publish(streams.control, [stop_record("max_steps")])  # an earlier incarnation's end
    monitor = Monitor(cfg, client, tmp_path, Console(file=open(tmp_path / "console.txt", "w")))
    assert not monitor.run_over()

    learner = {"component": "learner", "step": 1, "loss": 0.5, "eval_accuracy": 0.25, "tokens_trained": 10}
    client.publish(
        streams.metrics,
        [
            metrics_record(component="actor-0", tokens_generated=100),
            metrics_record(component="actor-1", tokens_generated=50),
            metrics_record(**learner),
        ],
    )
    bad = msgpack.packb({"id": "traj-7", "schema_version": 99})
    client.publish(streams.dead_letter, [dead_letter_record("scorer-0", "schema_version 99", data=bad)])
    monitor.drain()
    state = monitor.state
    assert state.totals("tokens_generated", "actor") == 150 and state.eval_accuracy == 0.25
    assert [r["step"] for r in state.learner_records] == [1] and state.dead_letters == 1
    ledger = [json.loads(line) for line in (tmp_path / "dead_letter.jsonl").read_text().splitlines()]
    assert ledger[0]["trajectory_id"] == "traj-7" and ledger[0]["replayable"] and "data" not in ledger[0]
    assert not monitor.run_over()
    client.publish(streams.control, [stop_record("max_steps")])
    assert monitor.run_over()
    client.close()


# ------------------------------------------------------------------------------------------ cli
def test_flags_may_stand_among_the_overrides():
    args = _parse(["run", TINY, "a.b=1", "--resume", "c.d=2", "--launcher", "ray"])
    assert (args.verb, args.resume, args.launcher, args.overrides) == ("run", True, "ray", ["a.b=1", "c.d=2"])
    args = _parse(["top", "--config", TINY, "run.run_id=x", "--once", "--interval", "2"])
    assert args.once and args.interval == 2.0 and args.overrides == ["run.run_id=x"]
    args = _parse(["learner", "--config", TINY, "run.run_id=x", "--resume"])
    assert args.resume and args.overrides == ["run.run_id=x"]
    args = _parse(["scale", "--config", TINY, "scorers=3", "broker.request_timeout_s=5"])
    assert args.targets == ["scorers=3", "broker.request_timeout_s=5"]
    for bad in (["run", TINY, "--launcher", "nowhere"], ["nope"], []):
        with pytest.raises(SystemExit) as exc:
            _parse(bad)
        assert exc.value.code == 2


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse([verb, "--help"])
    assert exc.value.code == 0
    assert f"usage: opd {verb}" in capsys.readouterr().out


def test_a_component_by_hand_needs_what_the_broker_cannot_decide():
    redis = ["run.run_id=x", "broker.type=redis", "weight_sync.port=5"]
    with pytest.raises(ConfigError, match="no broker process to start"):
        _component_config(_parse(["broker", "--config", TINY, *redis]))
    # a server's address is in its URL: no port to give by hand
    assert _component_config(_parse(["actor", "--config", TINY, *redis])).run.run_id == "x"
    with pytest.raises(ConfigError, match="broker.port must be set"):
        _component_config(_parse(["scorer", "--config", TINY, "run.run_id=x"]))


# ------------------------------------------------------------------------------------------ dead letters
def test_dead_letter_commands_need_a_broker_that_keeps_them(capsys):
    from opd.launch.cli import main

    assert main(["dead-letter", "ls", "--config", TINY, "run.run_id=x", "broker.port=5"]) == 2
    assert "keeps no dead letters" in capsys.readouterr().err


def test_dead_letter_ls_and_replay_on_redis(redis_server, capsys):
    from broker import connect
    from opd.config import load_config
    from opd.launch.cli import main
    from opd.protocol import dead_letter_record

    overrides = ["run.run_id=dl", "broker.type=redis", f"broker.url={redis_server.url}"]
    client = connect(load_config(None, overrides).broker)
    data = msgpack.packb({"id": "traj-9"})
    client.publish("dl:dead_letter", [dead_letter_record("scorer-0", "bad", data=data, stream="dl:rollouts")])
    assert main(["dead-letter", "ls", "--config", TINY, *overrides]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["from"], listed["trajectory_id"], listed["replayable"]) == ("scorer-0", "traj-9", True)
    assert main(["dead-letter", "replay", "--config", TINY, *overrides]) == 0
    assert "replayed 1 message(s)" in capsys.readouterr().out
    assert [d for _, d in client.entries("dl:rollouts")] == [data] and client.entries("dl:dead_letter") == []
    client.close()


def test_the_status_line_survives_a_broker_outage(redis_server, tmp_path):
    """The launcher draws a status line with queue depths; Redis gone for longer than request_timeout_s must show
    as such, not end `opd run` with a traceback (found by the random chaos test)."""
    from rich.console import Console

    from broker.redis import RedisBroker
    from opd.config import load_config
    from opd.launch.monitor import Monitor
    from opd.protocol import metrics_record

    cfg = load_config(None, ["run.run_id=out", "broker.type=redis", f"broker.url={redis_server.url}"])
    client = RedisBroker(redis_server.url, request_timeout_s=0.5)
    monitor = Monitor(cfg, client, tmp_path, Console(file=open(tmp_path / "console.txt", "w")))
    learner = {
        "step": 1,
        "loss": 1.0,
        "weight_version": 0,
        "reverse_kl": 1.0,
        "importance_weight": 1.0,
        "staleness_mean": 0,
    }
    client.publish(monitor.streams.metrics, [metrics_record(component="learner", **learner)])
    monitor.drain()
    assert "queue 0/0" in monitor.status_line()
    redis_server.kill()
    assert "broker unavailable" in monitor.status_line()
