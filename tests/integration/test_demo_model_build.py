"""Thread counts chosen on purpose, and `opd prepare` finds the shipped models. (That the same recipe gives the
same bytes whatever the caller's threads is the slow tests/e2e/test_demo_model_bytes.py: two builds, 25 s.)"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, TINY, opd


def test_pin_threads_sets_intra_and_inter_op_threads():
    code = (
        "import torch; from opd.runtime.threads import pin_threads; pin_threads(1); "
        "print(torch.get_num_threads(), torch.get_num_interop_threads())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]


def test_opd_prepare_names_the_shipped_models_and_builds_nothing(tmp_path):
    proc = opd("prepare", TINY, f"run.cache_dir={tmp_path}")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "demo_models/teacher-" in out and "demo_models/student-" in out, out
    assert "building" not in out
    assert list(tmp_path.iterdir()) == []
