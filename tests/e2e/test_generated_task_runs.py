"""`opd run` on the generated tasks (capitals, word problems) with chat-template models: the actors draw the
task's training prompts, the teacher scores them (under a context for capitals, as configs/smollm2_context.yaml
does), the learner evaluates the held-out split in the background and the launcher before and after. The models
are the tiny random ChatML Llamas of tests/chat_models.py (SmolLM2's layout), so accuracy stays near 0: this
checks the wiring of every component, in about a minute per run on 2 cores; the SmolLM2 configs themselves are
measured by hand (README, "Real models: SmolLM2")."""

from __future__ import annotations

import json

import pytest

from opd import tasks
from opd.config import CapitalsTask, WordProblemsTask
from tests.chat_models import chatml_model_dir
from tests.conftest import opd_run

pytestmark = pytest.mark.slow
STEPS, BATCH = 4, 16

CONTEXT = (
    'scorer.context={system_prompt: "Answer with the city only.", '
    'few_shot: [{user: "What is the capital of Japan?", assistant: "Tokyo"}]}'
)


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        (CapitalsTask(eval_fraction=0.3, verifier="exact"), [CONTEXT]),
        (WordProblemsTask(eval_size=24), []),
    ],
    ids=["capitals+context", "word_problems"],
)
def test_a_run_on_a_generated_task(tmp_path, task, extra):
    student = chatml_model_dir(tmp_path / "student", seed=0)
    teacher = chatml_model_dir(tmp_path / "teacher", seed=1)
    out_dir = tmp_path / "run"
    settings = [f"task.{k}={v}" for k, v in task.model_dump().items() if v is not None]
    proc = opd_run(
        tmp_path / "cache",
        out_dir,
        *settings,
        "student.kind=pretrained",
        f"student.name_or_path={student}",
        "teacher.kind=pretrained",
        f"teacher.name_or_path={teacher}",
        *extra,
        "sampling.max_new_tokens=8",
        f"learner.max_steps={STEPS}",
        f"learner.batch_size={BATCH}",
        "learner.eval_every=2",
        "learner.eval_mode=background",
        "learner.eval_batch_size=8",
        "actor.prompts_per_batch=4",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == STEPS and s["trajectories_trained"] == STEPS * BATCH
    assert s["dead_lettered"] == 0
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= s[key] <= 1.0, key
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals, records[-1]
    assert {r["eval_problems_total"] for r in evals} == {len(tasks.eval_set(task))}
