"""The report page of a real `opd run`: written by the launcher at the end, every plot drawn in Chromium."""

from __future__ import annotations

import json

import pytest

from opd.launch.report_page import PLOTS
from tests.browser import Browser, chromium
from tests.conftest import opd_run

pytestmark = pytest.mark.slow


def test_opd_run_ends_with_plots_and_a_report_page(prepared, tmp_path):
    out = tmp_path / "run"
    proc = opd_run(prepared, out, "learner.max_steps=8", "learner.eval_every=4", "scaling.interval_s=0.5")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert f"report: {out / 'report.html'}" in log
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(f"{p.name}.png" for p in PLOTS)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reverse_kl" in r]
    assert steps and all(isinstance(r.get("queue_rollouts"), int) for r in steps), steps[-1]
    page = (out / "report.html").read_text()
    assert "work queue depths at each learner step" in page  # per step, from the learner's own records
    assert "Missing" not in page and "did not finish" not in page, page[:3000]
    binary = chromium()
    if binary is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); the page was written")
    browser = Browser(binary)
    try:
        images, errors = browser.load(out / "report.html")
    finally:
        browser.close()
    assert errors == []
    assert [i["id"] for i in images] == [f"plot-{p.name}" for p in PLOTS]
    assert all(i.get("width", 0) > 0 and i.get("height", 0) > 0 for i in images), images
