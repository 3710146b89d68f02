"""`opd report`: plots and a self-contained report.html from a run directory, finished or not, seen in Chromium.

The run directories are written in the learner's and launcher's own formats (the step record of
learner/learner.py `_train_step` + `_log`, summary.json of opd/launch/report.py, the resolved config.yaml);
the end-to-end test (tests/e2e/test_report_run.py) reads the page of a real `opd run`.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from opd.config import load_config
from opd.launch.cli import main as opd_main
from opd.launch.report_page import PLOTS, write_report
from tests.browser import Browser, chromium
from tests.conftest import REPO

SECRET = "hunter2-not-for-the-page"
STEPS = 12


def _step_record(step: int) -> dict:
    """One line of metrics.jsonl as the learner writes it."""
    rec = {
        "step": step, "weight_version": step - 1, "time": 1000.0 + step, "loss": -1.4 + 0.1 * step,
        "reverse_kl": 4.0 / step, "reverse_kl_seq_min": 0.1, "reverse_kl_seq_max": 9.0,
        "staleness_mean": 0.5, "staleness_max": 2, "lag_histogram": [400, 200, 40], "dropped_stale": 0,
        "trajectories": 64, "tokens": 640, "step_seconds": 0.6, "service_pad_seconds": 0.0, "wait_seconds": 0.4,
        "trained_tokens_per_s": 640.0,
    }  # fmt: skip
    if step % 4 == 0:
        rec["eval_accuracy"] = step / (STEPS + 4)
    return rec


def _finished_run(out) -> None:
    out.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps(_step_record(i)) + "\n" for i in range(1, STEPS + 1))
    )
    cfg = load_config(
        None, ["run.run_id=rep1", "broker.type=redis", f"broker.url=redis://opd:{SECRET}@db:6379/0"]
    )
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    summary = {
        "run_id": "rep1", "learner_steps": STEPS, "weight_version": STEPS - 1, "trajectories_trained": 768,
        "reverse_kl_first": 2.1, "reverse_kl_last": 0.4, "lag_histogram": [4800, 2400, 480],
        "trajectories_generated": 900, "trajectories_scored": 800, "dead_lettered": 0, "teacher_accuracy": 0.97,
        "student_accuracy_before": 0.0, "student_accuracy_after": 0.75, "wall_seconds": 20.0, "interrupted": False,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary))
    scaling = [{"time": 1000.0 + 2 * i, "event": "interval", "rollouts_depth": 10 * i} for i in range(6)]
    (out / "scaling.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scaling))


def test_a_finished_run_gets_every_plot_the_summary_and_the_redacted_config(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    assert opd_main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(f"{p.name}.png" for p in PLOTS)
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    # self-contained: nothing fetched from anywhere, no script
    assert not re.search(r"""(src|href)=["'](?!data:)""", page) and "<script" not in page
    assert SECRET not in page and "redis://opd:REDACTED@db:6379/0" in page
    assert "did not finish" not in page and "Missing" not in page
    for shown in ("learner_steps", "0.75", "trajectories_generated", "900", "rep1"):
        assert shown in page


def test_an_interrupted_run_gets_a_page_that_names_what_is_missing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lines = [json.dumps(_step_record(i)) for i in range(1, 6)]  # an eval at step 4
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "rev')  # killed mid-write
    page = write_report(out).read_text()
    assert "did not finish" in page
    assert "summary.json: not found" in page and "config.yaml: not found" in page
    assert "metrics.jsonl: 1 unreadable line(s) skipped" in page
    assert page.count("data:image/png;base64,") == len(PLOTS) - 1  # no queue depths were recorded
    assert "no data recorded for this plot" in page
    assert not (out / "plots" / "queues.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "metrics.jsonl: not found" in write_report(empty).read_text()


def test_report_refuses_a_path_that_is_not_a_run_directory(tmp_path, capsys):
    assert opd_main(["report", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_the_page_reads_fields_the_learner_writes():
    """The plots' keys are the learner's: a renamed field would otherwise leave a plot silently empty."""
    learner = (REPO / "learner" / "learner.py").read_text() + (REPO / "learner" / "state.py").read_text()
    for key in ("reverse_kl", "eval_accuracy", "lag_histogram", "wait_seconds", "step_seconds", '"step"'):
        assert key in learner, key
    assert "rollouts_depth=" in (REPO / "opd" / "launch" / "scaling.py").read_text()  # scaling.jsonl


@pytest.fixture
def browser():
    binary = chromium()
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    b = Browser(binary)
    yield b
    b.close()


def test_the_page_loads_in_chromium_with_every_plot_drawn(tmp_path, browser):
    out = tmp_path / "run"
    _finished_run(out)
    images, errors = browser.load(write_report(out))
    assert errors == []
    assert [i["id"] for i in images] == [f"plot-{p.name}" for p in PLOTS]
    assert all(i.get("width", 0) > 0 and i.get("height", 0) > 0 for i in images), images


def test_the_browser_check_sees_a_broken_image_and_a_console_error(tmp_path, browser):
    bad = tmp_path / "bad.html"
    bad.write_text('<img id="x" src="data:image/png;base64,AAAA"><script>console.error("boom")</script>')
    images, errors = browser.load(bad)
    assert "error" in images[0] and "width" not in images[0]
    assert any("boom" in e for e in errors)
