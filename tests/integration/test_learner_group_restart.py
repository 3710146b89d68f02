"""The supervisor restarts a group role as a whole (the learner's ranks): when one rank fails, the others are
killed, the run's actors stopped, and all of them started again (the ranks with `--resume`) after the backoff,
counted as one restart of `learner`; the run ends instead when the group cannot be restarted (refused by the
broker, past max_restarts, or restart: no), with a verdict that says why. Real child processes, real exits."""

from __future__ import annotations

import time

from opd.config import SupervisionConfig
from opd.launch.supervisor import GroupRestart, Supervisor
from tests.integration.test_launch_parts import SLEEP, ScriptSpawner

FAIL = "raise SystemExit(1)"
FAIL_ONCE = (  # fails the first time it runs (marker file {marker}), then runs until killed
    "import os, sys, time\n"
    "if not os.path.exists({marker!r}):\n"
    "    open({marker!r}, 'w').close(); sys.exit(3)\n"
    "time.sleep(60)\n"
)
GROUP = GroupRestart("learner", ("--resume",), along=("actor",))


def _supervisor(tmp_path, scripts, group=GROUP, **policy) -> Supervisor:
    (tmp_path / "logs").mkdir(exist_ok=True)
    logged: list[str] = []
    sup = Supervisor(
        tmp_path / "config.yaml",
        tmp_path,
        ScriptSpawner(scripts),
        5.0,
        {"actor": "it rejoins"},
        logged.append,
        SupervisionConfig(**{"role_grace_s": 0, "restart_backoff_s": 0.2, **policy}),
        group=group,
    )
    sup.logged = logged
    for slot in (("learner", 0), ("learner", 1), ("actor", 0)):
        sup.spawn(*slot)
    return sup


def _poll(sup: Supervisor, until, timeout: float = 20.0):
    """Call `failure` like the launcher's watch loop until `until()` or a failure; the failed component."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failed = sup.failure(lambda: False)
        if failed is not None or until():
            return failed
        time.sleep(0.05)
    raise AssertionError(f"neither a failure nor the expected state within {timeout}s: {sup.logged}")


def _kill_all(sup: Supervisor) -> None:
    for c in sup.components:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def test_a_dead_rank_restarts_the_whole_group_and_the_actors_with_resume(tmp_path):
    scripts = {
        "learner-0": SLEEP,
        "learner-1": FAIL_ONCE.format(marker=str(tmp_path / "failed")),
        "actor-0": SLEEP,
    }
    sup = _supervisor(tmp_path, scripts, restart="on-failure", max_restarts=1)
    try:
        failed = _poll(sup, lambda: len(sup.components) == 6)
        assert failed is None, sup.verdict
        old, new = sup.components[:3], sup.components[3:]
        assert [c.name for c in new] == ["learner-0", "learner-1", "actor-0"]  # rank 0 first
        assert old[0].proc.returncode == -9  # the surviving rank is killed, never asked to checkpoint
        assert old[1].proc.returncode == 3 and old[2].proc.returncode == -15  # the actor: SIGTERM
        argvs = sup.spawner.argvs[3:]
        assert [a[-1] for a in argvs[:2]] == ["--resume", "--resume"] and "--resume" not in argvs[2]
        assert sup.summary() == {
            "restarts": {"learner": 1},
            "lost": [],
        }  # the actor's is no restart of its own
        assert any(
            "learner-1 exited with code 3" in x
            and "restarting the learner group in 0.2s with --resume (restart 1 of supervision.max_restarts=1): "
            "learner-0, learner-1, actor-0"
            in x
            for x in sup.logged
        ), sup.logged
        time.sleep(0.3)
        assert sup.failure(lambda: False) is None and all(c.proc.poll() is None for c in new)
    finally:
        _kill_all(sup)


def test_past_max_restarts_the_run_ends_naming_the_limit(tmp_path):
    sup = _supervisor(
        tmp_path,
        {"learner-0": SLEEP, "learner-1": FAIL, "actor-0": SLEEP},
        restart="on-failure",
        max_restarts=1,
    )
    try:
        failed = _poll(sup, lambda: False)
        assert failed is not None and failed.name == "learner-1" and len(sup.components) == 6
        assert sup.verdict == (
            "learner-1 exited with code 1; the learner group is not restarted again: it has had "
            "supervision.max_restarts=1 restarts"
        )
    finally:
        _kill_all(sup)


def test_a_group_the_broker_cannot_restart_ends_the_run_saying_why(tmp_path):
    refused = GroupRestart(
        "learner", ("--resume",), "broker.type zmq never gives back the entries", ("actor",)
    )
    sup = _supervisor(
        tmp_path, {"learner-0": SLEEP, "learner-1": FAIL, "actor-0": SLEEP}, refused, restart="on-failure"
    )
    try:
        failed = _poll(sup, lambda: False)
        assert failed.name == "learner-1" and len(sup.components) == 3
        assert sup.verdict == (
            "learner-1 exited with code 1; the learner group is not restarted: broker.type zmq never gives back "
            "the entries"
        )
    finally:
        _kill_all(sup)


def test_restart_no_ends_the_run_at_the_first_dead_rank(tmp_path):
    sup = _supervisor(tmp_path, {"learner-0": SLEEP, "learner-1": FAIL, "actor-0": SLEEP}, restart="no")
    try:
        failed = _poll(sup, lambda: False)
        assert failed.name == "learner-1" and sup.verdict == "learner-1 exited with code 1"
        assert sup.components[0].proc.poll() is None  # left to the launcher's cleanup (SIGTERM, as ever)
    finally:
        _kill_all(sup)


def test_the_launcher_restarts_the_learner_group_only_where_the_books_survive_it(tmp_path):
    """Redis gives the restarted learner its own pending entries; the embedded broker never hands them out again,
    and without the replay log the acknowledged steps since the checkpoint would be lost: both refused, saying so."""
    from opd.config import load_config
    from opd.launch.launcher import Launcher

    def group(*overrides: str) -> GroupRestart:
        return Launcher(load_config(None, [f"run.output_dir={tmp_path}", *overrides]))._learner_group()

    redis = ["broker.type=redis", "broker.url=redis://127.0.0.1:1/0"]
    assert group(*redis) == GroupRestart("learner", ("--resume",), None, ("actor",))
    assert "broker.type zmq never gives back the entries the learner held" in group("broker.type=zmq").refused
    assert "set learner.replay_log: true" in group(*redis, "learner.replay_log=false").refused
