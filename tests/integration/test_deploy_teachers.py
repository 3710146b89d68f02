"""docker-compose.yml and deploy/slurm/ with two teachers: each teacher's scorers are their own service / job array.

No Docker engine runs here: the compose services are checked as in tests/integration/test_deploy.py (each command
through opd's own parser and config loader; `docker-compose config`, the real parser, when installed), with the
variables of deploy/compose/two_teachers.env. The Slurm scripts run as Slurm would run them, with a stand-in
`sbatch` on PATH that records each submission and `OPD` a stand-in that prints the opd command line it was given;
those command lines then go through opd's parser and the run config launch.sh resolved. A whole Slurm run is
tests/e2e/test_slurm.py (one teacher).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from opd.launch.cli import _component_config, _parser
from opd.runtime.prometheus import metrics_port
from teacher_scorers.scorer import component_name
from tests.conftest import REPO
from tests.integration.test_deploy import APP, COMPOSE, _services

ENV_FILE = REPO / "deploy" / "compose" / "two_teachers.env"
SLURM = REPO / "deploy" / "slurm"
SCORERS = ("teacher-scorer", "teacher-scorer-2")


def _env_file() -> dict[str, str]:
    """KEY=VALUE lines, as compose reads an --env-file."""
    lines = [ln.strip() for ln in ENV_FILE.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def _scorer_args(service: dict):
    args = _parser().parse_args(service["command"])
    assert args.verb == "scorer" and args.config.startswith(APP)
    args.config = str(REPO / args.config.removeprefix(APP))
    return args


def test_the_env_file_starts_each_teachers_scorers_as_their_own_service():
    env = _env_file()
    services = _services(env)
    configs = {_parser().parse_args(services[s]["command"]).config for s in ("learner", "actor", *SCORERS)}
    configs.add(services["prepare"]["command"][1])
    assert configs == {f"{APP}configs/{env['OPD_CONFIG']}"}, "every service reads the two-teacher config"
    assert services["teacher-scorer-2"]["profiles"] == [env["COMPOSE_PROFILES"]]
    teachers = {}
    for service in SCORERS:
        args = _scorer_args(services[service])
        cfg = _component_config(args)  # what `opd scorer` checks before starting
        pools = cfg.teacher_pools()
        assert args.teacher in pools, f"{service}: --teacher {args.teacher} is not one of {list(pools)}"
        teachers[service] = args.teacher
        assert metrics_port(cfg, component_name(args.teacher, args.index)) == 9400
        assert cfg.broker.url == "redis://redis:6379/0" and cfg.weight_sync.host == "learner"
    assert sorted(teachers.values()) == sorted(pools), "one service per teacher's pool, none twice"
    assert teachers == {"teacher-scorer": env["OPD_TEACHER"], "teacher-scorer-2": env["OPD_TEACHER_2"]}
    # each pool's scorers read their own teacher's queue, so `--scale teacher-scorer-2=N` grows that pool alone
    assert len({cfg.for_teacher(t).teacher.model_dump_json() for t in teachers.values()}) == 2


def test_without_the_env_file_the_one_teacher_run_is_unchanged():
    services = _services()
    args = _scorer_args(services["teacher-scorer"])
    cfg = _component_config(args)
    assert args.config == str(REPO / "configs" / "compose.yaml") and args.teacher == "default"
    assert list(cfg.teacher_pools()) == ["default"] and component_name(args.teacher, 7) == "scorer-7"
    assert services["teacher-scorer-2"]["profiles"] == ["two-teachers"], "not started without its profile"
    assert all("profiles" not in s for n, s in services.items() if n != "teacher-scorer-2")


def test_docker_compose_resolves_the_two_teacher_variables():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose not installed: apt-get install --no-install-recommends docker-compose (.ci/run does)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPD_", "COMPOSE_"))}
    for env_file, want in (
        (None, ("compose.yaml", "default")),
        (ENV_FILE, ("compose_two_teachers.yaml", "adder")),
    ):
        cmd = [binary, "-f", str(COMPOSE)] + (["--env-file", str(env_file)] if env_file else []) + ["config"]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        scorer = yaml.safe_load(out.stdout)["services"]["teacher-scorer"]["command"]
        assert scorer[2:5] == [f"{APP}configs/{want[0]}", "--teacher", want[1]], scorer


def _compose_free(data: dict) -> dict:
    """A config without what only the compose network sets (addresses, fixed ids, volumes, checkpoints)."""
    data = json.loads(json.dumps(data))
    for key in ("run_id", "output_dir", "cache_dir"):
        data["run"].pop(key, None)
    for key in ("host", "port"):
        data["weight_sync"].pop(key, None)
    data["learner"].pop("checkpoint_every", None)
    data.pop("metrics", None)
    data.pop("broker", None)
    return data


def test_the_compose_two_teacher_config_is_the_demo_on_the_compose_network():
    demo = yaml.safe_load((REPO / "configs" / "two_teachers.yaml").read_text())
    compose = yaml.safe_load((REPO / "configs" / "compose_two_teachers.yaml").read_text())
    assert _compose_free(compose) == _compose_free(demo), "configs/two_teachers.yaml changed: change both"
    assert compose["broker"]["type"] == "redis" and compose["metrics"] == {"port_layout": "fixed"}


# ----------------------------------------------------------------------------------------------------- Slurm
FAKE_SBATCH = """#!/bin/bash
# records one submission (its arguments and OPD_TEACHER) and answers like `sbatch --parsable`
n=$(($(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 1))
"$PYTHON" -c 'import json, os, sys; print(json.dumps({"args": sys.argv[1:], "teacher": os.environ.get("OPD_TEACHER")}))' \
    "$@" >> "$SBATCH_LOG"
echo $((1000 + n))
"""


def _launch(
    tmp_path: Path, config: str, *overrides: str, env_extra: dict | None = None
) -> tuple[str, list[dict]]:
    """launch.sh with a recording sbatch: (its output, the submissions)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.jsonl"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OPD_PYTHON": sys.executable,
        "SBATCH_LOG": str(log),
        "OPD_REDIS_URL": "redis://127.0.0.1:6379/0",  # an outside Redis: no Redis job to wait for
        "PYTHONPATH": str(REPO),
        **(env_extra or {}),
    }
    out = subprocess.run(
        [str(SLURM / "launch.sh"), config, f"run.output_dir={tmp_path / 'run'}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, [json.loads(line) for line in log.read_text().splitlines()]


def _option(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def _scorer_argv(run_config: Path, teacher: str | None) -> list[str]:
    """The opd command line scorer.sbatch runs (as Slurm runs it, OPD_TEACHER from the submission)."""
    env = {**os.environ, "OPD_SLURM_DIR": str(SLURM), "OPD": "printf %s\\n", "SLURM_JOB_ID": "4242"}
    env.pop("OPD_TEACHER", None)
    if teacher is not None:
        env["OPD_TEACHER"] = teacher
    out = subprocess.run(
        ["bash", str(SLURM / "scorer.sbatch"), str(run_config), "scorer.batch_size=8"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_slurm_launch_submits_one_scorer_array_per_teacher(tmp_path):
    stdout, jobs = _launch(
        tmp_path,
        str(REPO / "configs" / "two_teachers.yaml"),
        "teachers.reverser.scorer.num_scorers=2",
        env_extra={
            "OPD_SBATCH_ARGS_SCORER": "--mem=1G",
            "OPD_SBATCH_ARGS_SCORER_REVERSER": "--gres=gpu:1",
            "OPD_TEACHER": "leaked",
        },  # fmt: skip
    )
    scorers = [j for j in jobs if _option(j["args"], "job-name").startswith("opd-scorer")]
    by_teacher = {j["teacher"]: j["args"] for j in scorers}
    assert set(by_teacher) == {"adder", "reverser"} and len(scorers) == 2, scorers
    assert all(j["teacher"] is None for j in jobs if j not in scorers), "only a pool's jobs name a teacher"
    run_config = tmp_path / "run" / "config.yaml"
    for teacher, n, gpu in (("adder", 1, False), ("reverser", 2, True)):
        args = by_teacher[teacher]
        assert _option(args, "job-name") == f"opd-scorer-{teacher}" and _option(args, "array") == f"0-{n - 1}"
        assert _option(args, "output").endswith(f"/logs/slurm-scorer-{teacher}-%j.out")
        assert "--mem=1G" in args and ("--gres=gpu:1" in args) == gpu
        assert args[-2:] == [str(SLURM / "scorer.sbatch"), str(run_config)]
        assert re.search(rf"^scorers-{teacher} job \d+$", stdout, re.M), stdout
        assert f"OPD_TEACHER={teacher} sbatch --job-name=opd-scorer-{teacher}" in stdout

        argv = _scorer_argv(run_config, teacher)
        parsed = _parser().parse_args(argv)
        assert (parsed.verb, parsed.teacher, parsed.index) == ("scorer", teacher, 4242)
        assert parsed.overrides == ["scorer.batch_size=8"]
        cfg = _component_config(parsed)
        assert parsed.teacher in cfg.teacher_pools()
        assert component_name(parsed.teacher, parsed.index) == f"scorer-{teacher}-4242"


def test_slurm_scorer_without_OPD_TEACHER_runs_as_before(tmp_path):
    """The one-teacher path (launch.sh's submissions for it: tests/e2e/test_slurm.py): no --teacher at all."""
    run_config = tmp_path / "run" / "config.yaml"
    run_config.parent.mkdir()
    run_config.write_text("{}\n")
    argv = _scorer_argv(run_config, None)
    assert argv[:3] == ["scorer", "--config", str(run_config)] and "--teacher" not in argv
    parsed = _parser().parse_args(argv)
    assert parsed.teacher == "default" and component_name(parsed.teacher, parsed.index) == "scorer-4242"
