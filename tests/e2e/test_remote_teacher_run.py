"""`opd run` with the teacher behind a server speaking SGLang's wire format (tests/fake_sglang.py)."""

from __future__ import annotations

import json

import pytest

from opd.config import load_config
from opd.models.builds import ensure_assets
from tests.conftest import TINY, opd_run
from tests.fake_sglang import FakeSGLang


@pytest.fixture
def server(prepared):
    """The demo's trained teacher behind the SGLang-format server."""
    assets = ensure_assets(load_config(TINY, [f"run.cache_dir={prepared}"]))
    srv = FakeSGLang(assets.teacher.path).start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_opd_run_with_a_remote_sglang_teacher(prepared, server, tmp_path):
    """The demo run with the teacher behind the SGLang-format server: every trained trajectory was scored there."""
    out_dir = tmp_path / "run"
    steps = 6
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={steps}",
        "learner.eval_every=0",
        "scorer.engine=remote",
        f"scorer.remote.url={server.url}",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == steps and s["trajectories_trained"] == steps * 64
    assert s["dead_lettered"] == 0
    assert len(server.requests) >= s["trajectories_scored"] >= s["trajectories_trained"]
    assert "remote teacher: SGLang at" in (out_dir / "logs" / "scorer-0.log").read_text()
