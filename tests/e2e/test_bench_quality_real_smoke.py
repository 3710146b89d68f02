"""benchmarks/quality_real.py --smoke, as a user runs it, on the tiny random ChatML Llamas of tests/chat_models.py
in place of SmolLM2 (both pairs: a pruned student healed, and a teacher context): every method runs through the
chat-template prompts, the context splice and the lr sweep, and the results hold what BENCHMARKS.md reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.chat_models import chatml_model_dir
from tests.conftest import REPO

METHODS = {"opd_rkl", "opd_topk", "grpo", "offpolicy_kd", "hybrid"}


def _finite_or_none(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


@pytest.mark.slow
def test_quality_real_smoke(tmp_path):
    model = chatml_model_dir(tmp_path / "tiny", seed=0)
    out = tmp_path / "results"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "quality_real.py"),
            "--smoke",
            "--jobs",
            "1",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--set",
            f"teacher.name_or_path={model}",
            "--set",
            "heal:student.drop_layers=[1]",  # the tiny model has 2 layers
            "--set",
            f"context:student.name_or_path={model}",
        ],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    assert (out / "quality_real.png").stat().st_size > 0
    sweep = json.loads((out / "quality_real_sweep.json").read_text())
    for pair in ("heal", "context"):
        s = json.loads((out / f"quality_real_{pair}.json").read_text())
        assert set(s["methods"]) == METHODS
        base = s["baseline"]
        assert base["teacher_with_context"] == (pair == "context")
        # targets are fractions of the gap between the student's start and the teacher
        for f in (50, 75, 90):
            want = base["student"] + f / 100 * (base["teacher"] - base["student"])
            assert s["targets"][f"gap_{f}"] == pytest.approx(want)
        # the lr sweep ran every swept method at the smoke's lr, and hybrid took opd_rkl's
        swept = {r["method"] for r in sweep["runs"] if r["pair"] == pair}
        assert swept == METHODS - {"hybrid"}
        assert sweep["chosen"][pair]["hybrid"] == sweep["chosen"][pair]["opd_rkl"]
        assert set(s["ratios"]) == {
            f"grpo/{o} gap_{f}" for o in ("opd_rkl", "opd_topk") for f in (50, 75, 90)
        }
        for name, m in s["methods"].items():
            assert [r["seed"] for r in m["runs"]] == [0, 1]
            for key in ("gap_50", "gap_75", "gap_90"):
                for stat in ("step", "student_tokens", "teacher_tokens"):
                    assert all(_finite_or_none(v) for v in m[key][stat].values())
            for r in m["runs"]:
                assert [e["step"] for e in r["evals"]] == [0, 1, 2]
                assert r["evals"][0]["accuracy"] == base["student"]
                assert all(math.isfinite(e["accuracy"]) for e in r["evals"])
                assert all(math.isfinite(x["loss"]) for x in r["steps"])
                last = r["evals"][-1]
                if name == "grpo":  # the teacher is never called
                    assert last["teacher_tokens"] == 0 and last["student_tokens"] > 0
                elif name == "offpolicy_kd":  # the student generates nothing
                    assert last["student_tokens"] == 0 and last["teacher_tokens"] > 0
                else:  # the teacher scored every token the student sampled
                    assert last["student_tokens"] == last["teacher_tokens"] > 0
