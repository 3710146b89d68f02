"""The real long steps report progress: the demo-model build (its SFT loop and its evaluation) and `evaluate`
print throttled lines with a rate and an ETA through the `log` the launcher and `opd prepare` pass, then a final
line. The recipe is shortened (2 teacher layers, 30 SFT steps, untrained student) so the build takes seconds; the
throttle is lowered so lines come within them."""

from __future__ import annotations

import re

import pytest

from opd import tasks
from opd.config import load_config
from opd.models.builds import ensure_assets, evaluate, load_asset
from opd.runtime import progress
from tests.conftest import TINY

SHORT = ("teacher.num_layers=2", "teacher.sft_steps=30", "student.sft_steps=0", "task.eval_size=20")
LINE = re.compile(r"^building the teacher \(SFT\): (\d+)/30 steps, [\d.]+ steps/s, ETA [\d.]+ s$")


@pytest.fixture
def fast_lines(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line at every step: the throttle has its own unit test


def test_the_demo_model_build_reports_sft_progress_and_its_evaluation(tmp_path, fast_lines):
    cfg = load_config(TINY, [f"run.cache_dir={tmp_path}", *SHORT])
    lines: list[str] = []
    assets = ensure_assets(cfg, log=lines.append)
    counts = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert counts == list(range(1, 30)), lines  # a line per step with the throttle at 0; the last is "done"
    assert any(line.startswith("building the teacher (SFT): done: 30 steps in ") for line in lines), lines
    assert any(line.startswith("evaluating the teacher: done: 20 problems in ") for line in lines), lines
    assert any(line.startswith("building the student (SFT): done: 0 steps") for line in lines), lines

    model, tok = load_asset(assets.teacher)
    problems = tasks.eval_set(cfg.task)
    shown: list[str] = []
    acc = evaluate(model, tok, problems, cfg.sampling.max_new_tokens, "exact", batch=5, log=shown.append)
    assert acc == assets.teacher.eval_accuracy  # the same evaluation, reported or not
    counted = [line.split(",")[0] for line in shown[:-1]]
    assert counted == [f"evaluating the model: {n}/20 problems" for n in (5, 10, 15)], shown
    assert all(re.search(r", [\d.]+ problems/s, ETA [\d.]+ s$", line) for line in shown[:-1]), shown
    assert shown[-1].startswith("evaluating the model: done: 20 problems in "), shown
