"""`--launcher ray` with learner.num_ranks=2 on a local Ray (2 CPUs): the ranks are placed together in one
placement group, each learns its place from the environment the spawner gives it, and they form the group.

The first test drives the production RaySpawner directly with tests/rank_probe.py as each rank's process (the
rendezvous and RankGroup.join of the learner, nothing else): where the ranks land, what they are told, a rank
placed again into its freed bundle, and a group that cannot be placed is refused naming what it asked for. The
second is a whole `opd run --launcher ray` of 2 learner ranks (the pattern of test_ray_launcher.py).
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from opd.config import load_config
from opd.launch.rundir import LaunchError
from opd.launch.supervisor import Slot
from tests.conftest import REPO, TINY, free_port, opd
from tests.e2e.test_ray_launcher import RAY_PROCESS_MARKS, _args, _nothing_left, _processes

pytestmark = pytest.mark.slow


def _wait(proc, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"{proc.name} did not end"
        time.sleep(0.5)
    return proc.returncode


def test_ray_places_the_learner_ranks_together_and_they_form_the_group(tmp_path):
    from opd.launch.ray_launcher import RaySpawner

    overrides = ["learner.num_ranks=2", f"learner.master_port={free_port()}", "learner.collective_timeout_s=60",
                 "ray.num_cpus=2", "ray.actor.num_cpus=0", "ray.scorer.num_cpus=0", "ray.placement_timeout_s=20"]  # fmt: skip
    cfg = load_config(TINY, overrides)
    spawner = RaySpawner(cfg, print)
    try:
        probe = [sys.executable, str(REPO / "tests" / "rank_probe.py"), TINY, *overrides]
        env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        logs = [tmp_path / f"learner-{r}.log" for r in (0, 1)]
        procs = [spawner.start(Slot("learner", r), [*probe, "--index", str(r)], env, logs[r]) for r in (0, 1)]
        assert [_wait(p) for p in procs] == [0, 0], [f.read_text()[-2000:] for f in logs]
        lines = [json.loads(f.read_text().strip().splitlines()[-1]) for f in logs]
        addr = spawner.master_addr
        assert addr and all(r["addr"] == addr for r in lines), (addr, lines)  # bundle 0's node
        assert [(r["rank"], r["world"], r["local_rank"]) for r in lines] == [(0, 2, 0), (1, 2, 0)]
        assert all(r["got"] == "from rank 0" and r["ranks"] == [0, 1] for r in lines), lines

        from ray.util.placement_group import placement_group_table

        table = placement_group_table(spawner.learner_pg)
        assert table["strategy"] == "PACK" and len(table["bundles"]) == 2
        assert all(b == {"CPU": 1.0} for b in table["bundles"].values()), table["bundles"]
        # both CPUs of the local Ray are the ranks' bundles: a rank placed again (a restart) must reuse its own
        # bundle, which only works if its old actor is gone; a probe alone fails its rendezvous, which is fine
        again = spawner.start(Slot("learner", 1), [*probe, "learner.collective_timeout_s=2", "--index", "1"], env,
                              tmp_path / "again.log")  # fmt: skip
        assert _wait(again) != 0  # alone: rank 0 is gone, so its rendezvous times out, but it was placed
    finally:
        spawner.close()

    # a group Ray cannot place (each rank asks for a GPU this Ray does not have) is refused, naming its request
    cfg = load_config(TINY, [*overrides[:-1], "ray.placement_timeout_s=5", "ray.learner.num_gpus=1"])
    spawner = RaySpawner(cfg, print)
    try:
        with pytest.raises(LaunchError, match=r"could not place the 2 learner ranks together.*'GPU': 1"):
            spawner.start(
                Slot("learner", 0), [sys.executable, "-c", "pass", "--index", "0"], {}, tmp_path / "x.log"
            )
    finally:
        spawner.close()


def test_ray_run_with_two_learner_ranks_trains_and_cleans_up(prepared, tmp_path):
    out_dir = tmp_path / "run"
    ray_before = _processes(*RAY_PROCESS_MARKS)
    # 2 CPUs: the two ranks' bundles (0.75 CPU each) and the broker, actor and scorer in what is left
    extra = ("learner.max_steps=4", "learner.num_ranks=2", "ray.learner.num_cpus=0.75", "ray.actor.num_cpus=0.25",
             "ray.scorer.num_cpus=0.25")  # fmt: skip
    proc = opd(*_args(prepared, out_dir, *extra))
    try:
        log, _ = proc.communicate(timeout=800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log
    assert "ray: 2 learner ranks placed together (PACK; rendezvous on " in log, log
    for name in ("learner-0", "learner-1", "actor-0", "scorer-0"):
        assert f"ray: {name} placed" in log, log
    summary = json.loads((out_dir / "learner_summary.json").read_text())
    assert summary["learner_steps"] == 4 and summary["learner_ranks"] == 2
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["learner_ranks"] == 2 and min(r["rank_tokens"]) > 0 for r in records if "step" in r)
    _nothing_left(out_dir, ray_before)
