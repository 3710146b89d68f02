"""A whole `opd run` against a password-protected Redis leaves the password in one 0600 file of its directory.

The password is given the way a user would (in broker.url); the launcher moves it to secrets/broker.password, its
components connect with broker.password_file, and nothing else it writes (config.yaml, logs, metrics, summary,
ledger, checkpoints) holds it. Issue 14, Low.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.conftest import RedisServer, opd_run

PASSWORD = "e2e-Secret-4f1c9a"


@pytest.mark.slow
def test_a_run_on_a_password_protected_redis_writes_the_password_nowhere_else(prepared, tmp_path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    out_dir = tmp_path / "run"
    try:
        proc = opd_run(
            prepared,
            out_dir,
            "broker.type=redis",
            f"broker.url=redis://:{PASSWORD}@127.0.0.1:{server.port}/0",
            "learner.max_steps=6",
            "learner.eval_every=0",
            "learner.checkpoint_every=3",
        )
        log, _ = proc.communicate(timeout=600)
    finally:
        server.stop()
    assert proc.returncode == 0, log[-4000:]
    assert json.loads((out_dir / "summary.json").read_text())["learner_steps"] == 6

    secret = out_dir / "secrets" / "broker.password"
    assert secret.read_text().strip() == PASSWORD and stat.S_IMODE(secret.stat().st_mode) == 0o600
    holding = [
        str(f) for f in Path(out_dir).rglob("*") if f.is_file() and PASSWORD.encode() in f.read_bytes()
    ]
    assert holding == [str(secret)]
    assert PASSWORD not in log
