"""A checkpoint file swapped for a crafted pickle is refused before any of it runs (issue 14, Medium-low).

Whoever can write the run directory could otherwise run code in the learner on its next resume: DeepSpeed itself
reads its files with `torch.load(weights_only=False)`. Each test plants a pickle whose unpickling would create a
marker file, resumes, and checks that the load fails with UnsafeCheckpoint and the marker never appears.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from learner.batching import collate
from learner.checkpoint import UnsafeCheckpoint, read_state, write_state
from learner.engines import build_engine
from tests.conftest import REPO
from tests.scored import scored_trajectories, tiny_model
from tests.unit.test_checkpoint import _config, _engine_kinds


class _Planted:
    """Unpickling this opens (creates) the marker file: the smallest stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# The file of each engine's checkpoint that holds the optimiser state (the one worth tampering with).
TARGETS = {
    "torch": "engine.pt",
    "deepspeed-0": "ds/mp_rank_00_model_states.pt",
    "deepspeed-2": "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
}


def _saved_engine(kind: str, path):
    engine = build_engine(tiny_model(0), _config(kind))
    for seed in range(2):
        engine.step(collate(scored_trajectories(8, seed=seed), 0))
    engine.save_state(path)
    return engine


@pytest.mark.parametrize("kind", _engine_kinds())
def test_a_planted_pickle_in_the_engine_state_is_refused_and_never_runs(kind, tmp_path):
    _saved_engine(kind, tmp_path / "engine")
    target = tmp_path / "engine" / TARGETS[kind]
    assert target.exists(), sorted(p.name for p in (tmp_path / "engine").rglob("*"))
    marker = tmp_path / "pwned"
    # the real state plus one planted object: a loader that unpickles freely would accept it and open the marker
    state = torch.load(target, weights_only=False)
    torch.save({**state, "planted": _Planted(str(marker))}, target)

    resumed = build_engine(tiny_model(1), _config(kind))
    with pytest.raises(UnsafeCheckpoint, match="refusing to load"):
        resumed.load_state(tmp_path / "engine")
    assert not marker.exists()


def test_a_planted_rng_file_is_refused(tmp_path):
    write_state(tmp_path, {"step": 3})
    marker = tmp_path / "pwned"
    torch.save({"torch": torch.get_rng_state(), "x": _Planted(str(marker))}, tmp_path / "rng.pt")
    with pytest.raises(UnsafeCheckpoint, match="rng.pt"):
        read_state(tmp_path)
    assert not marker.exists()
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 3}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 DeepSpeed state is GPU-only)")
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_bf16_state_on_gpu_resumes_weights_only(stage, tmp_path):
    """bf16 on CUDA saves another optimizer's state (fragment mappings, fp32 master partitions): it must load too.
    In a fresh interpreter: DeepSpeed's default process group there is NCCL, not this process's gloo one."""
    pytest.importorskip("deepspeed")
    code = f"""
import torch
from learner.batching import collate
from learner.engines import build_engine
from opd.config import load_config
from tests.conftest import REPO
from tests.scored import scored_trajectories, tiny_model
from tests.unit.test_checkpoint import BASE
cfg = load_config(None, [*BASE, "learner.device=cuda", "learner.engine=deepspeed",
                         "learner.deepspeed.zero_stage={stage}", "learner.deepspeed.dtype=bf16"])
engine = build_engine(tiny_model(0, torch.float32).cuda(), cfg)
for seed in range(2):
    engine.step(collate(scored_trajectories(8, seed=seed), 0, "cuda"))
engine.save_state({str(tmp_path / "engine")!r})
resumed = build_engine(tiny_model(0, torch.float32).cuda(), cfg)
resumed.load_state({str(tmp_path / "engine")!r})
assert resumed.optimizer_steps == 2, resumed.optimizer_steps
print("resumed weights-only")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "resumed weights-only" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-4000:]
    )
