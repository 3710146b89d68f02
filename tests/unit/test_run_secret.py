"""Where a component finds the run's weight-sync secret, and the rules it is kept under."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from opd.config import WeightSyncConfig
from opd.runtime import run_secret
from weight_sync import Signer


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(run_secret.ENV_VAR, raising=False)


def test_the_learner_creates_the_run_directory_file_owner_only_and_actors_read_the_same(tmp_path):
    ws = WeightSyncConfig()
    made = run_secret.load(ws, tmp_path, create=True)
    path = tmp_path / run_secret.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run_secret.load(ws, tmp_path) == made  # an actor on the same storage
    assert run_secret.load(ws, tmp_path, create=True) == made  # a resumed learner keeps it
    assert len(made) >= 32


def test_the_environment_wins_and_is_what_a_launcher_hands_its_children(tmp_path, monkeypatch):
    from opd.config import Config

    cfg = Config()
    cfg.run.output_dir = tmp_path
    run_secret.share_with_children(cfg)
    given = os.environ[run_secret.ENV_VAR]
    assert given == (tmp_path / run_secret.FILE_NAME).read_text().strip()
    monkeypatch.setenv(run_secret.ENV_VAR, "another secret of 32 characters!")
    assert run_secret.load(cfg.weight_sync, tmp_path) == "another secret of 32 characters!"
    monkeypatch.setenv(run_secret.ENV_VAR, "short")
    with pytest.raises(run_secret.SecretError):
        run_secret.load(cfg.weight_sync, tmp_path)


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "s"
    path.write_text("a secret of more than sixteen chars\n")
    path.chmod(0o644)
    ws = WeightSyncConfig(secret_file=path)
    with pytest.raises(run_secret.SecretError, match="chmod 600"):
        run_secret.load(ws, tmp_path)
    path.chmod(0o600)
    assert run_secret.load(ws, tmp_path) == "a secret of more than sixteen chars"


def test_an_actor_waits_for_the_learner_to_write_it(tmp_path):
    ws = WeightSyncConfig()
    writer = threading.Timer(0.3, lambda: run_secret.ensure_file(tmp_path / run_secret.FILE_NAME))
    writer.start()
    t0 = time.monotonic()
    assert len(run_secret.load(ws, tmp_path, wait_s=10)) >= 32
    assert time.monotonic() - t0 >= 0.2
    with pytest.raises(run_secret.SecretError, match="OPD_WEIGHT_SYNC_SECRET"):
        run_secret.load(ws, tmp_path / "elsewhere", wait_s=0.1)


def test_signatures_bind_secret_session_and_key():
    a = Signer("one secret of the run, long enough")
    s1, s2 = a.with_session("s1"), a.with_session("s2")
    signed = s1.sign("beat/3", b"7")
    assert s1.unsign("beat/3", signed) == b"7"
    assert s1.unsign("beat/4", signed) is None  # copied to another key
    assert s2.unsign("beat/3", signed) is None  # replayed into another life of the learner
    assert Signer("another secret, long enough too").with_session("s1").unsign("beat/3", signed) is None
    assert s1.unsign("beat/3", b"7") is None  # unsigned
    sealed = s1.seal("g/0", b"address of rank 0")
    assert b"address" not in sealed and s1.unseal("g/0", sealed) == b"address of rank 0"
    assert s1.verify(s1.tag("announce", 3, 2, ["actor-0"]), "announce", 3, 2, ["actor-0"])
    assert not s1.verify(s1.tag("announce", 3, 2, ["actor-0"]), "announce", 3, 2, ["actor-0", "actor-x"])
    assert not s1.verify(None, "announce", 3, 2, [])
