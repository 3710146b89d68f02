"""docker-compose's learner service with N learner ranks: torchrun starts them in the one `learner` container.

No Docker engine runs here, so the service is checked here two ways: `docker compose config` (the real parser and
its `${OPD_LEARNER_RANKS:-1}` interpolation, when Debian's docker-compose is installed), torchrun's own argument
parser and opd's config loader on the service's entrypoint and command. The rendezvous itself (torchrun with
the service's flags starts 2 processes that join the learner group through the production code,
tests/rank_probe.py, under torchrun's agent store) and a whole 2-rank learner trained under that entrypoint are
in tests/e2e/test_compose_ranks.py (two torch start-ups each).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from opd.launch.cli import _component_config, _parser
from tests.conftest import REPO
from tests.integration.test_deploy import APP, COMPOSE, _services


def _torchrun_args(service: dict):
    from torch.distributed.run import get_args_parser

    entry = service["entrypoint"]
    assert entry[0] == "torchrun"
    return get_args_parser().parse_args([*entry[1:], *service["command"]])


@pytest.mark.parametrize("ranks", [None, "2"])
def test_the_learner_service_starts_learner_num_ranks_processes_with_torchrun(ranks):
    env = {} if ranks is None else {"OPD_LEARNER_RANKS": ranks}
    learner = _services(env)["learner"]
    n = int(ranks or 1)
    run = _torchrun_args(learner)
    assert run.standalone and run.nnodes == "1" and run.nproc_per_node == str(n)
    assert run.module and run.training_script == "opd"  # each process is `python -m opd learner ...`
    args = _parser().parse_args(run.training_script_args)
    assert args.verb == "learner" and args.rank is None  # the rank comes from torchrun's RANK
    args.config = str(REPO / args.config.removeprefix(APP))
    cfg = _component_config(args)
    assert cfg.learner.num_ranks == n  # and so WORLD_SIZE=n agrees with the config (rendezvous checks it)
    # torchrun's MASTER_ADDR/MASTER_PORT must be the ones used: a port in the config would win over them
    assert cfg.learner.master_port == 0 and cfg.learner.master_addr is None
    assert learner.get("deploy", {}).get("replicas", 1) == 1, "one container holds every rank"


def test_docker_compose_interpolates_the_number_of_ranks():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose not installed: apt-get install --no-install-recommends docker-compose (.ci/run does)"
        )
    for ranks, want in ((None, "1"), ("3", "3")):
        env = {k: v for k, v in os.environ.items() if k != "OPD_LEARNER_RANKS"}
        if ranks:
            env["OPD_LEARNER_RANKS"] = ranks
        out = subprocess.run(
            [binary, "-f", str(COMPOSE), "config"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        learner = yaml.safe_load(out.stdout)["services"]["learner"]
        assert f"--nproc-per-node={want}" in learner["entrypoint"]
        assert f"learner.num_ranks={want}" in learner["command"]
