"""`pipeline:`: lockstep mode (validated at load, staleness 0 in a real run) and the emulated service times."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from opd.config import ConfigError, load_config
from opd.runtime.service_time import pad_to_service_time
from tests.conftest import REPO, TINY


# ------------------------------------------------------------------------------------ config
def test_sync_mode_loads_when_one_generation_round_is_one_batch():
    cfg = load_config(TINY, ["pipeline.mode=sync"])  # tiny: 1 actor x 16 prompts x n 4 = batch 64
    assert cfg.pipeline.mode == "sync"
    assert load_config(TINY).pipeline.mode == "async"


def test_sync_mode_refuses_a_batch_size_no_round_makes():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["pipeline.mode=sync", "actor.num_actors=2"])
    msg = str(err.value)
    assert "actor.num_actors x actor.prompts_per_batch x sampling.n" in msg
    assert "(2 x 16 x 4 = 128)" in msg and "learner.batch_size (64)" in msg
    assert "set learner.batch_size=128" in msg
    load_config(
        TINY, ["pipeline.mode=sync", "actor.num_actors=2", "learner.batch_size=128", "broker.max_depth=128"]
    )
    load_config(TINY, ["actor.num_actors=2"])  # async does not care


def test_sync_mode_needs_weights_after_every_step():
    with pytest.raises(ConfigError, match=r"weight_sync.every: 1 \(got 2\).*set weight_sync.every=1"):
        load_config(TINY, ["pipeline.mode=sync", "weight_sync.every=2"])


def test_pipeline_keys_are_checked_and_documented():
    with pytest.raises(ConfigError, match="pipeline.mode"):
        load_config(TINY, ["pipeline.mode=lockstep"])
    with pytest.raises(ConfigError, match="pipeline.service_time.actor_ms_per_token"):
        load_config(TINY, ["pipeline.service_time.actor_ms_per_token=-1"])
    out = subprocess.run(
        [sys.executable, "-m", "opd", "run", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for key in (
        "pipeline.mode",
        *(f"pipeline.service_time.{s}_ms_per_token" for s in ("actor", "scorer", "learner")),
    ):
        assert key in out


# ------------------------------------------------------------------------------ service time
def test_padding_sleeps_the_remainder():
    t0 = time.perf_counter()
    slept = pad_to_service_time(t0, tokens=50, ms_per_token=4.0)  # 0.2 s of emulated compute
    took = time.perf_counter() - t0
    assert 0.2 <= took < 1.0  # generous upper bound: the machine is shared
    assert 0.15 < slept <= took


def test_padding_counts_the_real_compute_already_done():
    t0 = time.perf_counter()
    time.sleep(0.1)  # "real compute"
    slept = pad_to_service_time(t0, tokens=50, ms_per_token=4.0)
    assert time.perf_counter() - t0 >= 0.2
    assert 0.0 < slept < 0.15


def test_no_padding_when_compute_already_exceeds_or_emulation_is_off():
    calls = []
    started = time.perf_counter() - 1.0  # real compute took 1 s, more than 50 x 4 ms
    assert pad_to_service_time(started, 50, 4.0, sleep=calls.append) == 0.0
    assert pad_to_service_time(time.perf_counter(), 50, 0.0, sleep=calls.append) == 0.0
    assert pad_to_service_time(time.perf_counter(), 0, 4.0, sleep=calls.append) == 0.0
    assert calls == []


def test_padding_uses_the_given_sleep_so_a_stop_cuts_it_short():
    from opd.runtime.lifecycle import StopFlag

    stop = StopFlag()
    stop.set("test")
    t0 = time.perf_counter()
    pad_to_service_time(t0, tokens=1000, ms_per_token=10.0, sleep=stop.wait)  # 10 s unless stop cuts it
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------------------ a real run
