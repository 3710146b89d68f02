"""The --smoke run of benchmarks/cross_tokenizer.py, as a user runs it: both methods train, the three scorers
are timed on the same trajectories, and the identity alignment's chunks are one per token."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_cross_tokenizer_benchmark_smoke(tmp_path, asset_cache):
    out = tmp_path / "cross_tokenizer.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "cross_tokenizer.py"),
            "--smoke",
            "--out",
            str(out),
            "--cache-dir",
            str(asset_cache),
        ],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    r = json.loads(out.read_text())
    assert set(r["methods"]) == {"same", "cross"}
    for m in r["methods"].values():
        [run] = m["runs"]
        assert run["evals"][-1]["step"] == r["steps"]
    s = r["scoring"]
    assert s["identity"]["chunks_per_response"] == pytest.approx(s["student_tokens"] / s["trajectories"])
    assert s["cross"]["chunks_per_response"] <= s["identity"]["chunks_per_response"]
    assert s["cross_vs_same"] > 0 and s["identity_vs_same"] > 0
