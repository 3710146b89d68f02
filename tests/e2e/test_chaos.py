"""Kill things mid-run on the durable broker and check the books: every generated trajectory is trained exactly
once or accounted for (dead-lettered with a reason, dropped as too stale, or still queued when the run ended)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from opd.protocol import encode
from tests.books import accounting, component_pid
from tests.conftest import TINY, RedisServer, opd, wait_for
from tests.unit.test_protocol import BAD, _mutate, make

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


def _run_args(prepared, out_dir: Path, url: str, *extra: str) -> list[str]:
    return [
        "run",
        TINY,
        f"run.cache_dir={prepared}",
        f"run.output_dir={out_dir}",
        "run.progress=false",
        "learner.batch_size=32",
        "actor.prompts_per_batch=8",
        "learner.eval_every=0",
        "learner.checkpoint_every=5",
        "broker.type=redis",
        f"broker.url={url}",
        "broker.claim_idle_s=1",
        "broker.max_deliveries=2",
        "broker.request_timeout_s=20",
        *extra,
    ]


def _metrics_lines(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_kill_one_of_two_scorers_mid_run(prepared, redis_server, tmp_path):
    out_dir = tmp_path / "run"
    proc = opd(
        *_run_args(prepared, out_dir, redis_server.url, "scorer.num_scorers=2", "learner.max_steps=30")
    )
    wait_for(lambda: _metrics_lines(out_dir) >= 4, 300, "a few learner steps")
    os.kill(component_pid(proc.pid, "scorer", 0), signal.SIGKILL)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "scorer-0 exited with code -9" in log and "continuing on scorer-1" in log
    books = accounting(out_dir, redis_server.url)
    assert books["trained"] == books["trained_unique"] == 30 * 32  # exactly once
    assert books["unaccounted"] == [] and books["trained_not_generated"] == []


def test_kill_the_learner_then_resume(prepared, redis_server, tmp_path):
    out_dir = tmp_path / "run"
    args = _run_args(prepared, out_dir, redis_server.url, "learner.max_steps=24")
    proc = opd(*args)
    wait_for(lambda: _metrics_lines(out_dir) >= 8, 300, "steps past the first checkpoint")
    os.kill(component_pid(proc.pid, "learner"), signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "learner exited with code -9" in log
    resumed = opd(*args, "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["learner_steps"] == 24 and summary["resumed_from"].startswith("step-")
    books = accounting(out_dir, redis_server.url)
    assert books["trained"] == books["trained_unique"] == 24 * 32  # nothing trained twice across the crash
    assert books["unaccounted"] == [] and books["trained_not_generated"] == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out_dir / "student")


def test_kill_an_actor_the_run_continues_and_a_restarted_one_rejoins(prepared, redis_server, tmp_path):
    """Elastic weight sync: the learner drops the dead actor at the next version; one started by hand with the
    run's config registers, joins the next sync epoch and starts from the latest weights."""
    out_dir = tmp_path / "run"
    steps = 250  # long enough for a hand-started actor to load and join while the run goes on
    proc = opd(
        *_run_args(prepared, out_dir, redis_server.url, "actor.num_actors=2", f"learner.max_steps={steps}")
    )
    wait_for(lambda: _metrics_lines(out_dir) >= 6, 300, "a few learner steps")
    os.kill(component_pid(proc.pid, "actor", 0), signal.SIGKILL)
    wait_for(lambda: _metrics_lines(out_dir) >= 16, 300, "steps on the surviving actor")
    restarted_at = _metrics_lines(out_dir)
    rejoined = opd("actor", "--config", str(out_dir / "config.yaml"), "--index", "0")
    log, _ = proc.communicate(timeout=600)
    actor_log, _ = rejoined.communicate(timeout=120)
    assert proc.returncode == 0, log
    assert "actor-0 exited with code -9" in log and "continuing on actor-1" in log
    # the first weights it held: a snapshot it bootstrapped from ("ready: ... weight version N"), else the first
    # broadcast it took out of order ("took weights version N"); versions arriving one by one log nothing
    held = [
        int(x.split(marker)[1].split()[0])
        for x in actor_log.splitlines()
        for marker in ("backend, weight version ", "took weights version ")
        if marker in x
    ]
    first = next((v for v in held if v > 0), None)
    assert rejoined.returncode == 0 and first is not None and first >= restarted_at - 1, actor_log  # not 0
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert min(r.get("weight_sync_members", 2) for r in records[8:-1]) == 1  # synced without the dead actor
    books = accounting(out_dir, redis_server.url)
    assert books["trained"] == books["trained_unique"] == steps * 32
    assert books["unaccounted"] == [] and books["trained_not_generated"] == []


def test_redis_restart_with_aof_loses_at_most_the_last_second(prepared, tmp_path):
    server = (
        RedisServer(tmp_path / "redis", appendonly=True) if (tmp_path / "redis").mkdir() is None else None
    )
    try:
        out_dir = tmp_path / "run"
        proc = opd(*_run_args(prepared, out_dir, server.url, "learner.max_steps=30"))
        wait_for(lambda: _metrics_lines(out_dir) >= 6, 300, "a few learner steps")
        killed_at = time.time()
        server.kill()
        time.sleep(1.0)
        server.start()
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        books = accounting(out_dir, server.url)
        assert books["trained"] == books["trained_unique"] == 30 * 32
        # appendfsync everysec: only what was written in the last second or so before the crash may be gone, and
        # only if Redis never persisted it: an id in the AOF reached Redis and was lost later, by a client
        late = [books["generated_at"][t] for t in books["unaccounted"]]
        assert all(killed_at - 2.5 < t < killed_at + 0.15 for t in late), (killed_at, sorted(late)[:3])
        aof = b"".join(f.read_bytes() for f in sorted((tmp_path / "redis").rglob("*.aof*")))
        assert not [t for t in books["unaccounted"] if t.encode() in aof], "lost after Redis had persisted it"
    finally:
        server.stop()


def _malformed() -> dict[str, bytes]:
    cases = {name: _mutate(fn) for name, (fn, _reason) in BAD.items()}
    cases["garbage bytes"] = b"\x00\xffnot msgpack at all"
    cases["deeply nested"] = b"\x91" * 100_000 + b"\xc0"
    big = make(task={"pad": "x" * 1000})
    cases["100 MB"] = encode(big) + b"\x00" * (100 << 20)
    return cases


def test_malformed_input_and_a_failing_teacher_are_dead_lettered(prepared, redis_server, tmp_path):
    out_dir = tmp_path / "run"
    env = {**os.environ, "OPD_CHAOS_TEACHER_RAISE": "poison"}
    proc = opd(*_run_args(prepared, out_dir, redis_server.url, "learner.max_steps=50"), env=env)
    wait_for(lambda: _metrics_lines(out_dir) >= 2, 300, "the first learner steps")
    run_id = yaml.safe_load((out_dir / "config.yaml").read_text())["run"]["run_id"]
    client = redis.Redis.from_url(redis_server.url)
    bad = _malformed()
    for data in bad.values():
        client.xadd(f"{run_id}:rollouts", {"d": data})
    for name in ("schema", "nan", "vocab range", "garbage bytes"):
        client.xadd(f"{run_id}:scored", {"d": bad[name]})
    poison = make(
        prompt_id="poison", teacher_logprobs=None, teacher_topk_ids=None, teacher_topk_logprobs=None
    )
    poison.prompt_token_ids = np.array([1, 5, 6], dtype=np.int32)
    client.xadd(f"{run_id}:rollouts", {"d": encode(poison)})
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    records = [json.loads(x) for x in (out_dir / "dead_letter.jsonl").read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in records)
    for expected in ("schema_version", "dtype", "NaN or inf", "outside the vocabulary", "2 entries for 3"):
        assert expected in reasons
    assert "exceeds broker.max_message_mb" in reasons and "not a msgpack message" in reasons
    assert len(records) == len(bad) + 4 + 1  # every bad message once, plus the poisoned trajectory
    [failed] = [r for r in records if r.get("trajectory_id") == poison.id]
    assert "failed processing 2 times" in failed["reason"] and failed["replayable"]
    books = accounting(out_dir, redis_server.url)
    assert books["trained"] == books["trained_unique"] == 50 * 32
    assert books["unaccounted"] == []
    listed = opd("dead-letter", "ls", "--config", str(out_dir / "config.yaml"))
    out, _ = listed.communicate(timeout=60)
    assert listed.returncode == 0 and poison.id in out  # still inspectable in Redis after the run
    entry = next(json.loads(x)["entry"] for x in out.splitlines() if poison.id in x)
    # the run is over and its books are balanced; what it left queued may fill rollouts to broker.max_depth
    # (= learner.batch_size), and a replay into a full stream is refused, so make room as a drained run would have
    client.xtrim(f"{run_id}:rollouts", maxlen=0, approximate=False)
    before = client.xlen(f"{run_id}:rollouts")
    replay = opd("dead-letter", "replay", "--config", str(out_dir / "config.yaml"), "--entry", entry)
    out, _ = replay.communicate(timeout=60)
    assert replay.returncode == 0 and "replayed 1 message" in out
    assert client.xlen(f"{run_id}:rollouts") == before + 1  # back where it came from, out of dead_letter
    assert entry not in [_id.decode() for _id, _ in client.xrange(f"{run_id}:dead_letter")]
