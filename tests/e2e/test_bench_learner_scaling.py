"""The learner scaling benchmark's --smoke run: two real learner ranks (gloo), every table row with consistent
numbers. About 30 s on 2 cores (two processes import torch, transformers and DeepSpeed), hence `slow`."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_learner_scaling_smoke_prints_every_row(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/learner_scaling.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines() if line.startswith("| plain") or
            line.startswith("| calibrated")]  # fmt: skip
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("plain", "1"), ("plain", "2"), ("calibrated", "1"), ("calibrated", "2")
    ]  # fmt: skip
    for r in rows:
        tok_s, speedup, ratio = float(r[2]), float(r[3]), float(r[4])
        assert tok_s > 0 and abs(ratio - speedup / int(r[1])) < 0.006, r
    two = [r for r in rows if r[1].strip() == "2"]
    for r in two:  # both ranks spent some of their step in the all-reduce, and the split was by tokens
        shares = [float(s.strip().rstrip("%")) for s in r[5].split("/")]
        assert len(shares) == 2 and all(0 < s < 100 for s in shares), r
        assert 1.0 <= float(r[6]) < 1.2, r
    result = json.loads(out.read_text())
    assert {r["ranks"] for r in result["scaling"]} == {1, 2}
    gathers = result["gather"]
    if gathers:  # DeepSpeed installed: the ZeRO-3 gather of the xs model took a measurable time
        assert [g["size"] for g in gathers] == ["xs"] and gathers[0]["seconds"] > 0
        assert "| 64x2, vocab 512 |" in proc.stdout
    assert "machine: " in proc.stdout and "load average" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 1000
