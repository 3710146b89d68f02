"""Workers started by hand (no launcher to stop them) do not outlive their learner: an actor or scorer whose
learner has written nothing to the run's `metrics` stream for supervision.learner_silence_s exits 1 with a message
naming the setting (issue 14, multi-host finding 3: after the learner died, every worker ran on for minutes).
In the e2e tier: each waits out the silence limit on purpose (about 15 s)."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from broker.redis import RedisBroker
from opd.protocol import Streams, metrics_record
from tests.conftest import TINY, free_port, opd

pytestmark = pytest.mark.slow
SILENCE_S = 4.0
RUN_ID = "silence-test"


def _overrides(quick_models: list[str], url: str, tmp_path) -> list[str]:
    return [
        *quick_models,
        f"run.run_id={RUN_ID}",
        f"run.output_dir={tmp_path / 'run'}",
        "run.shutdown_grace_s=3",
        "broker.type=redis",
        f"broker.url={url}",
        f"supervision.learner_silence_s={SILENCE_S:g}",
        "supervision.heartbeat_s=1",
        "supervision.liveness_s=2",
    ]


def _fake_learner(url: str, stop: threading.Event) -> threading.Thread:
    """What a live learner leaves on `metrics`: a heartbeat record every half second, until `stop`."""

    def run() -> None:
        client = RedisBroker(url, request_timeout_s=10.0)
        try:
            while not stop.wait(0.5):
                record = metrics_record(component="learner", heartbeat=True, time=time.time())
                client.publish(Streams(RUN_ID).metrics, [record])
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _finish(proc: subprocess.Popen, within_s: float) -> tuple[int | None, str]:
    """The exit code (None: still running after `within_s`, then killed) and the output."""
    try:
        out, _ = proc.communicate(timeout=within_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


def _heard(url: str, component: str) -> bool:
    client = RedisBroker(url, request_timeout_s=10.0)
    try:
        return any(component.encode() in data for _, data in client.entries(Streams(RUN_ID).metrics))
    finally:
        client.close()


def test_a_scorer_runs_while_the_learner_speaks_and_stops_once_it_falls_silent(
    redis_server, quick_models, tmp_path
):
    stop = threading.Event()
    learner = _fake_learner(redis_server.url, stop)
    proc = opd(
        "scorer", "--config", TINY, "--index", "0", *_overrides(quick_models, redis_server.url, tmp_path)
    )
    try:
        deadline = time.monotonic() + 120
        while not _heard(redis_server.url, "scorer-0"):  # its heartbeat: built and running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        time.sleep(SILENCE_S + 2)
        assert proc.poll() is None, (
            f"stopped while the learner was speaking:\n{proc.communicate()[0][-3000:]}"
        )
        stop.set()
        silent_since = time.monotonic()
        code, out = _finish(proc, SILENCE_S + 20)
    finally:
        stop.set()
        learner.join(5)
        if proc.poll() is None:
            proc.kill()
    assert code == 1, (
        f"exit {code} (None: still running {SILENCE_S + 20:.0f}s after the learner fell silent):\n{out[-3000:]}"
    )
    assert "supervision.learner_silence_s" in out, out[-3000:]
    assert time.monotonic() - silent_since >= SILENCE_S - 1


def test_an_actor_whose_learner_never_comes_stops_within_the_limit(redis_server, quick_models, tmp_path):
    """The actor waits for the learner's weight-sync store (weight_sync.timeout_s, here 120 s), a C++ call no stop
    flag reaches: the watch still ends it within learner_silence_s + run.shutdown_grace_s."""
    overrides = _overrides(quick_models, redis_server.url, tmp_path)
    overrides += [f"weight_sync.port={free_port()}", "weight_sync.timeout_s=120"]
    t0 = time.monotonic()
    proc = opd("actor", "--config", TINY, "--index", "0", *overrides)
    code, out = _finish(proc, 90)
    took = time.monotonic() - t0
    assert code == 1, f"exit {code} after {took:.0f}s (None: still running):\n{out[-3000:]}"
    assert "supervision.learner_silence_s" in out, out[-3000:]
    assert took < 90


@pytest.mark.parametrize("silence", ["0"])
def test_learner_silence_s_zero_turns_the_watch_off(silence):
    from opd.config import load_config

    cfg = load_config(TINY, [f"supervision.learner_silence_s={silence}"])
    assert cfg.supervision.learner_silence_s == 0
    with pytest.raises(ValueError, match="learner_silence_s"):
        load_config(TINY, ["supervision.learner_silence_s=1", "supervision.heartbeat_s=1"])
