"""Remote teacher (`scorer.engine: remote`) against a real HTTP server speaking SGLang's wire format.

The server (tests/fake_sglang.py) computes logprobs with the project's tiny teacher, so the client's values are
compared with the in-process Hugging Face scorer, not with numbers written into the test.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from opd.config import ConfigError, load_config
from opd.models.builds import ensure_assets
from opd.models.loading import encode_prompt, load_tokenizer
from opd.models.sampler import response_logprobs, sample
from opd.protocol import Trajectory, encode, unpack_control
from teacher_scorers.backends.remote import RemoteTeacher, RemoteTeacherError
from tests.conftest import TINY, free_port, opd_run
from tests.fake_sglang import FakeSGLang

TOPK = 4


def _cfg(cache, url: str, *extra: str):
    return load_config(
        TINY,
        [
            f"run.cache_dir={cache}",
            "scorer.engine=remote",
            f"scorer.remote.url={url}",
            f"scorer.topk={TOPK}",
            "scorer.remote.backoff_s=0.01",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def assets(prepared):
    return ensure_assets(load_config(TINY, [f"run.cache_dir={prepared}"]))


@pytest.fixture
def server(assets):
    srv = FakeSGLang(assets.teacher.path).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trajs(assets) -> list[Trajectory]:
    """Student samples on addition prompts: the token ids a scorer really receives."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(assets.student.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(assets.student.path).eval()
    prompts = [
        encode_prompt(tok, f"{a}+{b}=") for a, b in ((3, 4), (12, 9), (57, 68), (99, 1), (5, 40), (31, 7))
    ]
    gen = torch.Generator().manual_seed(0)
    out = sample(
        student, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=8, generator=gen
    )
    return [
        Trajectory(
            run_id="t",
            prompt_id=f"p{i}",
            group_id=f"g{i}",
            sample_index=0,
            prompt_token_ids=np.asarray(p, dtype=np.int32),
            response_token_ids=np.asarray(s.response_ids, dtype=np.int32),
            behaviour_logprobs=np.asarray(s.behaviour_logprobs, dtype=np.float32),
            policy_version=0,
        )
        for i, (p, s) in enumerate(zip(prompts, out, strict=True))
    ]


def _fresh(trajs: list[Trajectory]) -> list[Trajectory]:
    return [
        Trajectory(**{k: v for k, v in t.__dict__.items() if not k.startswith("teacher_")}) for t in trajs
    ]


def test_sglang_logprobs_equal_the_hf_scorer(prepared, assets, server, trajs):
    from transformers import AutoModelForCausalLM

    batch = _fresh(trajs)
    RemoteTeacher(_cfg(prepared, server.url), assets).score(batch)
    model = AutoModelForCausalLM.from_pretrained(assets.teacher.path).eval()
    tok = load_tokenizer(assets.teacher.tokenizer)
    for t in batch:
        # One sequence per forward, as the server runs it: a padded batch of several shifts float32 values by
        # up to ~4e-5 (different matmul shapes), which is the HF scorer's own batching noise, not the client's.
        seq = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist())]
        lp, tk_ids, tk_lp = response_logprobs(model, seq, pad_id=tok.pad_token_id, topk=TOPK)
        np.testing.assert_allclose(t.teacher_logprobs, lp[0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(t.teacher_topk_ids, tk_ids[0].numpy())
        np.testing.assert_allclose(t.teacher_topk_logprobs, tk_lp[0].numpy(), atol=1e-5, rtol=0)
        assert t.teacher_temperature == 1.0 and assets.teacher.path in t.teacher_id
    # the wire format SGLang documents: ids in, no generation, logprobs from the prompt's last token
    body = server.requests[0]["body"]
    t0 = next(
        t for t in batch if t.prompt_token_ids.tolist() + t.response_token_ids.tolist() == body["input_ids"]
    )
    assert body["sampling_params"]["max_new_tokens"] == 0 and body["return_logprob"] is True
    assert body["logprob_start_len"] == len(t0.prompt_token_ids) - 1
    assert body["top_logprobs_num"] == TOPK and body["return_text_in_logprobs"] is False
    assert len(server.requests) == len(batch)


def test_api_key_is_read_from_the_named_variable(prepared, assets, server, trajs, monkeypatch):
    cfg = _cfg(prepared, server.url, "scorer.remote.api_key_env=OPD_TEST_TEACHER_KEY")
    monkeypatch.delenv("OPD_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(RemoteTeacherError, match="OPD_TEST_TEACHER_KEY.*not set"):
        RemoteTeacher(cfg, assets)
    monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "s3cret")
    RemoteTeacher(cfg, assets).score(_fresh(trajs[:1]))
    assert server.requests[-1]["auth"] == "Bearer s3cret"


@pytest.fixture
def teacher(prepared, assets, server):
    """Build a RemoteTeacher for the fake server with extra config overrides."""
    return lambda *extra: RemoteTeacher(_cfg(prepared, server.url, *extra), assets)


def test_5xx_is_retried_with_backoff(teacher, server, trajs):
    server.faults.extend(["500", "503"])
    batch = _fresh(trajs[:1])
    teacher("scorer.remote.retries=2").score(batch)
    assert len(server.requests) == 3 and batch[0].teacher_logprobs is not None
    server.faults.extend(["500", "500"])
    with pytest.raises(
        RemoteTeacherError, match=r"failed after 2 attempt\(s\); last: HTTP 500: injected"
    ) as e:
        teacher("scorer.remote.retries=1").score(_fresh(trajs[:1]))
    assert server.url in str(e.value) and trajs[0].id in str(e.value)


def test_429_is_retried_and_a_dead_server_is_reported(prepared, assets, server, trajs, teacher):
    server.faults.append("429")
    batch = _fresh(trajs[:1])
    teacher("scorer.remote.retries=1").score(batch)
    assert len(server.requests) == 2 and batch[0].teacher_logprobs is not None
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        RemoteTeacherError, match=rf"{nobody}/get_model_info: .*failed after 2 attempt\(s\); last: Connect"
    ):
        RemoteTeacher(_cfg(prepared, nobody, "scorer.remote.retries=1"), assets)


def test_timeout_is_retried_then_reported(teacher, server, trajs):
    server.faults.append("sleep:1.5")
    batch = _fresh(trajs[:1])
    teacher("scorer.remote.timeout_s=0.5", "scorer.remote.retries=1").score(batch)
    assert batch[0].teacher_logprobs is not None and len(server.requests) == 2
    server.faults.extend(["sleep:1.5", "sleep:1.5"])
    t0 = time.monotonic()
    with pytest.raises(RemoteTeacherError, match=r"timed out after 0.5s \(scorer.remote.timeout_s\)"):
        teacher("scorer.remote.timeout_s=0.5", "scorer.remote.retries=1").score(_fresh(trajs[:1]))
    assert time.monotonic() - t0 < 3.0  # two attempts of 0.5 s, not the server's 3 s


def test_4xx_is_not_retried(teacher, server, trajs):
    server.faults.append("400")
    with pytest.raises(RemoteTeacherError, match=r"HTTP 400 \(not retried\): injected HTTP 400"):
        teacher("scorer.remote.retries=3").score(_fresh(trajs[:1]))
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "fault, message",
    [
        ("drop_meta", r"meta_info is missing"),
        ("drop:input_token_logprobs", r"meta_info.input_token_logprobs is missing"),
        ("drop:input_top_logprobs", r"meta_info.input_top_logprobs is missing"),
        ("short", r"meta_info.input_token_logprobs has \d+ entries, expected \d+"),
        ("nan", r"meta_info.input_token_logprobs\[\d+\]\[0\] is nan, not a log-probability"),
        (
            "wrong_id",
            r"meta_info.input_token_logprobs\[\d+\]\[1\] is token \d+, but response token \d+ is \d+",
        ),
        ("topk_short", r"meta_info.input_top_logprobs\[\d+\] has 3 entries, expected 4"),
        ("topk_bad_id", r"meta_info.input_top_logprobs\[\d+\]\[0\]\[1\] is 1000000000, not a token id"),
    ],
)
def test_malformed_replies_name_the_field_server_and_trajectory(teacher, server, trajs, fault, message):
    server.faults.append(fault)
    with pytest.raises(RemoteTeacherError, match=message) as e:
        teacher().score(_fresh(trajs[:1]))
    assert f"malformed reply from {server.url}/generate for trajectory {trajs[0].id}" in str(e.value)
    assert len(server.requests) == 1  # a malformed reply is not retried in place: the scorer's path decides


def test_concurrency_limit_is_respected(teacher, server, trajs):
    server.delay_s = 0.2
    many = [t for _ in range(3) for t in _fresh(trajs)]  # 18 requests
    teacher("scorer.remote.max_concurrency=3").score(many)
    assert server.max_in_flight == 3
    assert all(t.teacher_logprobs is not None for t in many)


def test_a_malformed_reply_goes_down_the_scorers_failure_path(prepared, server, trajs, zmq_broker):
    """One trajectory whose reply is always broken is dead-lettered with the reason; the others are scored."""
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer

    port = int(zmq_broker.rsplit(":", 1)[1])
    cfg = _cfg(prepared, server.url, f"broker.port={port}", "run.run_id=remote-t")
    bad = trajs[2]
    server.poison[tuple(bad.prompt_token_ids.tolist() + bad.response_token_ids.tolist())] = "nan"
    scorer = Scorer(cfg, 0, StopFlag())
    scorer.broker.publish(scorer.rollouts, [encode(t) for t in _fresh(trajs)])
    msgs = scorer.broker.consume(scorer.rollouts, "scorers", scorer.name, 16, 2.0)
    batch, ids, rejected = scorer._validate(msgs)
    assert len(batch) == len(trajs) and not rejected
    ok, ok_ids = scorer.score_isolating(batch, ids)
    assert [t.id for t in ok] == [t.id for t in trajs if t.id != bad.id]
    assert all(t.teacher_logprobs is not None for t in ok)
    # the batch, then only the bad one again: the others' scores were kept from the failed batch
    assert len(server.requests) == len(trajs) + 1
    dead = scorer.broker.consume(scorer.reporter.dead_stream, "check", "check", 16, 2.0)
    records = [unpack_control(m.data) for m in dead]
    assert len(records) == 1 and records[0]["trajectory_id"] == bad.id
    assert "not a log-probability" in records[0]["reason"] and server.url in records[0]["reason"]


def test_config_refuses_remote_without_url_or_with_temperature():
    with pytest.raises(ConfigError, match="scorer.engine: remote needs scorer.remote.url"):
        load_config(TINY, ["scorer.engine=remote"])
    with pytest.raises(ConfigError, match="set scorer.temperature: 1 or use scorer.engine: hf"):
        load_config(TINY, ["scorer.engine=remote", "scorer.remote.url=http://x:1", "scorer.temperature=0.7"])
    with pytest.raises(ConfigError, match="never put the key itself"):
        load_config(TINY, ["scorer.remote.api_key_env=sk-abc123"])
    with pytest.raises(ConfigError, match="must start with http"):
        load_config(TINY, ["scorer.remote.url=127.0.0.1:30000"])


@pytest.mark.slow
def test_opd_run_with_a_remote_sglang_teacher(prepared, server, tmp_path):
    """The demo run with the teacher behind the SGLang-format server: every trained trajectory was scored there."""
    out_dir = tmp_path / "run"
    steps = 6
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={steps}",
        "learner.eval_every=0",
        "scorer.engine=remote",
        f"scorer.remote.url={server.url}",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == steps and s["trajectories_trained"] == steps * 64
    assert s["dead_lettered"] == 0
    assert len(server.requests) >= s["trajectories_scored"] >= s["trajectories_trained"]
    assert "remote teacher: SGLang at" in (out_dir / "logs" / "scorer-0.log").read_text()
