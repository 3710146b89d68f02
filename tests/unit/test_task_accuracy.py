"""Per-task held-out accuracy (issue 18): `evaluate_within` and the learner's evaluation report a mixture's
accuracy per task besides the overall one, on a real model (the shipped addition teacher, which knows sums and
not reversal, so the two numbers differ), and `ensure_teacher_assets` finds every pool's teacher."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import yaml

from learner.evaluation import Evaluator
from opd import tasks
from opd.config import load_config
from opd.config.task import MixtureTask
from opd.models.builds import (
    SHIPPED,
    ensure_assets,
    ensure_teacher_assets,
    evaluate,
    evaluate_within,
    load_asset,
)

# the shipped models of configs/tiny.yaml (2-digit addition; the teacher's held-out accuracy is 0.97)
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
MIXTURE = MixtureTask.model_validate(
    {
        "tasks": {
            "addition": {"kind": "addition", "max_digits": 2, "eval_size": 40},
            "reversal": {"kind": "reversal", "eval_size": 40},
        }
    }
)


def _addition_teacher(tmp_path):
    cfg = load_config(TINY, [f"run.cache_dir={tmp_path}"])
    built = []
    asset = ensure_assets(cfg, log=built.append).teacher
    assert built == [] and asset.path.startswith(str(SHIPPED))
    return load_asset(asset)


def test_evaluate_reports_accuracy_per_task_of_a_mixture(tmp_path):
    model, tok = _addition_teacher(tmp_path)
    problems = tasks.eval_set(MIXTURE)
    result = evaluate_within(model, tok, problems, 5, "exact", batch=16)
    assert set(result.by_task) == {"addition", "reversal"}
    assert result.problems_by_task == {"addition": 40, "reversal": 40}
    assert result.by_task["addition"] > 0.8 and result.by_task["reversal"] < 0.2  # an expert of sums only
    assert math.isclose(result.accuracy, sum(result.by_task.values()) / 2)
    alone = evaluate(model, tok, tasks.eval_set(MIXTURE.tasks["addition"]), 5, "exact")
    assert math.isclose(result.by_task["addition"], alone)  # the same problems, the same verdicts
    single = evaluate_within(model, tok, tasks.eval_set(MIXTURE.tasks["addition"]), 5, "exact")
    assert single.by_task == {} and single.problems_by_task == {}  # a single task: the overall number only
    cut = evaluate_within(model, tok, problems, 5, "exact", batch=16, budget_s=1e-9)  # one batch
    assert cut.problems == 16 and cut.problems_by_task == {"addition": 8, "reversal": 8}


def test_learner_evaluation_records_each_tasks_accuracy(tmp_path):
    model, tok = _addition_teacher(tmp_path)
    cfg = load_config(
        None,
        [
            "task={kind: mixture, tasks: {addition: {kind: addition, max_digits: 2, eval_size: 40}, "
            "reversal: {kind: reversal, eval_size: 40}}}",
            "learner.eval_mode=inline",
            "sampling.max_new_tokens=5",
        ],
    )
    ev = Evaluator(cfg, model, tok, contextlib.nullcontext, tasks.eval_set(cfg.task))
    fields = ev.start(step=20, version=3)
    assert fields["eval_problems/addition"] == 40 and fields["eval_problems/reversal"] == 40
    assert fields["eval_accuracy/addition"] > 0.8 > fields["eval_accuracy/reversal"]
    assert math.isclose(
        fields["eval_accuracy"], (fields["eval_accuracy/addition"] + fields["eval_accuracy/reversal"]) / 2
    )


def test_ensure_teacher_assets_gives_every_pool_its_teacher_once(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    model = raw.pop("teacher")  # the shipped teacher, twice
    raw |= {"teachers": {"a": {"model": model}, "b": {"model": model}}, "routing": {"default": "a"}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, [f"run.cache_dir={tmp_path / 'cache'}"])
    built = []
    found = ensure_teacher_assets(cfg, log=built.append)
    assert list(found) == ["a", "b"] and found["a"] == found["b"] and built == []
    assert found["a"].path.startswith(str(SHIPPED)) and found["a"].eval_accuracy is not None
    # the run's config with `teachers` gives its first teacher, not the unused teacher section's default
    assert ensure_assets(cfg, log=built.append).teacher == found["a"] and built == []
