"""Shared fixtures: free ports, a shared cache of built tiny models, an embedded broker process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def asset_cache() -> Path:
    """One cache of built teacher/student for the whole session (they take a minute to train)."""
    path = Path(os.environ.get("OPD_TEST_CACHE", REPO / ".cache" / "test-assets"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def zmq_broker():
    """A real broker process on a free port; yields its address and stops it afterwards (by PID)."""
    from broker.zmq_broker import ZmqBroker

    port = free_port()
    code = (
        "from broker.zmq_broker import serve; "
        f"serve('tcp://127.0.0.1:{port}', max_depth=32, log_maxlen=64, max_message_bytes=1<<20)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    address = f"tcp://127.0.0.1:{port}"
    client = ZmqBroker(address, request_timeout_s=0.5)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
    client.close()
    yield address
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
