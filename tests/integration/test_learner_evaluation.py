"""Held-out evaluation during training: a time budget bounds it and says how many problems it covered; in background
mode the learner keeps stepping while it runs, and each record names the step and weight version it evaluated,
whose accuracy is the production `evaluate` of that step's checkpoint.

The student is a trained demo model (held-out accuracy 0.84) passed as `pretrained`, so accuracies are far from 0
and move as a high learning rate on random scored trajectories damages it: equal accuracies then mean equal weights.
"""

from __future__ import annotations

import json

import pytest

from broker.zmq import ZmqBroker
from learner.learner import Learner
from learner.state import RunFiles
from opd import tasks
from opd.config import load_config
from opd.models.builds import SHIPPED, evaluate, evaluate_within
from opd.models.loading import load_causal_lm, load_tokenizer
from opd.protocol import Streams, encode
from opd.runtime.lifecycle import StopFlag
from tests.conftest import TINY
from tests.scored import scored_trajectories

MODEL = SHIPPED / "student-66900a69ebdb"  # a 4-layer adder the demo ships, held-out accuracy 0.84
RUN_ID = "eval-test"


def _cfg(tmp_path, broker: str, *overrides: str):
    host, port = broker.removeprefix("tcp://").rsplit(":", 1)
    models = [
        f"{role}.{key}"
        for role in ("student", "teacher")
        for key in ("kind=pretrained", f"name_or_path={MODEL}")
    ]
    return load_config(
        TINY,
        [
            *models,
            f"run.run_id={RUN_ID}",
            f"run.output_dir={tmp_path}",
            f"broker.host={host}",
            f"broker.port={port}",
            "learner.batch_size=3",
            "learner.lr=0.002",
            "learner.warmup_steps=0",
            "learner.lr_schedule=constant",
            "learner.batch_timeout_s=30",
            "learner.max_staleness=16",  # the random trajectories are all of version 0
            "weight_sync.snapshot_every=0",
            *overrides,
        ],
    )


def test_a_budget_ends_an_evaluation_after_its_first_batch_and_counts_the_problems_it_covered():
    model, tok = load_causal_lm(str(MODEL)), load_tokenizer(str(MODEL))
    problems = tasks.eval_set(load_config(TINY).task)
    args = (model, tok, problems, 5, "exact", 16)

    cut = evaluate_within(*args, budget_s=1e-9)  # over before the second batch could start
    cancelled = evaluate_within(*args, cancel=lambda: True)
    full = evaluate_within(*args)

    assert (cut.problems, cut.total, cut.complete) == (16, len(problems), False)
    assert cut.accuracy == evaluate(model, tok, problems[:16], 5, "exact", 16)  # the first 16, counted right
    assert cancelled.problems == 16 and cancelled.accuracy == cut.accuracy
    assert (full.problems, full.complete) == (len(problems), True)
    assert full.accuracy == evaluate(model, tok, problems, 5, "exact", 16) > 0.5


def _train(cfg, broker: str, steps: int) -> list[dict]:
    """Run the learner in this process on `steps` batches of random scored trajectories; its metrics.jsonl."""
    client = ZmqBroker(broker, request_timeout_s=10.0)
    trajs = scored_trajectories(steps * cfg.learner.batch_size, seed=3)
    for t in trajs:
        t.run_id, t.behaviour_temperature, t.teacher_temperature = RUN_ID, 1.0, 1.0
    client.publish(Streams(RUN_ID).scored, [encode(t) for t in trajs])
    client.close()
    learner = Learner(cfg, StopFlag())
    try:
        learner.run()
    finally:
        learner.broker.close()
    return [json.loads(line) for line in (cfg.run.output_dir / "metrics.jsonl").read_text().splitlines()]


def _accuracy_at(cfg, step: int, batch: int, first: int | None = None) -> float:
    """The production evaluation, inline, of the checkpoint saved at `step` (on the first `first` problems)."""
    model, tok = load_causal_lm(str(MODEL)), load_tokenizer(str(MODEL))
    out = cfg.run.output_dir
    RunFiles(out, cfg.learner).load_weights(model, out / "checkpoints" / f"step-{step:06d}")
    problems = tasks.eval_set(cfg.task)[:first]
    return evaluate(model, tok, problems, cfg.sampling.max_new_tokens, "exact", batch)


@pytest.mark.timeout(300)
def test_background_evaluation_lets_steps_go_on_and_records_the_weights_it_evaluated(zmq_broker, tmp_path):
    steps, every = 8, 2
    cfg = _cfg(
        tmp_path,
        zmq_broker,
        f"learner.max_steps={steps}",
        f"learner.eval_every={every}",
        f"learner.checkpoint_every={every}",
        f"learner.keep_checkpoints={steps}",
        "learner.eval_mode=background",
        "learner.eval_batch_size=4",  # 75 generations: an evaluation spans several of these tiny steps
    )
    records = _train(cfg, zmq_broker, steps)

    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # the step record's lag figures count response tokens (every token of version 0 here), trajectories apart
    for r in records:
        assert r["trajectories"] == cfg.learner.batch_size and r["mixed_version_trajectories"] == 0
        assert sum(r["lag_histogram"]) == r["tokens"] and r["versions_per_trajectory"] == 1.0
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals and all(r["eval_mode"] == "background" for r in evals)
    first = evals[0]
    # the learner went on stepping while the first evaluation ran: its result arrived in a later step's record,
    # and the steps in between were logged before it ended
    assert first["step"] > first["eval_step"] == every
    between = [r for r in records if first["eval_step"] < r["step"] < first["step"]]
    assert between and all(r["time"] < first["eval_finished_time"] for r in between)
    assert (
        evals[-1]["step"] == steps
    )  # the last step waits for the one running, so the run's last is recorded
    started = {r["step"] for r in records if "eval_snapshot_seconds" in r}
    skipped = {r["step"] for r in records if r.get("eval_skipped")}
    assert started | skipped == set(range(every, steps + 1, every)) and not started & skipped
    assert {r["eval_step"] for r in evals} == started

    # the evaluated steps' checkpoints, and the next due step's: their weights give different accuracies, so a
    # snapshot of the wrong step would show
    checked = started | {min(started) + every}
    by_step = {s: _accuracy_at(cfg, s, cfg.learner.eval_batch_size) for s in sorted(checked)}
    assert len(set(by_step.values())) > 1
    for r in evals:
        assert r["eval_weight_version"] == r["eval_step"]  # weight_sync.every: 1
        assert (r["eval_problems"], r["eval_problems_total"]) == (300, 300)
        assert r["eval_accuracy"] == by_step[r["eval_step"]], r


@pytest.mark.timeout(300)
def test_inline_evaluation_reports_the_same_fields_in_its_own_step_record(zmq_broker, tmp_path):
    cfg = _cfg(
        tmp_path,
        zmq_broker,
        "learner.max_steps=2",
        "learner.eval_every=2",
        "learner.checkpoint_every=2",
        "learner.eval_budget_s=0.000001",
        "learner.eval_batch_size=8",
    )
    (record,) = [r for r in _train(cfg, zmq_broker, 2) if "eval_accuracy" in r]

    assert record["step"] == record["eval_step"] == 2 and record["eval_mode"] == "inline"
    assert (record["eval_problems"], record["eval_problems_total"]) == (8, 300)  # the budget cut it
    assert record["eval_accuracy"] == _accuracy_at(cfg, 2, 8, first=8)
