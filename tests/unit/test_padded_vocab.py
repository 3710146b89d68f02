"""Padded vocabularies: a student and a teacher of ONE tokenizer whose embeddings have different sizes, through the
production path (opd.models.vocab).

The tokenizer has 17 ids (16 base ones and an added special token, so `tokenizer.vocab_size` is 16 and the real
vocabulary 17). The student is built with 24 embedding rows (a config with a larger vocab_size), the teacher
resized to 32 (`resize_token_embeddings(pad_to_multiple_of=32)`), and both have large output weights on their
padding rows, so that the full softmax puts most of its mass on ids no tokenizer produces (checked): any place
that forgot to exclude them gets its distribution wrong and fails here. Checked against float64 references over
the real vocabulary: the sampler's behaviour logprobs (and that it never samples padding), the HF teacher's
logprobs, top-k (never padding) and tail, with and without its prefix cache, the scorer's refusal of a padding id,
the learner's loss and gradient through `collate` + objective + `TorchEngine.step` for a sampled-token loss and a
top-k loss, and the start-up tokenizer check (same tokenizer, other sizes: accepted; another tokenizer: refused).
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learner.batching import collate
from learner.engines.torch import TorchEngine
from opd.config import load_config
from opd.models.builds import Assets, ModelAsset, load_asset
from opd.models.loading import load_causal_lm
from opd.models.sampler import sample
from opd.models.vocab import real_vocab, tokenizer_vocab
from opd.protocol import ProtocolError, Trajectory, decode, encode
from teacher_scorers.backends.base import TeacherError
from teacher_scorers.backends.common import check_teacher_tokenizer
from teacher_scorers.backends.hf import HFTeacher, prefix_kv, teacher_rows, teacher_rows_after_prefix
from teacher_scorers.backends.http import Reply
from teacher_scorers.backends.vllm import response_rows as vllm_response_rows
from tests.padded_models import V, padded_tokenizer, save_padded

STUDENT_ROWS, TEACHER_ROWS = 24, 32
K, TAU_S, TAU_T, MAX_NEW = 3, 0.9, 1.3, 6
D = torch.float64
OVERRIDES = [
    f"scorer.topk={K}",
    f"scorer.temperature={TAU_T}",
    f"sampling.temperature={TAU_S}",
    f"sampling.max_new_tokens={MAX_NEW}",
    "scorer.prefix_cache=false",
    "learner.micro_batch_size=2",
    "learner.warmup_steps=0",
    "learner.grad_clip=1e9",
    "learner.correction.mode=none",
    "learner.aggregation=token_mean",
    "learner.whiten=false",
    "learner.gamma=1.0",
    "learner.minibatches=1",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("padded")
    tok = padded_tokenizer()
    student = save_padded(root / "student", tok, 0, STUDENT_ROWS, resize=False)
    teacher = save_padded(root / "teacher", tok, 1, TEACHER_ROWS, resize=True)
    return Assets(ModelAsset(student, student, "float32"), ModelAsset(teacher, teacher, "float32"))


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, OVERRIDES)


def _reference(path: str, ids: list[int], P: int, T: int, temperature: float, full: bool = False):
    """(T, V) float64 log-softmax over the real vocabulary (all rows with `full`) of a plain load."""
    model = load_causal_lm(path).to(D)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, P - 1 : P - 1 + T]
    return torch.log_softmax((logits if full else logits[:, :V]) / temperature, -1)


def _prompts(tok) -> list[list[int]]:
    return [
        [tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in ("12+3=", "7+45=", "9+9=")
    ]


@pytest.fixture(scope="module")
def sampled(assets):
    """Trajectories sampled from the student by the production sampler (two per prompt)."""
    model, tok = load_asset(assets.student)
    prompts = [p for p in _prompts(tok) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    out = sample(
        model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=MAX_NEW,
        temperature=TAU_S, generator=gen,
    )  # fmt: skip
    trajs = [
        Trajectory(
            run_id="v",
            prompt_id=f"p{i // 2}",
            group_id=f"g{i // 2}",
            sample_index=i % 2,
            prompt_token_ids=np.asarray(p, dtype=np.int32),
            response_token_ids=np.asarray(s.response_ids, dtype=np.int32),
            behaviour_logprobs=np.asarray(s.behaviour_logprobs, dtype=np.float32),
            policy_version=0,
            behaviour_temperature=TAU_S,
        )
        for i, (p, s) in enumerate(zip(prompts, out, strict=True))
    ]
    return trajs


def test_the_real_vocabulary_counts_added_tokens_and_is_kept_on_the_loaded_model(assets):
    """`tokenizer.vocab_size` leaves the added special token out; the real vocabulary has it, and each load keeps
    the tokenizer's count on the model, whatever its embedding's size."""
    tok = padded_tokenizer()
    assert (tok.vocab_size, len(tok), tokenizer_vocab(tok)) == (16, V, V)
    for asset, rows in ((assets.student, STUDENT_ROWS), (assets.teacher, TEACHER_ROWS)):
        model, _ = load_asset(asset)
        assert model.get_output_embeddings().weight.shape[0] == rows
        assert real_vocab(model) == V


def test_the_padded_rows_carry_most_of_the_mass(assets, sampled):
    """The premise of every other test here: without the exclusion, padding would dominate both models."""
    t = sampled[0]
    ids = [*t.prompt_token_ids.tolist(), *t.response_token_ids.tolist()]
    P, T = len(t.prompt_token_ids), len(t.response_token_ids)
    for asset, temperature in ((assets.student, TAU_S), (assets.teacher, TAU_T)):
        full = _reference(asset.path, ids, P, T, temperature, full=True)
        assert float(full[:, V:].exp().sum(-1).mean()) > 0.5


def test_the_sampler_samples_and_scores_over_the_real_vocabulary(assets, sampled):
    model, tok = load_asset(assets.student)
    greedy = sample(model, _prompts(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=4)
    for t in [*sampled, *greedy]:
        ids = t.response_token_ids.tolist() if isinstance(t, Trajectory) else t.response_ids
        assert ids and max(ids) < V
    for t in sampled:
        P, T = len(t.prompt_token_ids), len(t.response_token_ids)
        ids = [*t.prompt_token_ids.tolist(), *t.response_token_ids.tolist()]
        ref = _reference(assets.student.path, ids, P, T, TAU_S)
        want = ref[torch.arange(T), torch.tensor(ids[P:])].numpy()
        np.testing.assert_allclose(t.behaviour_logprobs, want, rtol=1e-5, atol=1e-5)


def _check_teacher_rows(path: str, ids, P, lp, top_ids, top_lp, tail):
    T = len(lp)
    ref = _reference(path, ids, P, T, TAU_T)
    ref_lp, ref_ids = ref.topk(K, -1)
    assert int(np.max(top_ids)) < V
    np.testing.assert_array_equal(top_ids, ref_ids.numpy())
    np.testing.assert_allclose(lp, ref[torch.arange(T), torch.tensor(ids[P:])].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(top_lp, ref_lp.numpy(), rtol=1e-5, atol=1e-5)
    ref_tail = torch.logsumexp(ref.scatter(-1, ref_ids, -math.inf), -1).numpy()
    np.testing.assert_allclose(tail, ref_tail, rtol=1e-5, atol=1e-5)


def test_the_hf_teacher_scores_over_the_real_vocabulary(cfg, assets, sampled):
    teacher = HFTeacher(cfg, assets)
    assert teacher.vocab_size == V
    trajs = [decode(encode(t), vocab_size=teacher.vocab_size) for t in sampled]  # as the scorer takes them
    teacher.score(trajs)
    for t in trajs:
        ids = [*t.prompt_token_ids.tolist(), *t.response_token_ids.tolist()]
        _check_teacher_rows(
            assets.teacher.path, ids, len(t.prompt_token_ids), t.teacher_logprobs, t.teacher_topk_ids,
            t.teacher_topk_logprobs, t.teacher_tail_logprobs,
        )  # fmt: skip
    # the prefix-cache path: the same rows from the shared prefix's keys and values
    seqs = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist()) for t in trajs]
    kw = {"pad_id": 0, "temperature": TAU_T, "topk": K}
    kv = prefix_kv(teacher.model, seqs[0][0][:1])
    assert kv is not None
    cached, plain = (
        teacher_rows_after_prefix(teacher.model, kv, seqs, **kw),
        teacher_rows(teacher.model, seqs, **kw),
    )
    for (p, r), a, b in zip(seqs, cached, plain, strict=True):
        _check_teacher_rows(assets.teacher.path, p + r, len(p), *a)
        _check_teacher_rows(assets.teacher.path, p + r, len(p), *b)


def test_an_id_in_the_padding_is_refused_on_decode(cfg, assets, sampled):
    """The scorer and the learner decode with the real vocabulary: an id in a padding row is refused, though the
    model's embedding has a row for it."""
    teacher = HFTeacher(cfg, assets)
    t = sampled[0]
    bad = replace(
        t,
        response_token_ids=np.asarray([3, V + 2], dtype=np.int32),
        behaviour_logprobs=np.asarray([-1.0, -1.0], dtype=np.float32),
    )
    assert V + 2 < teacher.model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ProtocolError, match=rf"outside the vocabulary \[0, {V}\)"):
        decode(encode(bad), vocab_size=teacher.vocab_size)


@pytest.fixture(scope="module")
def scored(cfg, assets, sampled):
    trajs = [decode(encode(t)) for t in sampled]
    HFTeacher(cfg, assets).score(trajs)
    return trajs


def _engine_step(cfg, assets, trajs):
    """One `TorchEngine.step` on the float64 student as the learner loads it; the gradient its optimiser saw."""
    model, tok = load_asset(assets.student)
    model.to(D)
    engine = TorchEngine(model, cfg)
    seen = []
    engine.optimizer.register_step_pre_hook(
        lambda *_: seen.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    )
    record = engine.step(collate(trajs, tok.pad_token_id))
    return record, seen[0]


def _reference_loss(cfg, assets, trajs, full: bool = False):
    """Float64 loss over the real vocabulary (all rows with `full`) and its gradient, token mean, no correction:
    reverse_kl_pg: -A_t s_t with A_t = sum_{u >= t} (q_u - b_u); topk_forward_kl: KL(teacher || student) over the
    k ids and the tail bucket, the student at the teacher's temperature."""
    model = load_causal_lm(assets.student.path).to(D)
    params = list(model.parameters())
    total, n = 0.0, 0
    for t in trajs:
        ids = torch.tensor([[*t.prompt_token_ids.tolist(), *t.response_token_ids.tolist()]])
        P, T = len(t.prompt_token_ids), len(t.response_token_ids)
        logits = model(input_ids=ids).logits[0, P - 1 : P - 1 + T]
        logits = logits if full else logits[:, :V]
        n += T
        resp = torch.tensor(t.response_token_ids.tolist())
        if cfg.learner.loss == "reverse_kl_pg":
            s = torch.log_softmax(logits / TAU_S, -1)[torch.arange(T), resp]
            gap = np.asarray(t.teacher_logprobs, np.float64) - np.asarray(t.behaviour_logprobs, np.float64)
            adv = torch.tensor(np.cumsum(gap[::-1])[::-1].copy())
            total = total + (-adv * s).sum()
            continue
        ls = torch.log_softmax(logits / TAU_T, -1).gather(
            -1, torch.tensor(t.teacher_topk_ids, dtype=torch.long)
        )
        ls = torch.cat([ls, torch.log1p(-ls.exp().sum(-1, keepdim=True))], -1)
        lt = torch.tensor(
            np.concatenate([t.teacher_topk_logprobs, t.teacher_tail_logprobs[:, None]], -1), dtype=D
        )
        total = total + (lt.exp() * (lt - ls)).sum()
    loss = total / n
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    )
    return float(loss.detach()), flat


@pytest.mark.parametrize("loss", ["reverse_kl_pg", "topk_forward_kl"])
def test_the_learner_loss_and_gradient_are_over_the_real_vocabulary(assets, scored, loss):
    cfg = load_config(None, [*OVERRIDES, f"learner.loss={loss}"])
    record, grad = _engine_step(cfg, assets, scored)
    want_loss, want_grad = _reference_loss(cfg, assets, scored)
    assert record["skipped_steps"] == 0
    assert record["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * float(want_grad.abs().max()))
    # and the test can tell: over all rows, the same loss is far from it
    full_loss, _ = _reference_loss(cfg, assets, scored, full=True)
    assert abs(full_loss - want_loss) > 1e-2 * max(1.0, abs(want_loss))


def test_the_tokenizer_check_accepts_one_tokenizer_of_two_sizes_and_refuses_another(assets, tmp_path):
    """Student (24 rows) and teacher (32 rows) of one tokenizer pass; a teacher of another tokenizer is refused,
    naming both models and the key that declares a teacher of another tokenizer."""
    _, teacher_tok = load_asset(assets.teacher)
    check_teacher_tokenizer(load_config(None, OVERRIDES), assets, teacher_tok)  # no error
    other = padded_tokenizer("0123456789xy")
    path = save_padded(tmp_path / "other", other, 2, TEACHER_ROWS, resize=True)
    with pytest.raises(ValueError, match="tokenizers differ") as err:
        HFTeacher(load_config(None, OVERRIDES), Assets(assets.student, ModelAsset(path, path, "float32")))
    assert assets.student.path in str(err.value) and path in str(err.value)
    assert "tokenizer: different" in str(err.value)


def test_servers_padding_ids_are_refused_saying_so():
    """Remote and vLLM teachers' replies are read with the real vocabulary: a top-k id in the padding is refused
    (a server's own distribution is over its rows; the reply says which id and why)."""
    reply = Reply("http://teacher/score for trajectory t", V)
    assert reply.token_id(V - 1, "top[0]") == V - 1
    with pytest.raises(
        TeacherError, match=rf"top\[1\] is {V + 3}, not a token id in \[0, {V}\) \(ids at or above"
    ):
        reply.token_id(V + 3, "top[1]")
    row = {5: SimpleNamespace(rank=2, logprob=-1.0), V + 1: SimpleNamespace(rank=1, logprob=-0.5)}
    with pytest.raises(RuntimeError, match=f"token id {V + 1} is not in the tokenizer's vocabulary"):
        vllm_response_rows([None, row], 1, [5], 2, V)
    assert vllm_response_rows([None, row], 1, [5], 2)[1].tolist() == [[V + 1, 5]]  # unbounded: as before
