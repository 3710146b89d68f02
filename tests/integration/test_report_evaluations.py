"""The report page's held-out evaluations: a background evaluation is placed at the step it evaluated (not the later
step whose record carried it), one cut by its time budget says how many problems it covered, and records from
before evaluations named their step still count at their own step."""

from __future__ import annotations

import html
import json
import re

from opd.launch.report_page import write_report


def _record(step: int, **extra) -> dict:
    return {"step": step, "weight_version": step, "time": 1000.0 + step, "reverse_kl": 1.0 / step, **extra}


def _eval(step: int, acc: float, problems: int, **extra) -> dict:
    return {
        "eval_accuracy": acc, "eval_step": step, "eval_weight_version": step, "eval_problems": problems,
        "eval_problems_total": 300, "eval_seconds": 12.5, "eval_mode": "background", **extra,
    }  # fmt: skip


def _rows(page: str) -> list[list[str]]:
    table = re.search(r'<table id="evaluations">(.*?)</table>', page).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]  # after the header
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r)] for r in rows]


def test_the_page_lists_each_evaluation_at_the_step_it_evaluated_with_its_problem_count(tmp_path):
    records = [
        _record(1),
        _record(2, eval_snapshot_seconds=0.1),
        _record(3),
        _record(4, eval_skipped=1),
        _record(5, **_eval(2, 0.25, 300)),  # began at step 2, ended during step 5
        _record(6, eval_snapshot_seconds=0.1),
        _record(8, **_eval(6, 0.5, 40)),  # the budget ran out after 40 problems
        _record(10, eval_accuracy=0.75),  # a record from before evaluations named their step
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    page = write_report(tmp_path).read_text()

    assert _rows(page) == [
        ["2", "2", "0.25", "300 of 300", "12.5", "5", "background"],
        ["6", "6", "0.5", "40 of 300", "12.5", "8", "background"],
        ["10", "10", "0.75", "", "", "10", ""],
    ]
    assert "1 evaluation(s) skipped" in page
    assert "1 evaluation(s) stopped by learner.eval_budget_s cover part of the set" in page
    assert (tmp_path / "plots" / "accuracy.png").is_file()
