"""Remote teacher (`scorer.engine: remote`) against a real HTTP server speaking SGLang's wire format.

The server (tests/fake_sglang.py) computes logprobs with the project's tiny teacher, so the client's values are
compared with the in-process Hugging Face scorer, not with numbers written into the test. Retries are the
scorer's (`score_with_retries`, `RetryPolicy`); the backend only says whether a failure is retryable, so the
retry tests run the backend under the scorer's policy, with the delays recorded instead of slept.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from opd.config import ConfigError, load_config
from opd.models.builds import ensure_assets
from opd.models.loading import encode_prompt, load_tokenizer
from opd.models.sampler import response_logprobs, sample
from opd.protocol import Trajectory, encode, unpack_control
from teacher_scorers.backends import PartlyScored, TeacherError, build_teacher
from teacher_scorers.backends.sglang import SGLangTeacher
from teacher_scorers.scorer import RetryPolicy, score_with_retries
from tests.conftest import TINY, free_port
from tests.fake_sglang import FakeSGLang

TOPK = 4


def _cfg(models: list[str], url: str, *extra: str):
    return load_config(
        TINY,
        [
            *models,
            "scorer.engine=remote",
            f"scorer.remote.url={url}",
            f"scorer.topk={TOPK}",
            "scorer.remote.backoff_s=0.01",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def assets(quick_models):
    return ensure_assets(load_config(TINY, quick_models))


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


def _policy(teacher: SGLangTeacher) -> RetryPolicy:
    return RetryPolicy.from_config(teacher.cfg.scorer.remote)


def test_sglang_logprobs_equal_the_hf_scorer(quick_models, assets, server, trajs):
    from transformers import AutoModelForCausalLM

    batch = _fresh(trajs)
    teacher = build_teacher(
        _cfg(quick_models, server.url), assets
    )  # engine: remote, api: sglang (the default)
    assert isinstance(teacher, SGLangTeacher)
    teacher.score(batch)
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
        assert t.teacher_tail_logprobs is None  # a server returns only the top-k: the learner falls back
    # the wire format SGLang documents: ids in, no generation, logprobs from the prompt's last token
    body = server.requests[0]["body"]
    t0 = next(
        t for t in batch if t.prompt_token_ids.tolist() + t.response_token_ids.tolist() == body["input_ids"]
    )
    assert body["sampling_params"]["max_new_tokens"] == 0 and body["return_logprob"] is True
    assert body["logprob_start_len"] == len(t0.prompt_token_ids) - 1
    assert body["top_logprobs_num"] == TOPK and body["return_text_in_logprobs"] is False
    assert len(server.requests) == len(batch)


def test_api_key_is_read_from_the_named_variable(quick_models, assets, server, trajs, monkeypatch):
    cfg = _cfg(quick_models, server.url, "scorer.remote.api_key_env=OPD_TEST_TEACHER_KEY")
    monkeypatch.delenv("OPD_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(TeacherError, match="OPD_TEST_TEACHER_KEY.*not set") as e:
        SGLangTeacher(cfg, assets)
    assert not e.value.retryable
    monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "s3cret")
    SGLangTeacher(cfg, assets).score(_fresh(trajs[:1]))
    assert server.requests[-1]["auth"] == "Bearer s3cret"


@pytest.fixture
def teacher(quick_models, assets, server):
    """Build an SGLang teacher for the fake server with extra config overrides."""
    return lambda *extra: SGLangTeacher(_cfg(quick_models, server.url, *extra), assets)


def test_the_backend_itself_never_retries(teacher, server, trajs):
    """A 5xx is reported once, as retryable, with the others of the batch scored: retrying is the scorer's job."""
    server.faults.append("503")
    batch = _fresh(trajs[:3])
    with pytest.raises(PartlyScored) as e:
        teacher("scorer.remote.retries=3").score(batch)
    assert len(server.requests) == 3 and list(e.value.failures) in ([0], [1], [2])
    (failed, exc), *_ = e.value.failures.items()
    assert isinstance(exc, TeacherError) and exc.retryable and exc.reason.startswith("HTTP 503: injected")
    assert batch[failed].teacher_logprobs is None
    assert all(t.teacher_logprobs is not None for i, t in enumerate(batch) if i != failed)


def test_5xx_is_retried_with_backoff(teacher, server, trajs):
    server.faults.extend(["500", "503"])
    batch, slept = _fresh(trajs[:1]), []
    t = teacher("scorer.remote.retries=2", "scorer.remote.backoff_s=0.2")
    assert score_with_retries(t.score, batch, _policy(t), sleep=slept.append) == {}
    assert len(server.requests) == 3 and batch[0].teacher_logprobs is not None
    # exponential backoff with +-20% jitter: 0.2 s, then 0.4 s
    assert len(slept) == 2 and 0.16 <= slept[0] <= 0.24 and 0.32 <= slept[1] <= 0.48
    server.faults.extend(["500", "500"])
    t = teacher("scorer.remote.retries=1")
    failures = score_with_retries(t.score, _fresh(trajs[:1]), _policy(t), sleep=slept.append)
    assert list(failures) == [0]
    assert re.search(r"failed after 2 attempt\(s\); last: HTTP 500: injected", failures[0])
    assert server.url in failures[0] and trajs[0].id in failures[0]


def test_backoff_jitters_and_is_capped():
    policy = RetryPolicy(retries=10, backoff_s=1.0, max_backoff_s=5.0)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):  # doubling, capped at 5 s
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays), (attempt, min(delays), max(delays))
        assert len({round(d, 6) for d in delays}) > 100  # jittered, not one fixed delay


def test_429_is_retried_and_a_dead_server_is_reported(quick_models, assets, server, trajs, teacher):
    server.faults.append("429")
    batch = _fresh(trajs[:1])
    t = teacher("scorer.remote.retries=1")
    assert score_with_retries(t.score, batch, _policy(t), sleep=lambda s: None) == {}
    assert len(server.requests) == 2 and batch[0].teacher_logprobs is not None
    nobody = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(quick_models, nobody, "scorer.remote.retries=1")
    slept = []
    with pytest.raises(
        TeacherError,
        match=rf"{nobody}/get_model_info for the model info request: failed after 2 attempt\(s\); last: Connect",
    ):
        RetryPolicy.from_config(cfg.scorer.remote).call(
            lambda: build_teacher(cfg, assets), sleep=slept.append
        )
    assert len(slept) == 1  # start-up is retried under the same policy as scoring


def test_timeout_is_retried_then_reported(teacher, server, trajs):
    server.faults.append("sleep:1.5")
    batch = _fresh(trajs[:1])
    t = teacher("scorer.remote.timeout_s=0.5", "scorer.remote.retries=1")
    assert score_with_retries(t.score, batch, _policy(t)) == {}
    assert batch[0].teacher_logprobs is not None and len(server.requests) == 2
    server.faults.extend(["sleep:1.5", "sleep:1.5"])
    t0 = time.monotonic()
    failures = score_with_retries(t.score, _fresh(trajs[:1]), _policy(t), sleep=lambda s: None)
    assert re.search(r"timed out after 0.5s \(scorer.remote.timeout_s\)", failures[0])
    assert time.monotonic() - t0 < 3.0  # two attempts of 0.5 s, not the server's 3 s


def test_4xx_is_not_retried(teacher, server, trajs):
    server.faults.append("400")
    t = teacher("scorer.remote.retries=3")
    failures = score_with_retries(t.score, _fresh(trajs[:1]), _policy(t), sleep=lambda s: None)
    assert re.search(r"HTTP 400 \(not retried\): injected HTTP 400", failures[0])
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
    t = teacher("scorer.remote.retries=3")
    failures = score_with_retries(t.score, _fresh(trajs[:1]), _policy(t), sleep=lambda s: None)
    assert re.search(message, failures[0])
    assert f"{server.url}/generate for trajectory {trajs[0].id}: malformed reply: " in failures[0]
    assert len(server.requests) == 1  # a malformed reply would come back the same: not retryable


def test_concurrency_limit_is_respected(teacher, server, trajs):
    server.delay_s = 0.2
    many = [t for _ in range(3) for t in _fresh(trajs)]  # 18 requests
    teacher("scorer.remote.max_concurrency=3").score(many)
    assert server.max_in_flight == 3
    assert all(t.teacher_logprobs is not None for t in many)


def test_a_malformed_reply_goes_down_the_scorers_failure_path(quick_models, server, trajs, zmq_broker):
    """One trajectory whose reply is always broken is dead-lettered with the reason; the others are scored."""
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer

    port = int(zmq_broker.rsplit(":", 1)[1])
    cfg = _cfg(quick_models, server.url, f"broker.port={port}", "run.run_id=remote-t")
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
    # one request each: the backend named the failure, so the others were not asked again, and a malformed
    # reply is not retryable, so the bad one was not either
    assert len(server.requests) == len(trajs)
    dead = scorer.broker.consume(scorer.reporter.dead_stream, "check", "check", 16, 2.0)
    records = [unpack_control(m.data) for m in dead]
    assert len(records) == 1 and records[0]["trajectory_id"] == bad.id
    assert "not a log-probability" in records[0]["reason"] and server.url in records[0]["reason"]


def test_a_flaky_server_loses_nothing_through_the_scorer(quick_models, server, trajs, zmq_broker):
    """5xx and 429 on some requests: the scorer asks again for those only, and every trajectory comes out
    scored, with nothing dead-lettered, on a broker that never redelivers."""
    from opd.runtime.lifecycle import StopFlag
    from teacher_scorers.scorer import Scorer

    port = int(zmq_broker.rsplit(":", 1)[1])
    cfg = _cfg(
        quick_models, server.url, f"broker.port={port}", "run.run_id=remote-flaky", "scorer.remote.retries=2"
    )
    scorer = Scorer(cfg, 0, StopFlag())
    scorer.broker.publish(scorer.rollouts, [encode(t) for t in _fresh(trajs)])
    server.faults.extend(["503", "", "429", "500", "503"])  # 3 of the first 6 fail, then 1 of their 3 retries
    msgs = scorer.broker.consume(scorer.rollouts, "scorers", scorer.name, 16, 2.0)
    batch, ids, _ = scorer._validate(msgs)
    ok, ok_ids = scorer.score_isolating(batch, ids)
    assert sorted(t.id for t in ok) == sorted(t.id for t in trajs) and ok_ids == ids
    assert all(t.teacher_logprobs is not None and "scored" in t.timestamps for t in ok)
    assert len(server.requests) == len(trajs) + 4  # three retried after round one, one of them again
    assert scorer.broker.consume(scorer.reporter.dead_stream, "check", "check", 16, 0.5) == []


def test_config_refuses_remote_without_url_or_with_temperature():
    with pytest.raises(ConfigError, match="scorer.engine: remote needs scorer.remote.url"):
        load_config(TINY, ["scorer.engine=remote"])
    with pytest.raises(ConfigError, match="set scorer.temperature: 1 or use scorer.engine: hf"):
        load_config(TINY, ["scorer.engine=remote", "scorer.remote.url=http://x:1", "scorer.temperature=0.7"])
    with pytest.raises(ConfigError, match="never put the key itself"):
        load_config(TINY, ["scorer.remote.api_key_env=sk-abc123"])
    with pytest.raises(ConfigError, match="must start with http"):
        load_config(TINY, ["scorer.remote.url=127.0.0.1:30000"])
