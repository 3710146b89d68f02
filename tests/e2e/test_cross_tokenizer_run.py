"""`opd run configs/cross_tokenizer.yaml`: a character student distilled from a BPE teacher (`tokenizer:
different`), in process on zmq, and behind an SGLang-format server on Redis. What only a whole run proves: the
actor's conversation stamp, the scorer's alignment and the learner's step records meet; a server is sent the
teacher's own ids; the alignment figures reach metrics.jsonl and summary.json; nothing is dead-lettered and the
books balance."""

from __future__ import annotations

import json

import pytest

from opd.config import load_config
from opd.models.builds import ensure_assets, ensure_student_asset
from tests.conftest import REPO, opd
from tests.fake_sglang import FakeSGLang

CONFIG = str(REPO / "configs" / "cross_tokenizer.yaml")
STEPS = 6


def _run(cache, out_dir, *overrides: str):
    proc = opd(
        "run",
        CONFIG,
        f"run.cache_dir={cache}",
        f"run.output_dir={out_dir}",
        f"learner.max_steps={STEPS}",
        "learner.eval_every=0",
        "run.progress=false",
        *overrides,
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    return json.loads((out_dir / "summary.json").read_text())


def _check(out_dir, s) -> None:
    assert s["learner_steps"] == STEPS and s["trajectories_trained"] == STEPS * 64 and s["dead_lettered"] == 0
    bpe = s["teachers"]["bpe"]
    per_response = bpe["alignment_student_tokens"] / bpe["alignment_responses"]
    # the BPE merges digits: fewer chunks than the student's tokens, and none failed
    assert 1 <= bpe["chunks_per_response"] < per_response and bpe["alignment_failures"] == 0
    assert 0 < bpe["topk_matched_share"] <= 1
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reverse_kl" in r]
    assert len(steps) == STEPS
    assert all(1 <= r["alignment_chunks_per_response"] < per_response + 1 for r in steps)
    trained = (out_dir / "trained_ids.txt").read_text().split()
    assert len(trained) == len(set(trained)) == STEPS * 64


@pytest.mark.slow
def test_a_character_student_learns_from_a_bpe_teacher_in_process_on_zmq(asset_cache, tmp_path):
    out_dir = tmp_path / "run"
    _check(out_dir, _run(asset_cache, out_dir))


@pytest.mark.slow
def test_a_bpe_teacher_behind_an_sglang_server_on_redis(asset_cache, redis_server, tmp_path):
    """The teacher's model behind the server; this run knows only its tokenizer (teacher kind pretrained)."""
    cfg = load_config(CONFIG, [f"run.cache_dir={asset_cache}"])
    teacher = ensure_assets(cfg).teacher
    ensure_student_asset(cfg)
    srv = FakeSGLang(teacher.path).start()
    try:
        out_dir = tmp_path / "run"
        s = _run(
            asset_cache,
            out_dir,
            "broker.type=redis",
            f"broker.url={redis_server.url}",
            f"teachers.bpe.model={{kind: pretrained, name_or_path: {teacher.path}}}",
            f"teachers.bpe.scorer={{engine: remote, remote: {{url: {srv.url}}}}}",
        )
    finally:
        srv.stop()
    _check(out_dir, s)
    student_vocab = 16  # the character tokenizer's ids; the BPE's go beyond
    sent = [i for r in srv.requests for i in r["body"].get("input_ids", [])]
    assert len(srv.requests) >= s["trajectories_scored"] and max(sent) >= student_vocab
