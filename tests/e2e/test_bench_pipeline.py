"""Smoke runs of benchmarks/pipeline.py and benchmarks/scorers.py: real `opd` processes, a few steps each.

They check that the scripts run end to end and write consistent results, not the numbers (BENCHMARKS.md has those).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _bench(script: str, cache, out) -> str:
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", "--cache-dir", str(cache), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.with_suffix(".png").stat().st_size > 1000
    return proc.stdout


def test_pipeline_benchmark_smoke(prepared, tmp_path):
    out = tmp_path / "pipeline.json"
    stdout = _bench("pipeline.py", prepared, out)
    res = json.loads(out.read_text())
    assert set(res["settings"]) == {"plain", "calibrated"}
    for setting, modes in res["settings"].items():
        assert set(modes) == {"sync", "async"}
        assert modes["sync"]["staleness_max"] == 0  # lockstep
        for m in modes.values():
            assert m["trained_tokens_per_s"] > 0 and 0 <= m["wait_fraction"] <= 1
            # service times are emulated in the calibrated setting only
            assert (m["learner_pad_seconds"] > 0) == (setting == "calibrated")
        r = res["ratios"][setting]
        assert r["async_over_sync_tokens_per_s"] == pytest.approx(
            modes["async"]["trained_tokens_per_s"] / modes["sync"]["trained_tokens_per_s"]
        )
    # calibrated from the plain sync run: the multiple of each stage's measured real cost
    plain = res["settings"]["plain"]["sync"]["stage_ms_per_token"]
    for stage, ms in res["service_time_ms_per_token"].items():
        assert ms == pytest.approx(res["multiple"] * plain[stage])
    assert "| calibrated | async |" in stdout and "async / sync tok/s" in stdout


def test_scorers_benchmark_smoke(prepared, tmp_path):
    out = tmp_path / "scorers.json"
    stdout = _bench("scorers.py", prepared, out)
    res = json.loads(out.read_text())
    for setting in ("plain", "calibrated"):
        rows = res["settings"][setting]
        assert [r["scorers"] for r in rows] == [1, 2]
        assert all(r["scored_tokens_per_s"] > 0 and r["trajectories"] == 128 for r in rows)
        assert rows[0]["ratio_to_ideal"] == pytest.approx(1.0)
    assert res["service_time_ms_per_token"] == pytest.approx(res["multiple"] * res["real_ms_per_token"])
    assert "| calibrated | 2 |" in stdout
