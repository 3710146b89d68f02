"""The report's teacher accuracy under scorer.context is taken on the prompts the scorer shows the teacher: the
evaluation's rendering of each held-out problem equals the scorer's splice of the student's prompt ids."""

from __future__ import annotations

from opd import tasks
from opd.config.scorer import TeacherContext
from opd.config.task import CapitalsTask
from opd.launch.report import teacher_view
from opd.models.prompts import TeacherPrompts, prompt_ids
from tests.chat_models import chatml_tokenizer


def test_teacher_view_renders_what_the_scorer_scores():
    tok = chatml_tokenizer()
    shots = [{"user": "Capital of Peru?", "assistant": "Lima"}]
    contexts = [
        TeacherContext.model_validate({"system_prompt": "Answer with the city only.", "few_shot": shots}),
        TeacherContext.model_validate({"few_shot": shots}),  # the teacher keeps the student's system turn
    ]
    for context, system in [(c, s) for c in contexts for s in (None, "Be brief.")]:
        task = CapitalsTask(system_prompt=system)
        problems = tasks.eval_set(task)[:5]
        heads = TeacherPrompts.build(tok, task, context)
        assert heads.has_context
        for student, teacher in zip(problems, teacher_view(problems, context), strict=True):
            assert prompt_ids(tok, teacher) == heads.teacher_ids(prompt_ids(tok, student))
            assert prompt_ids(tok, teacher) != prompt_ids(tok, student)
