"""Smoke run of benchmarks/streaming.py (`--smoke`: stored service times, no opd process, a few seconds).

It checks that the script runs end to end and that what it writes is consistent with itself and with the
simulation's invariants, not the numbers (BENCHMARKS.md "Streaming actors" has those).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

POLICIES = ("batch", "stream_drain", "stream_inflight")


def test_streaming_benchmark_smoke(tmp_path):
    out = tmp_path / "streaming.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/streaming.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.with_suffix(".png").stat().st_size > 1000
    res = json.loads(out.read_text())
    assert res["costs_source"] == "stored defaults" and res["smoke"]
    assert set(res["modes"]) == set(POLICIES)
    setup = res["setup"]
    for name in POLICIES:
        m = res["modes"][name]["mean"]
        assert m["steps"] == setup["steps"] - setup["skip"]
        # trained tok/s is the trained tokens over the window, and the window's tokens were generated in it
        assert m["trained_tokens_per_s"] == pytest.approx(m["trained_tokens"] / m["seconds"])
        assert 0 < m["trained_tokens_per_s"] and 0 <= m["learner_wait_fraction"] <= 1
        assert 0 < m["slot_occupancy"] <= 1
        assert m["actor_decoding_fraction"] + m["actor_applying_fraction"] + m["actor_idle_fraction"] == (
            pytest.approx(1.0)
        )
        hist = m["token_lag_histogram"]
        # the histogram counts every trained token once, and its mean and max are the reported ones
        assert sum(hist) == pytest.approx(m["trained_tokens"] * len(res["seeds"]))
        assert m["token_lag_mean"] == pytest.approx(sum(k * h for k, h in enumerate(hist)) / sum(hist))
        assert m["token_lag_max"] == len(hist) - 1 and hist[-1] > 0
        # nothing trained past learner.max_staleness: the intake drops a trajectory by its oldest token
        assert m["trajectory_lag_max"] <= setup["max_staleness"]
        assert m["token_lag_max"] <= m["trajectory_lag_max"]
    modes = {n: res["modes"][n]["mean"] for n in POLICIES}
    # batch and drain never change weights inside a sequence; in-flight updates do
    assert modes["batch"]["versions_per_trajectory_mean"] == 1.0
    assert modes["stream_drain"]["versions_per_trajectory_mean"] == 1.0
    assert modes["stream_inflight"]["versions_per_trajectory_mean"] > 1.0
    r = res["ratios"]
    assert r["c_over_a_trained_tokens_per_s"] == pytest.approx(
        modes["stream_inflight"]["trained_tokens_per_s"] / modes["batch"]["trained_tokens_per_s"]
    )
    assert r["target_throughput_met"] == (min(r["c_over_a_per_seed"]) >= 1.5)
    assert r["target_lag_mean_met"] == (
        modes["stream_inflight"]["token_lag_mean"] <= modes["batch"]["token_lag_mean"]
    )
    # the drawn lengths follow the flags: median p50, a long tail
    assert res["lengths"]["p50"] == pytest.approx(setup["p50"], rel=0.05)
    assert res["lengths"]["p99"] / res["lengths"]["p50"] == pytest.approx(setup["p99_over_p50"], rel=0.15)
    # without a tail there is nothing for continuous batching to recover: the three policies train alike
    flat = next(row for row in res["sweep"] if row["change"] == {"p99_over_p50": 1.0})
    assert flat["c_over_a"] == pytest.approx(1.0, abs=0.02)
    assert "| (c) stream, update in flight |" in proc.stdout and "target (c) >= 1.5x (a)" in proc.stdout


def test_streaming_simulation_is_deterministic_and_keeps_the_books():
    """Seeded and simulated: the same seed gives the same numbers, another seed other lengths; and every
    trajectory published is trained, dropped as too stale, or still in a stream or held by the scorer at the end,
    exactly once."""
    from benchmarks.streaming import DEFAULT_COSTS, POLICIES, Pipeline, Setup, measure

    setup = Setup(steps=15, skip=3)
    for name, policy in POLICIES.items():
        pipes = [Pipeline(setup, DEFAULT_COSTS, policy, s).run() for s in (0, 0, 1)]
        runs = [measure(p) for p in pipes]
        assert runs[0] == runs[1], name
        assert runs[0]["trained_tokens"] != runs[2]["trained_tokens"], name
        p = pipes[0]
        trained = sum(len(r["trajectory_lags"]) for r in p.steps)
        assert trained == setup.steps * setup.batch_size
        waiting = len(p.outbox) + p.rollouts_depth() + len(p.scored) + len(p.training)
        assert len(p.published) == trained + len(p.dropped) + waiting, name
        assert len({id(q) for _, q in p.published}) == len(p.published)  # none published twice
        # the scorer scores ahead up to a whole batch while the scored stream is full, never beyond one
        assert p.max_holding == setup.scorer_batch, name
        # each published trajectory's token versions cover its length and never go down
        for _, q in p.published:
            assert sum(c for _, c in q.runs) == q.length
            assert [v for v, _ in q.runs] == sorted({v for v, _ in q.runs})


def test_new_weights_benchmark_smoke(tmp_path):
    """benchmarks/new_weights.py --smoke: real harness updates through the slot sampler; recompute is exact (its gap
    is float noise) and continue's gap is what it reports."""
    out = tmp_path / "new_weights.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/new_weights.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    (update,) = res["updates"]
    assert update["recompute_gap_max_nats"] < 1e-4 and update["max_weight_change"] > 0
    assert update["gap_mean_nats"] <= update["gap_max_nats"] == res["gap_max_nats"]
    assert update["recompute_s"] > 0 and update["decode_step_s"] > 0
