"""deploy/slurm/ with a learner of 2 ranks on the one-node Slurm cluster of test_slurm.py (slurmctld + slurmd on
loopback, started by the test): launch.sh submits the learner job with one task per rank, learner.sbatch starts
them with srun and gives each the rendezvous a scheduler gives (MASTER_ADDR from the job's node list,
RANK=$SLURM_PROCID, WORLD_SIZE=$SLURM_NTASKS), and the run trains to completion over Redis.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import REPO, TINY
from tests.e2e.test_slurm import _job_env, _wait_until_idle, slurm_cluster  # noqa: F401 (a fixture)


@pytest.mark.slow
def test_a_two_rank_learner_job_trains_over_slurm(slurm_cluster, prepared, tmp_path):  # noqa: F811
    run_dir, steps, batch = tmp_path / "run", 6, 32
    env = _job_env(slurm_cluster)
    launch = subprocess.run(
        [str(REPO / "deploy" / "slurm" / "launch.sh"), TINY, f"run.cache_dir={prepared}",
         f"run.output_dir={run_dir}", "run.progress=false", f"learner.max_steps={steps}",
         f"learner.batch_size={batch}", "actor.prompts_per_batch=8", "learner.eval_every=0",
         "learner.checkpoint_every=3", "learner.num_ranks=2", "learner.collective_timeout_s=120"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stdout + launch.stderr
    jobs = dict(re.findall(r"^(\w+) +job (\d+)$", launch.stdout, re.M))
    _wait_until_idle(slurm_cluster, run_dir, timeout=300)

    finished = slurm_cluster.finished_jobs()
    for role, job in jobs.items():
        record = finished.get(job)
        assert record is not None, f"{role} job {job} has no completion record: {finished}"
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), f"{role}: {record}"
    learner = finished[jobs["learner"]]
    assert learner.get("NCPUS") in (None, "2"), learner  # one CPU per task, two tasks
    summary = json.loads((run_dir / "learner_summary.json").read_text())
    assert summary["learner_steps"] == steps and summary["learner_ranks"] == 2, summary
    assert summary["trajectories_trained"] == steps * batch
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r for r in records if "step" in r]
    assert len(steps_seen) == steps
    for r in steps_seen:  # every step was trained by both ranks, each with its share of the tokens
        assert r["learner_ranks"] == 2 and len(r["rank_tokens"]) == 2 and min(r["rank_tokens"]) > 0, r
    # both ranks ran as Slurm tasks of the learner job, rank 1 taking RANK from SLURM_PROCID
    log = (run_dir / "logs" / f"slurm-learner-{jobs['learner']}.out").read_text()
    assert "learner of 2 ranks on localhost, rendezvous at " in log, log[-3000:]
    for rank in (0, 1):
        assert re.search(
            rf"^{rank}: opd: learner rank {rank} of 2 on \S+ \(local rank {rank}\)$", log, re.M
        ), log
    assert re.search(r"^0: \S+ learner INFO saved the final student", log, re.M), log
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert json.loads((checkpoint / "state.json").read_text())["num_ranks"] == 2
    assert (run_dir / "student" / "config.json").exists()
