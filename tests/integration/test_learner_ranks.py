"""Two learner ranks (gloo, real processes) make the same updates as one rank on the same global batches.

tests/ranks_worker.py runs each variant on 2 ranks through the production engine step; here the same variant runs
on one rank in this process, and the two must agree:
- float64 (torch engine): every step's loss to 1e-9 relative, final weights to 1e-10;
- float32 (torch engine; DeepSpeed ZeRO 0-3, and ZeRO-3 on a float64 model: ZeRO keeps float32 master weights, so
  DeepSpeed is never float64 end to end): losses to 1e-6 relative, the first step's (before any update) to 1e-9,
  final weights within 1e-5 after 3 steps, i.e. 0.1% of one step's size (lr 1e-2): a wrong update (a rank's
  gradient missing, averaged instead of summed, a skipped step's gradient carried over) is off by about lr;
  summing in another order leaves ~1e-7.
The second batch carries a NaN on one rank's share: the step is skipped on both ranks, as on one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, free_port
from tests.ranks_worker import EXACT, POISONED, STEPS, VARIANTS, available, train

WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, dict]:
    """Every available variant trained by 2 ranks: name -> {records, params} (rank 0's); "grads": the verdict of
    the gradient-sum check."""
    out = tmp_path_factory.mktemp("ranks")
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # an in-process DeepSpeed test of this session may have set them
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ranks_worker", str(r), "2", port, str(out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=WORKER_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    results = {"grads": (out / "grads.txt").read_text()}
    for name in available():
        saved = torch.load(out / f"{name}.pt", weights_only=True)
        results[name] = {"records": json.loads(saved["records"]), "params": saved["params"]}
    return results


def _one_torch_thread():
    torch.set_num_threads(1)  # as the workers: summation order is part of what float32 compares


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_update_as_one(name, two_ranks):
    if name not in two_ranks:
        pytest.skip("deepspeed is not installed (pip install -e .[deepspeed])")
    before = torch.get_num_threads()
    _one_torch_thread()
    try:
        ref_records, ref_params = train(name, None, 1)
    finally:
        torch.set_num_threads(before)
    got = two_ranks[name]
    exact = name in EXACT
    rel, atol = (1e-9, 1e-10) if exact else (1e-6, 1e-5)
    assert len(got["records"]) == STEPS
    for step, (mine, ref) in enumerate(zip(got["records"], ref_records, strict=True)):
        assert mine["skipped_steps"] == ref["skipped_steps"] == (step >= POISONED), step
        if step == POISONED:
            assert math.isnan(mine["loss"]) and math.isnan(ref["loss"])
            continue
        first = step == 0 and VARIANTS[name][1] == torch.float64  # no update yet: float64 agrees exactly
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-9 if first else rel), step
        assert mine["reverse_kl"] == pytest.approx(ref["reverse_kl"], rel=rel), step
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6 if exact else 1e-4), step
        # rank 0 trained only its share: the split really happened
        assert 0 < mine["rank_tokens"] < ref["rank_tokens"], step
    torch.testing.assert_close(got["params"], ref_params, rtol=0, atol=atol)


def _pair(mode: str, tmp_path) -> tuple[list[subprocess.Popen], list[str]]:
    """Both ranks of tests/ranks_worker.py in a failure `mode`; rank 1 is killed once rank 0 has ended."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ranks_worker", str(r), "2", port, str(tmp_path), mode],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outs = [procs[0].communicate(timeout=120)[0]]  # imports take most of it
        procs[1].kill()  # stalled, or already gone
        outs.append(procs[1].communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


@pytest.mark.parametrize("mode", ["die", "stall"])
def test_a_lost_rank_fails_the_other_within_the_timeout(mode, tmp_path):
    """Rank 1 exits (`die`) or stops answering (`stall`) while rank 0 waits in a collective: rank 0 raises
    RankLost naming itself and the collective, within learner.collective_timeout_s (3 s here), instead of hanging."""
    procs, (out, _) = _pair(mode, tmp_path)
    assert procs[0].returncode == 3, out[-3000:]
    assert "RankLost: learner rank 0 of 2: agreeing on a step failed" in out
    # a dead rank on this host is named; a stalled one is alive, so only the timeout is
    assert ("learner rank(s) [1] exited" in out) == (mode == "die"), out[-3000:]


def test_gradients_are_summed_over_the_ranks(two_ranks):
    """The torch engine's reduction: a gradient of both ranks is summed, one of rank 1 only reaches rank 0, and a
    parameter no rank reached keeps no gradient (AdamW then leaves it alone, as on one rank)."""
    assert two_ranks["grads"] == "ok"
