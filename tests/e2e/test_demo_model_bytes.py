"""A deterministic demo-model build: the same recipe gives the same bytes whatever the caller's threads.

The recipe here is shortened (2 teacher layers, 8 SFT steps, untrained student) so the test takes seconds, but it
goes through the production build (`ensure_assets`). Before the build fixed its own thread count, this recipe gave
a different teacher at 3 threads than at 1 (sha256 ebd2eb... against be889c...). Two builds in subprocesses take
about 25 s on 2 cores, hence the slow tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd.models.builds import file_digests
from tests.conftest import REPO, TINY

pytestmark = pytest.mark.slow

SHORT = ("teacher.num_layers=2", "teacher.sft_steps=8", "student.sft_steps=0", "task.eval_size=20")
BUILD = (
    "import sys, torch; n = int(sys.argv[1]); torch.set_num_threads(n); "
    "from opd.config import load_config; from opd.models.builds import ensure_assets; "
    "a = ensure_assets(load_config(sys.argv[2], sys.argv[3:]), log=lambda *_: None); "
    "assert torch.get_num_threads() == n, 'the build must give the caller its thread count back'; "
    "print(a.teacher.path)"
)


def _build(cache: Path, threads: int) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, "-c", BUILD, str(threads), TINY, f"run.cache_dir={cache}", *SHORT]
    out = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


def test_same_recipe_same_bytes_whatever_the_threads(tmp_path):
    one = _build(tmp_path / "one", 1)
    three = _build(tmp_path / "three", 3)
    assert one.name == three.name  # the same recipe
    digests = file_digests(one)
    assert "model.safetensors" in digests
    assert digests == file_digests(three)
