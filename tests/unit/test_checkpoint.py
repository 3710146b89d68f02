"""Checkpoints resume the exact optimiser trajectory, and the store keeps only complete, newest state."""

from __future__ import annotations

import copy

import pytest
import torch

from learner.batching import collate
from learner.checkpoint import CheckpointStore
from learner.engines import build_engine
from opd.config import load_config
from tests.scored import scored_trajectories, tiny_model

BASE = ["learner.warmup_steps=2", "learner.lr=1e-2", "learner.batch_size=8", "learner.max_steps=10"]


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _engine_kinds():
    kinds = ["torch"]
    try:
        import deepspeed  # noqa: F401

        kinds += ["deepspeed-0", "deepspeed-2"]
    except ImportError:
        pass
    return kinds


def _config(kind: str):
    over = (
        BASE
        if kind == "torch"
        else [*BASE, "learner.engine=deepspeed", f"learner.deepspeed.zero_stage={kind[-1]}"]
    )
    return load_config(None, over)


@pytest.mark.parametrize("kind", _engine_kinds())
def test_a_resumed_engine_takes_the_same_next_step(kind, tmp_path):
    batches = [collate(scored_trajectories(8, seed=s), 0) for s in range(3)]
    model = tiny_model(0)
    engine = build_engine(model, _config(kind))
    for b in batches[:2]:
        engine.step(copy.deepcopy(b))
    engine.save_state(tmp_path / "engine")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    engine.step(copy.deepcopy(batches[2]))
    expected = _params(model)

    fresh = tiny_model(1)  # different initial weights: everything must come from the checkpoint
    fresh.load_state_dict(weights)
    resumed = build_engine(fresh, _config(kind))
    resumed.load_state(tmp_path / "engine")
    assert resumed.optimizer_steps == 2
    record = resumed.step(copy.deepcopy(batches[2]))
    assert record["lr"] == pytest.approx(engine.current_lr())
    torch.testing.assert_close(_params(fresh), expected, rtol=1e-6, atol=1e-7)


def test_checkpoint_store_is_atomic_keeps_the_newest_and_clears_replayed_steps(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3):
        store.log_step(step, [f"m{step}".encode()])
    assert [s for s, _ in store.replay_after(1)] == [2, 3]

    def write(d):
        (d / "state.json").write_text("{}")

    store.save(2, write)
    assert [s for s, _ in store.replay_after(0)] == [3]  # steps 1-2 are inside the checkpoint now
    store.save(3, write)
    store.save(4, write)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert store.latest().name == "step-000004"

    def crash(d):
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        store.save(5, crash)
    assert store.latest().name == "step-000004"  # a half-written checkpoint is never picked
