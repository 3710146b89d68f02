"""Issue 18's per-teacher view, its pure parts: the learner's per-teacher trained counts, the exporter's `teacher`
labels, the per-teacher figures shared by `opd top`/summary.json/the report, `opd top`'s teachers table and the
report's per-teacher and per-task tables. The scrape of real endpoints is tests/integration/test_teacher_metrics.py.
"""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from rich.console import Console

from learner.join import combine
from learner.learner import teacher_shares
from opd.config import load_config
from opd.launch.report import _tasks_part
from opd.launch.report_page import RunFiles, routed_teachers, task_names, task_table, teacher_table
from opd.launch.teacher_stats import per_teacher
from opd.launch.top import TopState, render
from opd.runtime.prometheus import Exporter, component_teacher
from tests.unit.test_join import copies_of
from tests.unit.test_protocol import make

TWO = "teachers={adder: {model: {sft_steps: 10}}, reverser: {model: {sft_steps: 10}}}"


def two_teacher_cfg():
    return load_config(None, ["run.run_id=obs", TWO, "routing.default=adder"])


# ------------------------------------------------------------------------------------- learner's counts
def test_teacher_shares_count_each_trajectory_once_by_its_routes_weights():
    joined = combine(copies_of(), {"alpha": 0.25, "beta": 0.75})  # one mixture trajectory
    single = make(teacher_weights={"alpha": 1.0}, teacher_name="alpha")
    unrouted = make(teacher_name="default")  # a run of one teacher
    shares = teacher_shares([joined, single, unrouted])
    assert shares == pytest.approx(
        {
            "trajectories_trained:alpha": 1.25,
            "trajectories_trained:beta": 0.75,
            "trajectories_trained:default": 1,
        }
    )
    assert sum(shares.values()) == pytest.approx(3)  # they sum to trajectories_trained
    partial = replace(joined, teacher_weights={"alpha": 2.0, "beta": 2.0})  # not normalised: still one each
    assert sum(teacher_shares([partial]).values()) == pytest.approx(1)


def test_a_checkpoint_keeps_each_teachers_trained_count_so_shares_survive_a_resume():
    from learner.state import Progress

    counters = {"trajectories_trained": 4.0, "trajectories_trained:adder": 2.5, "join_timeouts:adder": 1.0,
                "weight_syncs": 9.0}  # fmt: skip
    kept = Progress.from_json(Progress(2).to_json(counters), 2, "step-1").counters
    assert kept == {k: v for k, v in counters.items() if k != "weight_syncs"}


# ------------------------------------------------------------------------------------------- exporter
def _value(exporter: Exporter, name: str, **labels: str) -> float | None:
    return exporter.registry.get_sample_value(name, labels)


def test_component_teacher_names_the_pool_of_a_scorer_only():
    assert component_teacher("scorer-3") == "default"
    assert component_teacher("scorer-adder-0") == "adder"
    assert component_teacher("actor-0") == "" and component_teacher("learner") == ""


def test_a_scorers_series_carry_its_teacher_and_each_batch_is_a_latency_observation():
    e = Exporter("scorer-adder-1", teachers=("adder", "reverser"))
    e.add({"trajectories_scored": 8, "tokens_scored": 40, "score_seconds": 0.3, "score_failures": 1})
    e.add({"trajectories_scored": 8, "tokens_scored": 40, "score_seconds": 0.5})
    me = {"component": "scorer-adder-1", "teacher": "adder"}
    assert _value(e, "opd_tokens_total", **me, stage="scored") == 80
    assert _value(e, "opd_errors_total", **me, kind="teacher_failure") == 1
    assert _value(e, "opd_score_seconds_count", **me) == 2
    assert _value(e, "opd_score_seconds_sum", **me) == pytest.approx(0.8)
    assert _value(e, "opd_component_up", **me) == 1
    one = Exporter(
        "scorer-0"
    )  # a run of one teacher: the `default` pool, so per-teacher panels still show it
    one.add({"tokens_scored": 5})
    assert _value(one, "opd_tokens_total", component="scorer-0", teacher="default", stage="scored") == 5


def test_the_learner_exports_each_pools_depths_and_trained_share_with_bounded_labels():
    e = Exporter("learner", teachers=("adder", "reverser"))
    depths = {"rollouts": 7, "scored": 3, "rollouts:adder": 5, "rollouts:reverser": 2, "scored:adder": 1,
              "scored:reverser": 2, "scored:intruder": 9}  # fmt: skip
    e.step({"step": 1}, depths)
    q = "opd_teacher_queue_depth"
    assert _value(e, q, component="learner", teacher="adder", kind="rollouts") == 5
    assert _value(e, q, component="learner", teacher="reverser", kind="scored") == 2
    assert _value(e, q, component="learner", teacher="other", kind="scored") == 9  # not a pool: not a label
    e.add(
        {"trajectories_trained:adder": 1.5, "trajectories_trained:reverser": 2.5, "trajectories_trained:x": 1,
         "join_timeouts:reverser": 2}
    )  # fmt: skip
    t = "opd_teacher_trajectories_trained_total"
    assert _value(e, t, component="learner", teacher="adder") == 1.5
    # a mixture's join timed out without reverser's copy: reverser's failure, counted by the learner
    assert _value(e, "opd_errors_total", component="learner", teacher="reverser", kind="join_timeout") == 2
    assert _value(e, t, component="learner", teacher="other") == 1
    one = Exporter("learner")  # one teacher: its whole streams are the default teacher's
    one.step({"step": 1}, {"rollouts": 4, "scored": 1})
    assert _value(one, q, component="learner", teacher="default", kind="rollouts") == 4


# ------------------------------------------------------------------------------- per-teacher figures
COMPONENTS = {
    "actor-0": {"trajectories_generated": 500},
    "scorer-adder-0": {"trajectories_scored": 100, "tokens_scored": 400, "score_seconds": 2.0,
                       "score_batches": 4, "score_failures": 1, "dead_lettered": 2},
    "scorer-adder-1": {"trajectories_scored": 60, "tokens_scored": 240, "score_seconds": 1.0, "score_batches": 2},
    "scorer-reverser-0": {"trajectories_scored": 90, "tokens_scored": 450, "score_seconds": 3.0,
                          "score_batches": 3},
}  # fmt: skip
LEARNER = {
    "trajectories_trained:adder": 150.0,
    "trajectories_trained:reverser": 50.0,
    "join_timeouts:reverser": 1,
}


def test_per_teacher_sums_each_pool_and_shares_what_was_trained():
    rows = per_teacher(["adder", "reverser"], COMPONENTS, LEARNER)
    a, r = rows["adder"], rows["reverser"]
    assert a["scorers"] == 2 and a["tokens_scored"] == 640 and a["failures"] == 3
    assert r["join_timeouts"] == 1 and r["failures"] == 1  # the learner's join timeout is reverser's failure
    assert a["batch_seconds"] == pytest.approx(0.5) and r["batch_seconds"] == pytest.approx(1.0)
    assert a["share"] == pytest.approx(0.75) and r["share"] == pytest.approx(0.25)
    assert per_teacher(["adder"], {}, None)["adder"]["share"] is None  # nothing trained yet


# --------------------------------------------------------------------------------------------- opd top
def _records():
    out = []
    for name, rec in COMPONENTS.items():
        for uptime, scale in ((1.0, 0.5), (3.0, 1.0)):  # two records 2 s apart: rates over them
            out.append({"component": name, "incarnation": "i", "uptime": uptime,
                        **{k: v * scale for k, v in rec.items()}})  # fmt: skip
    out.append({"component": "learner", "incarnation": "l", "uptime": 3.0, "step": 5, **LEARNER})
    return out


def _render(cfg, state) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(render(state, cfg))
    return console.file.getvalue()


def test_top_shows_a_teachers_table_for_several_teachers_only():
    state = TopState()
    for rec in _records():
        state.ingest(rec)
    state.teacher_depths = {"adder": {"rollouts": 12, "scored": 3}, "reverser": {"rollouts": 0, "scored": 1}}
    out = _render(two_teacher_cfg(), state)
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 8}
    adder, reverser = rows["adder"].split("│")[2:10], rows["reverser"].split("│")[2:10]
    # scorers, tok/s ((400 + 240) / 2 / 2 s), rollouts, scored, batch s (1.5 s / 3 batches), failed, share
    assert [c.strip() for c in adder][:7] == ["2", "160", "12", "3", "0.500", "3", "75.0%"]
    assert [c.strip() for c in reverser][:7] == ["1", "112", "0", "1", "1.000", "1", "25.0%"]
    assert "teachers" not in _render(load_config(None, ["run.run_id=obs"]), state)  # one teacher: unchanged


# ------------------------------------------------------------------------------------------- the report
SUMMARY = {
    "student_accuracy_before_by_task": {"addition": 0.07, "reversal": 0.41},
    "student_accuracy_after_by_task": {"addition": 0.34, "reversal": 1.0},
    "teacher_accuracies_by_task": {"adder": {"addition": 0.97, "reversal": 0.0},
                                   "reverser": {"addition": 0.0, "reversal": 1.0}},
    "teachers": per_teacher(["adder", "reverser"], COMPONENTS, LEARNER),
}  # fmt: skip
CONFIG = {"routing": {"field": "task", "routes": {"addition": {"adder": 1}}, "default": "reverser"}}


def _files(tmp_path) -> RunFiles:
    records = [{"step": 50, "eval_accuracy": 0.3, "eval_accuracy/addition": 0.02, "eval_accuracy/reversal": 0.6},
               {"step": 100, "eval_accuracy": 0.5, "eval_accuracy/addition": 0.1, "eval_accuracy/reversal": 0.9}]  # fmt: skip
    return RunFiles(tmp_path, records=records, summary=SUMMARY, config=CONFIG)


def test_report_tables_per_task_and_per_teacher(tmp_path):
    files = _files(tmp_path)
    assert task_names(files) == ["addition", "reversal"]
    assert routed_teachers(files, "addition") == ["adder"] and routed_teachers(files, "reversal") == [
        "reverser"
    ]
    assert (
        routed_teachers(RunFiles(tmp_path, config={}), "addition") is None
    )  # not routed by task: every teacher
    tasks = task_table(files)
    assert "<td>addition</td><td>0.07</td><td>0.1</td><td>0.34</td><td>0.97</td><td>0</td>" in tasks
    teachers = teacher_table(files.summary)
    assert "<td>adder</td><td>2</td><td>160</td><td>640</td>" in teachers and "75.0%" in teachers
    assert "<td>reverser</td><td>1</td>" in teachers and "25.0%" in teachers
    assert task_table(RunFiles(tmp_path)) == "" and teacher_table({}) == ""  # a single task, one teacher


def test_done_line_names_each_tasks_accuracy_and_its_best_teacher():
    part = _tasks_part(SUMMARY)
    assert (
        part
        == "; per task: addition 0.070 -> 0.340 (best teacher 0.970), reversal 0.410 -> 1.000 (best teacher 1.000)"
    )
    assert _tasks_part({}) == ""


# ---------------------------------------------------------------------------------------------- Grafana
def test_the_dashboards_teacher_panels_split_by_teacher():
    import json
    import re

    from opd.runtime.prometheus import exported_series
    from tests.conftest import REPO

    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "opd-stream.json").read_text())
    panels = [p for p in dash["panels"] if p["title"].lower().startswith("teachers:")]
    topics = " | ".join(p["title"].lower() for p in panels)
    for topic in (
        "scored tokens/s",
        "queue depth",
        "latency",
        "failures",
        "share of trajectories",
        "scorers up",
    ):
        assert topic in topics, topic
    for p in panels:
        for t in p["targets"]:
            assert "{{teacher}}" in t["legendFormat"] and re.search(r"by \(teacher\b", t["expr"]), t
            assert set(re.findall(r"\bopd_[a-z0-9_]+", t["expr"])) <= exported_series(), t["expr"]
