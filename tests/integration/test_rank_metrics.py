"""The learner ranks' figures (learner.num_ranks > 1) beyond metrics.jsonl: Prometheus, the report page, `opd top`.

Rank 0's step record holds every rank's step, all-reduce and optimiser seconds and tokens (learner/commands.py
`step_report`); these tests feed records in that format through the production exporter (scraped over real
HTTP), the report writer and opd top's renderer. The Grafana panels' queries run against a real Prometheus in
test_dashboards.py; a whole 2-rank `opd run` is in tests/e2e/test_learner_ranks_run.py.
"""

from __future__ import annotations

import io
import json

from rich.console import Console

from opd.launch.report_page import PLOTS, RANK_PLOT, write_report
from opd.launch.top import TopState, ranks_table, render
from opd.runtime.prometheus import Exporter
from tests.conftest import free_port
from tests.integration.test_dashboards import scrape, value


def _record(step: int, ranks: int = 2) -> dict:
    """A step record as rank 0 writes it (learner/learner.py `_log` with commands.step_report's fields)."""
    rec = {"step": step, "weight_version": step, "time": 1000.0 + step, "loss": 0.1, "reverse_kl": 1.0,
           "step_seconds": 0.5, "wait_seconds": 0.1, "tokens": 600, "lag_histogram": [64]}  # fmt: skip
    if ranks > 1:
        rec.update(
            learner_ranks=ranks,
            rank_step_seconds=[0.4, 0.3],
            rank_tokens=[330, 300],
            rank_token_imbalance=330 / 315,
            rank_comm_seconds=[0.1, 0.05],
            rank_apply_seconds=[0.02, 0.01],
        )
    return rec


def test_prometheus_exports_each_rank_with_a_rank_label():
    exporter = Exporter("learner")
    port = free_port()
    assert exporter.serve("127.0.0.1", port)
    exporter.step(_record(1), {})
    exporter.step(_record(2), {})
    series = scrape(port)
    assert value(series, "opd_learner_ranks", component="learner") == 2
    assert abs(value(series, "opd_learner_rank_token_imbalance") - 330 / 315) < 1e-9
    for rank, (step_s, comm_s, apply_s, tokens) in enumerate(((0.4, 0.1, 0.02, 330), (0.3, 0.05, 0.01, 300))):
        r = str(rank)
        assert value(series, "opd_learner_rank_seconds", rank=r, phase="step") == step_s  # the last step's
        assert value(series, "opd_learner_rank_seconds", rank=r, phase="comm") == comm_s
        assert value(series, "opd_learner_rank_seconds", rank=r, phase="apply") == apply_s
        # running totals over both steps: rate() of these gives tokens/s per rank and the comm share
        assert (
            abs(value(series, "opd_learner_rank_busy_seconds_total", rank=r, phase="comm") - 2 * comm_s)
            < 1e-9
        )
        assert (
            abs(value(series, "opd_learner_rank_busy_seconds_total", rank=r, phase="step") - 2 * step_s)
            < 1e-9
        )
        assert value(series, "opd_learner_rank_tokens_total", rank=r) == 2 * tokens


def test_one_rank_exports_no_rank_series():
    exporter = Exporter("learner")
    port = free_port()
    assert exporter.serve("127.0.0.1", port)
    exporter.step(_record(1, ranks=1), {})
    series = scrape(port)
    assert value(series, "opd_learner_step") == 1
    rank_samples = [n for n, samples in series.items() if n.startswith("opd_learner_rank") and samples]
    assert rank_samples == [], "a one-rank learner must not show empty or zero rank series"


def _run_dir(tmp_path, ranks: int):
    out = tmp_path / f"run{ranks}"
    out.mkdir()
    records = [_record(i, ranks) for i in range(1, 5)]
    records[-1] = {**records[-1], "rank_token_imbalance": 1.25} if ranks > 1 else records[-1]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_report_has_the_ranks_plot_and_table_only_for_several_ranks(tmp_path):
    out = _run_dir(tmp_path, 2)
    page = write_report(out).read_text()
    assert (out / "plots" / f"{RANK_PLOT.name}.png").stat().st_size > 1000
    assert f'id="plot-{RANK_PLOT.name}"' in page
    table = page[page.index('id="learner-ranks"') :]
    rows = table.split("<tr>")[2:4]  # after the header: rank 0, rank 1
    assert [r.split("<td>")[1].split("<")[0] for r in rows] == ["0", "1"]
    assert "0.4" in rows[0] and "25.0%" in rows[0], rows[0]  # comm 0.1 of a 0.4 s step
    assert "0.3" in rows[1] and "16.7%" in rows[1], rows[1]
    assert "mean 1.098, worst 1.250 over 4 steps" in table  # (3 x 330/315 + 1.25) / 4

    single = _run_dir(tmp_path, 1)
    page = write_report(single).read_text()
    assert "learner-ranks" not in page and not (single / "plots" / f"{RANK_PLOT.name}.png").exists()
    assert page.count("data:image/png;base64,") <= len(PLOTS)


def test_opd_top_shows_the_ranks_of_the_last_step():
    from opd.config import load_config

    state = TopState(source="test")
    state.ingest({**_record(3), "component": "learner", "uptime": 3.0})
    table = ranks_table(state)
    assert table is not None and table.row_count == 2
    buf = io.StringIO()
    Console(file=buf, width=100).print(render(state, load_config(None, [])))
    text = " ".join(buf.getvalue().split())
    assert "learner ranks: 2" in text and "token imbalance 1.048 (heaviest rank / mean)" in text, text
    assert "0.400" in text and "0.050" in text and "330" in text
    # the metrics stream carries numbers only: the count and imbalance, and where to find the rest
    state = TopState(source="test")
    rec = {k: v for k, v in _record(3).items() if not isinstance(v, list)}
    state.ingest({**rec, "component": "learner", "uptime": 3.0})
    assert ranks_table(state).row_count == 0
    one = TopState(source="test")
    one.ingest({**_record(3, ranks=1), "component": "learner", "uptime": 3.0})
    assert ranks_table(one) is None
