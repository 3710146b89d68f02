"""The cross-tokenizer teacher (`scorer.tokenizer: different`) through the production path (`build_teacher`, the
scorer's retry policy) with real models: the same tokenizer declared different reproduces the plain teacher's
scores exactly; a BPE teacher of a character student is scored on its own tokens, its chunk sums and top-k
against a float64 forward of the teacher written here; a text the teacher cannot reproduce is refused for good."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from opd.config import ConfigError, load_config
from opd.models.builds import ensure_assets
from opd.models.loading import encode_prompt
from opd.protocol import Trajectory
from teacher_scorers.alignment import align, token_ends
from teacher_scorers.backends import build_teacher
from teacher_scorers.backends.cross_tokenizer import CrossTokenizerTeacher
from teacher_scorers.scorer import RetryPolicy, score_with_retries
from tests.chat_models import llama_dir
from tests.conftest import TINY
from tests.fake_sglang import FakeSGLang
from tests.tokenizer_pairs import ADDITION_CORPUS, bpe_tokenizer, char_tokenizer

TOPK = 4
PROBLEMS = [("12+34=", "46"), ("105+77=", "182"), ("9+9=", "18")]


def _traj(i: int, tok, prompt: str, answer: str, eos: bool = True) -> Trajectory:
    response = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    rng = np.random.default_rng(i)
    return Trajectory(
        run_id="x",
        prompt_id=f"p{i}",
        group_id=f"g{i}",
        sample_index=0,
        prompt_token_ids=np.asarray(encode_prompt(tok, prompt), dtype=np.int32),
        response_token_ids=np.asarray(response, dtype=np.int32),
        behaviour_logprobs=np.log(rng.uniform(0.1, 1.0, len(response))).astype(np.float32),
        policy_version=0,
    )


def test_the_same_tokenizer_declared_different_scores_exactly_as_the_plain_teacher(quick_models):
    cfg = load_config(TINY, [*quick_models, f"scorer.topk={TOPK}"])
    assets = ensure_assets(cfg)
    plain = build_teacher(cfg, assets)
    crossed = build_teacher(
        load_config(TINY, [*quick_models, f"scorer.topk={TOPK}", "scorer.tokenizer=different"]), assets
    )
    assert isinstance(crossed, CrossTokenizerTeacher)
    tok = char_tokenizer()
    a = [_traj(i, tok, p, r) for i, (p, r) in enumerate(PROBLEMS)]
    b = copy.deepcopy(a)
    plain.score(a)
    crossed.score(b)
    for x, y in zip(a, b, strict=True):
        for name in (
            "teacher_logprobs",
            "teacher_topk_ids",
            "teacher_topk_logprobs",
            "teacher_tail_logprobs",
        ):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
    counts = crossed.take_counters()
    tokens = sum(len(t.response_token_ids) for t in b)
    assert counts["alignment_chunks"] == tokens == counts["alignment_student_tokens"]
    assert counts["alignment_topk_matched_mass"] == pytest.approx(tokens)


def _save_model(path, tok, seed: int) -> None:
    llama_dir(path, tok, seed)


@pytest.fixture(scope="module")
def bpe_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    # the student can write an "x" the teacher's tokenizer has never seen (it becomes <unk> there)
    student_tok, teacher_tok = (
        char_tokenizer("0123456789+=x"),
        bpe_tokenizer(ADDITION_CORPUS, 60, "0123456789+="),
    )
    _save_model(root / "student", student_tok, 0)
    _save_model(root / "teacher", teacher_tok, 1)
    overrides = [
        "student.kind=pretrained",
        f"student.name_or_path={root / 'student'}",
        "teacher.kind=pretrained",
        f"teacher.name_or_path={root / 'teacher'}",
        f"scorer.topk={TOPK}",
        "scorer.tokenizer=different",
    ]
    cfg = load_config(TINY, overrides)
    return cfg, student_tok, teacher_tok, LlamaForCausalLM.from_pretrained(root / "teacher").double().eval()


@torch.no_grad()
def test_a_bpe_teacher_scores_its_own_tokens_mapped_back_by_chunks_float64(bpe_pair):
    cfg, student_tok, teacher_tok, teacher64 = bpe_pair
    backend = build_teacher(cfg, ensure_assets(cfg))
    trajs = [_traj(i, student_tok, p, r) for i, (p, r) in enumerate(PROBLEMS)]
    backend.score(trajs)
    for t, (prompt, answer) in zip(trajs, PROBLEMS, strict=True):
        t_prompt = encode_prompt(teacher_tok, prompt)
        t_body = teacher_tok(answer, add_special_tokens=False)["input_ids"]
        seq = [*t_prompt, *t_body, teacher_tok.eos_token_id]
        rows = torch.log_softmax(teacher64(input_ids=torch.tensor([seq])).logits[0], -1)
        t_lp = [
            rows[len(t_prompt) - 1 + j, tid].item()
            for j, tid in enumerate([*t_body, teacher_tok.eos_token_id])
        ]
        s_body = t.response_token_ids[:-1].tolist()
        chunks = align(token_ends(student_tok, s_body)[1], token_ends(teacher_tok, t_body)[1], len(answer))
        q = t.teacher_logprobs.astype(np.float64)
        for c in chunks:  # every chunk's sum is the teacher's logprob of its text
            want = math.fsum(t_lp[c.t0 : c.t1])
            assert math.fsum(q[c.s0 : c.s1]) == pytest.approx(want, abs=1e-4)
            # its first student token carries the teacher's top-k at the chunk's start, in student ids
            top = torch.topk(rows[len(t_prompt) - 1 + c.t0], TOPK)
            for tid, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                text = teacher_tok.decode([tid])
                if len(text) == 1 and tid not in teacher_tok.all_special_ids:
                    sid = student_tok.convert_tokens_to_ids(text)
                    row = t.teacher_topk_ids[c.s0].tolist()
                    assert sid in row and t.teacher_topk_logprobs[c.s0, row.index(sid)] == pytest.approx(
                        lp, abs=1e-4
                    )
        assert q[-1] == pytest.approx(t_lp[-1], abs=1e-4)  # EOS against the teacher's EOS, a chunk of its own
        assert (q <= 0).all() and t.teacher_topk_ids.shape == (len(t.response_token_ids), TOPK)
    assert backend.take_counters()["alignment_chunks"] < sum(len(t.response_token_ids) for t in trajs)


def test_a_text_the_teacher_cannot_reproduce_is_refused_for_good(bpe_pair):
    cfg, student_tok, _, _ = bpe_pair
    backend = build_teacher(cfg, ensure_assets(cfg))
    good = _traj(0, student_tok, "1+1=", "2")
    bad = _traj(1, student_tok, "1+1=", "2")
    bad.response_token_ids = np.asarray(
        student_tok("1x2", add_special_tokens=False)["input_ids"], dtype=np.int32
    )
    bad.behaviour_logprobs = np.full(3, -1.0, dtype=np.float32)
    tries = []
    failures = score_with_retries(
        backend.score, [good, bad], RetryPolicy(retries=3, backoff_s=0.01), tries.append
    )
    assert list(failures) == [1] and "does not reproduce" in failures[1] and not tries  # not retried
    assert good.teacher_logprobs is not None and bad.teacher_logprobs is None
    assert backend.take_counters()["alignment_failures"] == 1


def test_a_remote_teacher_of_another_tokenizer_scores_as_the_in_process_one(bpe_pair):
    """The SGLang-format server holds the BPE teacher; it is sent the teacher's own ids and its replies are
    checked against the teacher's tokenizer. Same chunks, same sums as the in-process teacher (no tail: a server
    returns only the top-k)."""
    cfg, student_tok, _, _ = bpe_pair
    assets = ensure_assets(cfg)
    srv = FakeSGLang(assets.teacher.path).start()
    try:
        remote_cfg = load_config(
            TINY,
            [
                "student.kind=pretrained",
                f"student.name_or_path={cfg.student.name_or_path}",
                "teacher.kind=pretrained",
                f"teacher.name_or_path={cfg.teacher.name_or_path}",
                f"scorer.topk={TOPK}",
                "scorer.tokenizer=different",
                "scorer.engine=remote",
                f"scorer.remote.url={srv.url}",
            ],
        )
        remote = build_teacher(remote_cfg, ensure_assets(remote_cfg))
        local = build_teacher(cfg, assets)
        a = [_traj(i, student_tok, p, r) for i, (p, r) in enumerate(PROBLEMS)]
        b = copy.deepcopy(a)
        remote.score(a)
        local.score(b)
    finally:
        srv.stop()
    for x, y in zip(a, b, strict=True):
        assert np.allclose(x.teacher_logprobs, y.teacher_logprobs, atol=1e-4)
        assert np.array_equal(x.teacher_topk_ids, y.teacher_topk_ids)
        assert x.teacher_tail_logprobs is None and y.teacher_tail_logprobs is not None


def test_a_remote_teacher_of_another_tokenizer_must_name_its_tokenizer():
    with pytest.raises(ConfigError, match=r"teacher.kind: pretrained and teacher.name_or_path"):
        load_config(
            TINY,
            ["scorer.tokenizer=different", "scorer.engine=remote", "scorer.remote.url=http://127.0.0.1:1"],
        )


@torch.no_grad()
def test_a_chat_teacher_renders_the_stamped_conversation_with_its_own_template(tmp_path):
    """Student: ChatML over characters (tests/chat_models.py); teacher: a byte-level BPE with a Llama-3-like
    template. The teacher's prompt is the same conversation in its own template, and the student's <|im_end|>
    is scored as the teacher's <|eot_id|>; a trajectory without the stamped conversation is refused."""
    import json

    from opd.models.prompts import conversation, prompt_ids
    from opd.protocol import CONVERSATION_KEY
    from opd.tasks import Problem
    from tests.chat_models import chatml_model_dir, chatml_tokenizer
    from tests.tokenizer_pairs import llama3ish_tokenizer

    student_tok = chatml_tokenizer()
    teacher_tok = llama3ish_tokenizer(["What is the capital of France? Paris.", "Be brief. 12+30=42"] * 20)
    chatml_model_dir(tmp_path / "student")
    _save_model(tmp_path / "teacher", teacher_tok, 2)
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "What is the capital of France?", "answer": "Paris"}) + "\n")
    cfg = load_config(
        None,
        [
            "task.kind=jsonl",
            f"task.train_path={train}",
            "student.kind=pretrained",
            f"student.name_or_path={tmp_path / 'student'}",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={tmp_path / 'teacher'}",
            "scorer.tokenizer=different",
        ],
    )
    backend = build_teacher(cfg, ensure_assets(cfg))
    problem = Problem("p0", "What is the capital of France?", answer="Paris")
    response = student_tok("Paris.", add_special_tokens=False)["input_ids"] + [
        student_tok.convert_tokens_to_ids("<|im_end|>")
    ]
    t = Trajectory(
        run_id="x",
        prompt_id="p0",
        group_id="g0",
        sample_index=0,
        prompt_token_ids=np.asarray(prompt_ids(student_tok, problem), dtype=np.int32),
        response_token_ids=np.asarray(response, dtype=np.int32),
        behaviour_logprobs=np.full(len(response), -0.5, dtype=np.float32),
        policy_version=0,
        task={CONVERSATION_KEY: json.dumps(conversation(problem))},
    )
    unstamped = copy.deepcopy(t)
    unstamped.task = {}
    view = backend.view(t)
    want_prompt = prompt_ids(teacher_tok, problem)
    assert view.surrogate.prompt_token_ids.tolist() == want_prompt
    assert teacher_tok.decode(want_prompt).startswith("<|begin_of_text|><|start_header_id|>user")
    eot = teacher_tok.convert_tokens_to_ids("<|eot_id|>")
    assert view.surrogate.response_token_ids.tolist()[-1] == eot
    failures = score_with_retries(backend.score, [t, unstamped], RetryPolicy(retries=0, backoff_s=0.01))
    assert list(failures) == [1] and "no conversation stamped" in failures[1]
    teacher64 = LlamaForCausalLM.from_pretrained(tmp_path / "teacher").double().eval()
    seq = [*want_prompt, *view.surrogate.response_token_ids.tolist()]
    rows = torch.log_softmax(teacher64(input_ids=torch.tensor([seq])).logits[0], -1)
    assert float(t.teacher_logprobs[-1]) == pytest.approx(rows[len(seq) - 2, eot].item(), abs=1e-4)
