"""docker-compose's learner service with OPD_LEARNER_RANKS=2, run as its container would run it, without Docker.

No Docker engine runs here, so the test runs the learner service's own entrypoint and command (torchrun with its
flags, then `-m opd learner ...`; interpolated as compose does) as a local process, against a real Redis, with
an actor and a scorer started by hand the way their services start them. The config is configs/tiny.yaml (the
models the other end-to-end tests use) resolved like a cluster run, instead of the compose network's addresses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY
from tests.integration.test_deploy import _services


def _resolve(redis_url: str, cache, run_dir, steps: int, batch: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "opd.launch.cluster", "resolve", TINY, "broker.type=redis", f"broker.url={redis_url}",
         f"run.cache_dir={cache}", f"run.output_dir={run_dir}", "run.progress=false", f"learner.max_steps={steps}",
         f"learner.batch_size={batch}", "actor.prompts_per_batch=8", "learner.eval_every=0",
         "learner.checkpoint_every=0", "metrics.port=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _learner_argv(run_config: str) -> list[str]:
    """The learner service's entrypoint + command with OPD_LEARNER_RANKS=2: this interpreter's torchrun, the run's
    config instead of the image's, and no fixed metrics port (the test host is no container)."""
    service = _services({"OPD_LEARNER_RANKS": "2"})["learner"]
    entry, command = service["entrypoint"], service["command"]
    assert entry[0] == "torchrun" and command[:2] == ["learner", "--config"]
    kept = [a for a in command[3:] if not a.startswith("metrics.")]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *entry[1:],
        "learner",
        "--config",
        run_config,
        *kept,
    ]


@pytest.mark.slow
def test_the_compose_learner_service_trains_with_two_ranks(redis_server, prepared, tmp_path):
    run_dir, steps, batch = tmp_path / "run", 6, 32
    run_config = _resolve(redis_server.url, prepared, run_dir, steps, batch)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as fh:
            procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)

    opd = [sys.executable, "-m", "opd"]
    try:
        start("learner", _learner_argv(run_config))
        start("actor", [*opd, "actor", "--config", run_config, "--index", "0"])
        start("scorer", [*opd, "scorer", "--config", run_config, "--index", "0"])
        procs["learner"].wait(timeout=300)
        deadline = time.monotonic() + 60  # the others stop on the learner's stop message
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"== {f.name}\n{f.read_text(errors='replace')[-2500:]}" for f in sorted(logs.iterdir()))
    assert {n: p.returncode for n, p in procs.items()} == {"learner": 0, "actor": 0, "scorer": 0}, tails
    summary = json.loads((run_dir / "learner_summary.json").read_text())
    assert summary["learner_steps"] == steps and summary["learner_ranks"] == 2, summary
    assert summary["trajectories_trained"] == steps * batch
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r for r in records if "step" in r]
    assert len(steps_seen) == steps
    for r in steps_seen:  # torchrun's two processes were the two ranks of every step
        assert r["learner_ranks"] == 2 and min(r["rank_tokens"]) > 0, r
    assert (run_dir / "student" / "config.json").exists()


@pytest.mark.slow
def test_torchrun_with_the_service_flags_forms_the_learner_group(tmp_path):
    """torchrun hosts the rendezvous store itself (TORCHELASTIC_USE_AGENT_STORE): the ranks must join it as
    clients through the learner's tcp:// rendezvous, take RANK/LOCAL_RANK from it, and agree on the group."""
    learner = _services({"OPD_LEARNER_RANKS": "2"})["learner"]
    flags = [a for a in learner["entrypoint"][1:] if a not in ("-m", "opd")]
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, str(REPO / "tests" / "rank_probe.py"),
           str(REPO / "configs" / "tiny.yaml"), "learner.num_ranks=2", "learner.collective_timeout_s=60"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPD_PROBE_OUT": str(tmp_path)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # one file per rank: the two ranks share torchrun's stdout, where their lines can run together
    lines = sorted((json.loads(f.read_text()) for f in tmp_path.glob("rank-*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in lines] == [0, 1] and [r["local_rank"] for r in lines] == [0, 1]
    assert all(r["world"] == 2 and r["got"] == "from rank 0" and r["ranks"] == [0, 1] for r in lines), lines
    assert all(r["agent_store"] == "True" for r in lines), "torchrun's own store was not the one joined"
    assert lines[0]["port"] == lines[1]["port"] > 0
