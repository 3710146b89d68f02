"""deploy/slurm/ with two teachers on a real one-node Slurm cluster (tests/e2e/test_slurm.py's): launch.sh submits
one scorer job array per teacher (`opd-scorer-<teacher>`, OPD_TEACHER in its environment), one more scorer of one
pool is submitted by hand the documented way, and the run trains to completion with both pools scoring."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import REPO
from tests.e2e.test_slurm import _job_env, _wait_until_idle, slurm_cluster  # noqa: F401 (a fixture)


@pytest.mark.slow
def test_each_teachers_scorers_are_their_own_slurm_jobs(slurm_cluster, asset_cache, tmp_path):  # noqa: F811
    run_dir, steps, batch = tmp_path / "run", 6, 32
    env = _job_env(slurm_cluster)
    launch = subprocess.run(
        [str(REPO / "deploy" / "slurm" / "launch.sh"), str(REPO / "configs" / "two_teachers.yaml"),
         f"run.cache_dir={asset_cache}", f"run.output_dir={run_dir}", "run.progress=false",
         f"learner.max_steps={steps}", f"learner.batch_size={batch}", "actor.prompts_per_batch=8",
         "learner.eval_every=0", "learner.checkpoint_every=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stdout + launch.stderr
    jobs = dict(re.findall(r"^([\w-]+) +job (\d+)$", launch.stdout, re.M))
    assert set(jobs) == {"prepare", "redis", "learner", "actors", "scorers-adder", "scorers-reverser"}, (
        launch.stdout
    )
    run_config = run_dir / "config.yaml"
    extra = subprocess.run(
        ["sbatch", "--parsable", "--job-name=opd-scorer-reverser", "-o",
         str(run_dir / "logs" / "slurm-scorer-reverser-%j.out"), "deploy/slurm/scorer.sbatch", str(run_config)],
        cwd=REPO, env={**env, "OPD_TEACHER": "reverser"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert extra.returncode == 0, extra.stderr
    jobs["extra reverser scorer"] = extra.stdout.strip()

    _wait_until_idle(slurm_cluster, run_dir, timeout=300)

    finished = slurm_cluster.finished_jobs()
    for role, job in jobs.items():
        record = finished.get(job)
        assert record is not None, f"{role} job {job} has no completion record: {finished}"
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), f"{role}: {record}"
        if role.startswith("scorers-") or role.startswith("extra"):
            assert record["Name"] == f"opd-scorer-{'reverser' if 'reverser' in role else 'adder'}", record
    summary = json.loads((run_dir / "learner_summary.json").read_text())
    assert summary["learner_steps"] == steps and summary["trajectories_trained"] == steps * batch, summary
    assert summary["dead_lettered"] == 0, summary
    # each pool's scorers named themselves scorer-<teacher>-<job id> and read their own teacher's queue
    for teacher, job in (("adder", jobs["scorers-adder"]), ("reverser", jobs["scorers-reverser"]),
                         ("reverser", jobs["extra reverser scorer"])):  # fmt: skip
        log = (run_dir / "logs" / f"slurm-scorer-{teacher}-{job}.out").read_text()
        assert f"scorer-{teacher}-{job} INFO ready" in log, log[-2000:]
        assert f":rollouts:{teacher}" in log and "stop message from the learner" in log, log[-2000:]
