"""Smoke test of the weight-sync benchmark entry point, at a size that runs in seconds."""

import subprocess
import sys

from tests.conftest import REPO


def test_weight_sync_benchmark_prints_its_ratio_table():
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/weight_sync.py",
            "--sizes",
            "2MB,5MB",
            "--repeats",
            "1",
            "--receivers",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "MB |" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["2 MB", "5 MB"]
    for row in rows:
        ours, raw, mem, vs_raw, vs_mem = (float(x) for x in row.strip("|").split("|")[1:])
        assert min(ours, raw, mem) > 0
        rounding = vs_raw * (0.005 / ours + 0.005 / raw) + 0.006  # the GB/s columns are printed to 0.01
        assert abs(vs_raw - ours / raw) <= rounding, row
        assert "2 receiver(s)" in proc.stdout
