"""`opd run configs/tiny.yaml learner.num_ranks=2`: two learner processes train one global batch per step (on the
zmq broker and on Redis); rank 0 alone reads the broker and publishes weights, which the actor receives bit for
bit. With DeepSpeed ZeRO-3: per-rank shards, resume with the same number of ranks, and with another (through
DeepSpeed's universal checkpoint)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import opd_run
from weight_sync.verify import read_digests

pytestmark = pytest.mark.slow
IMBALANCE = 1.1  # tokens of the heavier rank over the mean: the tiny task's sequences are nearly equal


def _records(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _finish(proc) -> str:
    try:
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return log


def _digests_match(out_dir) -> None:
    """The actor took every version the learner published, each bit-identical to the learner's."""
    digests = out_dir / "weight_digests"
    truth = {r["version"]: r["sha256"] for r in read_digests(digests / "learner.jsonl")}
    taken = read_digests(digests / "actor-0.jsonl")
    assert truth and sorted(truth) == list(range(1, max(truth) + 1))
    assert {r["version"] for r in taken} == set(truth)
    for r in taken:
        assert r["sha256"] == truth[r["version"]], r


def test_two_learner_ranks_train_and_publish(prepared, tmp_path):
    """On the default (zmq) broker; two ranks on Redis, with their books, are in test_learner_group_restart.py."""
    out_dir = tmp_path / "run"
    steps = 10
    log = _finish(
        opd_run(
            prepared,
            out_dir,
            "run.progress=false",
            "learner.num_ranks=2",
            f"learner.max_steps={steps}",
            "learner.eval_every=5",
            "learner.checkpoint_every=5",
            "weight_sync.verify_digests=true",
        )
    )
    assert "exited with code" not in log, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == steps and s["learner_ranks"] == 2
    assert s["trajectories_trained"] == steps * 64
    trained = (out_dir / "trained_ids.txt").read_text().split()
    assert len(trained) == len(set(trained)) == steps * 64  # each trained once, by the group
    records = _records(out_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert r["learner_ranks"] == 2 and len(r["rank_step_seconds"]) == 2
        assert all(t > 0 for t in r["rank_tokens"]) and r["rank_token_imbalance"] <= IMBALANCE
        assert all(c > 0 for c in r["rank_comm_seconds"])  # the torch engine's gradient all-reduce, timed
    assert any("eval_accuracy" in r for r in records)
    _digests_match(out_dir)
    logs = {p.name for p in (out_dir / "logs").iterdir()}
    assert {"learner-0.log", "learner-1.log"} <= logs and "learner.log" not in logs


def test_zero3_ranks_resume_with_the_same_number_and_with_another(prepared, tmp_path):
    pytest.importorskip("deepspeed")
    out_dir = tmp_path / "run"
    zero3 = [
        "run.progress=false",
        "learner.num_ranks=2",
        "learner.engine=deepspeed",
        "learner.deepspeed.zero_stage=3",
        "learner.eval_mode=background",  # ZeRO-3 ranks evaluate a gathered copy
        "learner.eval_every=4",
        "learner.checkpoint_every=4",
        "weight_sync.verify_digests=true",
    ]
    log = _finish(opd_run(prepared, out_dir, *zero3, "learner.max_steps=8"))
    assert "exited with code" not in log, log
    shards = sorted(p.name for p in (out_dir / "checkpoints" / "step-000008" / "engine" / "ds").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards  # each rank wrote its own ZeRO shard
    published = [r for r in _records(out_dir) if "weight_gather_seconds" in r]
    assert published and all(r["weight_gather_seconds"] > 0 for r in published)  # ZeRO-3's gather, timed
    _digests_match(out_dir)

    log = _finish(opd_run(prepared, out_dir, "--resume", "learner.max_steps=12"))
    assert "exited with code" not in log, log
    assert [r["step"] for r in _records(out_dir)][-4:] == [9, 10, 11, 12]
    trained = (out_dir / "trained_ids.txt").read_text().split()
    assert len(trained) == len(set(trained)) == 12 * 64  # nothing lost, nothing trained twice

    # another number of ranks: rank 0 converts the ZeRO-3 shards into DeepSpeed's universal checkpoint first
    log = _finish(opd_run(prepared, out_dir, "--resume", "learner.max_steps=14", "learner.num_ranks=1"))
    assert "exited with code" not in log, log
    assert (out_dir / "checkpoints" / "step-000012" / "engine" / "universal" / "zero").is_dir()
    assert (
        "resharded step-000012's engine state from 2 to 1 learner rank(s)"
        in (out_dir / "logs" / "learner.log").read_text()
    )
    assert [r["step"] for r in _records(out_dir)][-2:] == [13, 14]
    trained = (out_dir / "trained_ids.txt").read_text().split()
    assert len(trained) == len(set(trained)) == 14 * 64
