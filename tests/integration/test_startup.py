"""Start-up of `opd run` (issue 15, "start in seconds"): what is imported before a config is refused or a broker
answers, the components started while the launcher still looks for the models, and the ready file they wait for.

Timings are not asserted here (a shared 2-core machine makes any limit flaky): `benchmarks/first_run.py` measures
them. These tests check the mechanisms the timings rest on, each of which fails if its cut is undone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from opd.launch.checks import load_run_config
from opd.launch.launcher import MODELS_READY_NAME, Launcher
from opd.launch.rundir import resolve_run
from opd.runtime.lifecycle import MODELS_READY_ENV, StopFlag, wait_for_models
from tests.conftest import REPO, TINY

HEAVY = "sorted(m for m in ('torch', 'transformers') if m in sys.modules)"


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_refused_config_is_answered_before_torch_is_imported():
    """`opd run` with a mistyped key exits 2 without importing torch or transformers (the launcher, whose report
    part loads models, is imported only once the config passed): about a second instead of six."""
    out = _python(
        "import sys\n"
        "from opd.launch.cli import main\n"
        f"code = main(['run', {TINY!r}, 'learner.max_stepz=3'])\n"
        f"print(code, {HEAVY})\n"
    )
    assert out.stdout.split("\n")[-2] == "2 []", out.stdout + out.stderr
    assert "did you mean learner.max_steps" in out.stderr


def test_the_launcher_and_the_broker_process_need_no_torch():
    """The launcher module (until its models thread runs) and `opd broker`'s path (config, then lifecycle's
    die_with_parent) import neither torch nor transformers: the broker answers while the others import theirs."""
    out = _python(
        "import sys\n"
        "import opd.launch.launcher, opd.runtime.lifecycle\n"
        "from opd.launch import cli\n"
        f"args = cli._parse(['broker', '--config', {TINY!r}, 'run.run_id=x', 'broker.port=5555'])\n"
        "cli._component_config(args)\n"
        f"print({HEAVY})\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_wait_for_models_waits_for_the_ready_file_and_honours_stop(tmp_path, monkeypatch):
    ready = tmp_path / "ready"
    monkeypatch.delenv(MODELS_READY_ENV, raising=False)
    assert wait_for_models(StopFlag())  # started by hand: no launcher to wait for

    monkeypatch.setenv(MODELS_READY_ENV, str(ready))
    threading.Timer(0.3, ready.touch).start()
    t0 = time.monotonic()
    assert wait_for_models(StopFlag())
    assert time.monotonic() - t0 >= 0.25

    ready.unlink()
    stop = StopFlag()
    threading.Timer(0.2, stop.set, args=("SIGTERM",)).start()
    assert not wait_for_models(stop)  # stopped while waiting: the component loads nothing


def test_a_component_started_by_opd_run_builds_no_model_before_the_launcher_says_so(tmp_path):
    """A learner started with the ready variable and an empty model cache waits (it would otherwise build the
    teacher and student itself, beside the launcher's build), and a SIGTERM then ends it cleanly, cache empty."""
    cache, log = tmp_path / "cache", tmp_path / "learner.log"
    argv = [sys.executable, "-m", "opd", "learner", "--config", TINY, "run.run_id=gate", "broker.port=5"]
    argv += ["weight_sync.port=6", f"run.cache_dir={cache}", f"run.output_dir={tmp_path / 'run'}"]
    env = {**os.environ, MODELS_READY_ENV: str(tmp_path / "never")}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "waiting for the launcher" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # a learner that went on would now be building into the cache
        assert not cache.exists() or not any(cache.iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "before loading the models" in log.read_text()
    assert not cache.exists() or not any(cache.iterdir())


def test_opd_run_starts_the_components_before_it_has_the_models(tmp_path, quick_models):
    """The learner is spawned before the launcher has looked for the models (their ready file is missing then),
    with the file's path in its environment; once the run ends the file is gone from the run directory. A Ctrl-C
    then, while the components still import, ends the run as interrupted."""
    out = tmp_path / "run"
    cfg = resolve_run(load_run_config(TINY, [*quick_models, f"run.output_dir={out}"]))
    launcher = Launcher(cfg)
    seen: dict[str, object] = {}

    def look_once_the_learner_is_spawned():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sup = launcher.supervisor
            if sup is not None and any(c.role == "learner" for c in sup.components):
                seen["ready_then"] = (out / MODELS_READY_NAME).exists()
                seen["env"] = sup.child_env().get(MODELS_READY_ENV)
                break
            time.sleep(0.001)
        launcher.interrupted = True  # what Ctrl-C does

    threading.Thread(target=look_once_the_learner_is_spawned, daemon=True).start()
    # Interrupted in its first second, the learner is still importing when the launcher's SIGTERM comes, and dies
    # of it: an interrupted run (130), not a failed learner (1).
    assert launcher.run() == 130
    assert seen == {"ready_then": False, "env": str((out / MODELS_READY_NAME).resolve())}
    assert not (out / MODELS_READY_NAME).exists()
    assert Path(launcher.models.ready_file) == out / MODELS_READY_NAME
