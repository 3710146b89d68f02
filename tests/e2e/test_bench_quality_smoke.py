"""The --smoke runs of benchmarks/quality.py and benchmarks/staleness.py, as a user runs them."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _finite(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


@pytest.mark.slow
def test_quality_and_staleness_smoke(tmp_path, asset_cache):
    for script in ("quality", "staleness"):
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / f"{script}.py"),
                "--smoke",
                "--out",
                str(tmp_path),
                "--cache-dir",
                str(asset_cache),
            ],
            cwd=REPO,
            check=True,
            timeout=300,
        )
    q = json.loads((tmp_path / "quality.json").read_text())
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert set(q["methods"]) == {"opd_rkl", "grpo", "offpolicy_kd", "gkd_jsd", "hybrid"}
    assert _finite(q["teacher_accuracy"])
    for name, m in q["methods"].items():
        assert len(m["runs"]) == q["seeds"] == 2
        for key in ("to_90", "to_95"):
            for stat in ("step", "student_tokens", "teacher_tokens", "total_tokens"):
                assert set(m[key][stat]) == {"median", "min", "max"}
                assert all(_finite(v) for v in m[key][stat].values())
        for r in m["runs"]:
            assert [e["step"] for e in r["evals"]] == [0, 2, 4]
            assert all(math.isfinite(e["accuracy"]) for e in r["evals"])
            assert all(math.isfinite(x["loss"]) for x in r["steps"])
        last = m["runs"][0]["evals"][-1]
        if name == "grpo":
            assert last["teacher_tokens"] == 0 and last["student_tokens"] > 0
        elif name == "offpolicy_kd":
            assert last["student_tokens"] == 0 and last["teacher_tokens"] > 0
        else:
            assert last["student_tokens"] == last["teacher_tokens"] > 0
    st = json.loads((tmp_path / "staleness.json").read_text())
    assert (tmp_path / "staleness.png").stat().st_size > 0
    assert len(st["cells"]) == len(st["staleness"]) * len(st["modes"]) == 10
    for key, cell in st["cells"].items():
        s = int(key.split("/")[0])
        assert cell["max_lag"] == min(s, st["steps"] - 1)
        assert math.isfinite(cell["final_accuracy"]) and math.isfinite(cell["reverse_kl"])
