"""docker-compose's two-teacher variant (deploy/compose/two_teachers.env), run as its containers would run it,
without Docker: each service's command from docker-compose.yml, with the env file's variables, as a local process.

No Docker engine runs here, so the learner, actor and the two scorer services (`teacher-scorer` for OPD_TEACHER,
`teacher-scorer-2` for OPD_TEACHER_2) run their own command lines against a real Redis. The config is the one the
services read, configs/compose_two_teachers.yaml, resolved like a cluster run with local addresses instead of the
compose network's. Both pools must score (the mixture task routes addition to one expert, reversal to the other)
for the learner to train its steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from broker import connect
from opd.config import load_config
from opd.protocol import unpack_control
from tests.conftest import REPO, free_port
from tests.integration.test_deploy import APP, _services
from tests.integration.test_deploy_teachers import _env_file

pytestmark = pytest.mark.slow


def _resolve(config: str, redis_url: str, cache, run_dir, steps: int, batch: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "opd.launch.cluster", "resolve", config, f"broker.url={redis_url}",
         f"run.cache_dir={cache}", f"run.output_dir={run_dir}", "run.progress=false", "weight_sync.host=127.0.0.1",
         f"weight_sync.port={free_port()}", f"learner.max_steps={steps}", f"learner.batch_size={batch}",
         "actor.prompts_per_batch=8", "learner.eval_every=0", "learner.checkpoint_every=0", "metrics.port=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _argv(service: dict, run_config: str) -> list[str]:
    """A service's command as a local process: the run's config instead of the image's, no fixed metrics port."""
    command = service["command"]
    assert command[1] == "--config" and command[2].startswith(APP)
    kept = [a for a in command[3:] if not a.startswith("metrics.")]
    return [sys.executable, "-m", "opd", command[0], "--config", run_config, *kept]


def _scored_by(redis_url: str, run_id: str) -> dict[str, int]:
    """trajectories_scored of each scorer, from its last record on the run's metrics stream."""
    cfg = load_config(None, ["broker.type=redis", f"broker.url={redis_url}"])
    client = connect(cfg.broker)
    try:
        records = [
            unpack_control(m.data) for m in client.consume(f"{run_id}:metrics", "test", "t", 10_000, 1.0)
        ]
    finally:
        client.close()
    scored = {}
    for r in records:
        if str(r.get("component", "")).startswith("scorer-"):
            scored[r["component"]] = max(scored.get(r["component"], 0), r.get("trajectories_scored", 0))
    return scored


def test_the_two_teacher_services_train_together(redis_server, asset_cache, tmp_path):
    env_vars = _env_file()
    services = _services(env_vars)
    run_dir, steps, batch = tmp_path / "run", 6, 32
    config = str(REPO / "configs" / env_vars["OPD_CONFIG"])
    run_config = _resolve(config, redis_server.url, asset_cache, run_dir, steps, batch)
    run_id = load_config(run_config).run.run_id
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in ("learner", "actor", "teacher-scorer", "teacher-scorer-2"):
            with open(logs / f"{name}.log", "wb") as fh:
                procs[name] = subprocess.Popen(
                    _argv(services[name], run_config), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT
                )
        procs["learner"].wait(timeout=600)
        deadline = time.monotonic() + 60  # the others stop on the learner's stop message
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"== {f.name}\n{f.read_text(errors='replace')[-2500:]}" for f in sorted(logs.iterdir()))
    assert {n: p.returncode for n, p in procs.items()} == dict.fromkeys(procs, 0), tails
    summary = json.loads((run_dir / "learner_summary.json").read_text())
    assert summary["learner_steps"] == steps and summary["trajectories_trained"] == steps * batch, summary
    assert summary["dead_lettered"] == 0, summary
    for service, teacher in (
        ("teacher-scorer", env_vars["OPD_TEACHER"]),
        ("teacher-scorer-2", env_vars["OPD_TEACHER_2"]),
    ):
        log = (logs / f"{service}.log").read_text()
        assert f"consuming {run_id}:rollouts:{teacher}" in log, log[-2000:]
    scored = _scored_by(redis_server.url, run_id)
    by_teacher = {
        t: sum(n for c, n in scored.items() if c.startswith(f"scorer-{t}-")) for t in ("adder", "reverser")
    }
    assert all(n > 0 for n in by_teacher.values()) and sum(by_teacher.values()) >= steps * batch, scored
