"""Several teachers: the joined mixture through the production loss path against a float64 reference.

Per-teacher scored copies (each teacher's own q, top-k and tail, at TAU_T) are joined by `learner.join.combine`,
encoded and decoded as the one wire message the replay log and the learner ranks carry, collated with
single-teacher rows in the same batch (so the teacher axis is padded), and trained by `TorchEngine.step` with the
registered objective. The reference (tests/unit/test_loss_reference.py's, per token, float64) takes the sampled-
token teacher logprob q_t = log sum_i w_i exp(q_t^i) and the top-k losses as sum_i w_i D(teacher_i, student) over
each teacher's own top-k + tail. Then the two facts learner/join.py states about the top-k sum are checked on full
distributions: its forward-KL gradient is that of KL(mixture || student), and its reverse KL is the reverse KL to
the normalised geometric mixture minus log Z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from learner.batching import collate, split_minibatches
from learner.join import combine
from learner.losses import LOSSES, topk_forward_kl, topk_reverse_kl
from opd.config import load_config
from opd.protocol import decode, encode
from tests.scored import VOCAB, tiny_model
from tests.unit.test_loss_reference import (  # noqa: F401  (trajectories: the module's fixture)
    BASE,
    MAX_NEW,
    TAU_T,
    _add,
    _load,
    _means,
    aggregate,
    distill_advantages,
    divergence,
    divergence_token,
    engine_step,
    forward,
    pg_token,
    task_advantages,
    token_logprobs,
    trajectories,
    val,
)

D = torch.float64
K = 4
TEACHERS = ("alpha", "beta", "gamma")


def _scored_by(t, name: str, rng: np.random.Generator):
    """t's rollout as teacher `name` scores it: its own logits at TAU_T, its q, top-k and tail."""
    T = len(t.response_token_ids)
    logits = torch.tensor(rng.normal(scale=2.0, size=(T, VOCAB)))
    logp = torch.log_softmax(logits / TAU_T, -1)
    top_lp, top_ids = logp.topk(K, -1)
    tail = torch.logsumexp(logp.scatter(-1, top_ids, -math.inf), -1)
    resp = torch.tensor(t.response_token_ids, dtype=torch.long)
    return replace(
        t,
        teacher_logprobs=logp[torch.arange(T), resp].numpy().astype(np.float32),
        teacher_topk_ids=top_ids.numpy().astype(np.int32),
        teacher_topk_logprobs=top_lp.numpy().astype(np.float32),
        teacher_tail_logprobs=tail.numpy().astype(np.float32),
        teacher_name=name,
    )


@pytest.fixture(scope="module")
def mixed(trajectories):  # noqa: F811
    """(batch as the learner decodes it, each row's copies and weights): rows 0, 3, 6 single-teacher, the others
    joined mixtures of two or three teachers with uneven weights."""
    rng = np.random.default_rng(7)
    out, copies = [], []
    for i, t in enumerate(trajectories):
        names = TEACHERS[: 1 + i % 3]
        raw = rng.uniform(0.2, 1.0, size=len(names))
        weights = {n: float(w / raw.sum()) for n, w in zip(names, raw, strict=True)}
        scored = {n: replace(_scored_by(t, n, rng), teacher_weights=weights) for n in names}
        joined = combine(scored, weights)
        out.append(decode(encode(joined), vocab_size=VOCAB, require_scored=True))
        copies.append((scored, weights))
    return out, copies


@dataclass
class MixRow:
    """A row as the reference reads it: float64 of each teacher's wire values, the mixture q in float64."""

    ids: torch.Tensor
    P: int
    T: int
    b: list[float]
    q: list[float]
    teachers: list[tuple[float, list, list, list | None]]  # (weight, top ids, top logprobs, tail) per teacher
    reward: float
    group: str


def mix_rows(copies, with_tail=True) -> list[MixRow]:
    rows = []
    for scored, weights in copies:
        t = next(iter(scored.values()))
        f64 = [np.asarray(scored[n].teacher_logprobs, dtype=np.float64) for n in sorted(scored)]
        q = [
            math.log(math.fsum(weights[n] * math.exp(f[j]) for n, f in zip(sorted(scored), f64, strict=True)))
            for j in range(len(t.response_token_ids))
        ]
        teachers = [
            (
                weights[n],
                scored[n].teacher_topk_ids.tolist(),
                np.asarray(scored[n].teacher_topk_logprobs, dtype=np.float64).tolist(),
                np.asarray(scored[n].teacher_tail_logprobs, dtype=np.float64).tolist() if with_tail else None,
            )
            for n in sorted(scored)
        ]
        rows.append(
            MixRow(
                torch.tensor(np.concatenate([t.prompt_token_ids, t.response_token_ids]), dtype=torch.long),
                len(t.prompt_token_ids),
                len(t.response_token_ids),
                np.asarray(t.behaviour_logprobs, dtype=np.float64).tolist(),
                q,
                teachers,
                t.reward,
                t.group_id,
            )
        )
    return rows


def reference_step(cfg, rows: list[MixRow], snapshots):
    """tests/unit/test_loss_reference.py's reference_step, the top-k divergence summed over the teachers."""
    lc = cfg.learner
    c = lc.correction
    distill = lc.hybrid.distill if lc.loss == "hybrid" else lc.loss
    terms = (["rl"] if lc.loss == "hybrid" else []) + [distill]
    task = task_advantages(rows, lc.task_estimator) if lc.loss in ("opd_penalty", "hybrid") else None
    adv = distill_advantages(rows, lc.gamma, lc.whiten)
    if lc.loss == "opd_penalty":
        adv = [[task[i] - lc.opd_lambda * (r.b[t] - r.q[t]) for t in range(r.T)] for i, r in enumerate(rows)]
    model = tiny_model(0, D)
    params = list(model.parameters())
    with torch.no_grad():
        _load(params, snapshots[0])
        proximal = [[val(x) for x in token_logprobs(forward(model, r), r)] for r in rows]
    steps, sums = [], {}
    for j, idx in enumerate(split_minibatches(len(rows), lc.minibatches)):
        _load(params, snapshots[j])
        per_term = {name: [] for name in terms}
        for i in idx:
            r = rows[i]
            logits = forward(model, r)
            s = token_logprobs(logits, r)
            for name in terms:
                out = []
                for t in range(r.T):
                    if name == "rl":
                        tok = pg_token(s, r.b, proximal[i], task[i], t, c)
                    elif name in ("reverse_kl_pg", "opd_penalty"):
                        tok = pg_token(s, r.b, proximal[i], adv[i][t], t, c)
                    else:
                        div = sum(
                            w
                            * divergence(
                                name, lc.jsd_beta, logits[t], ids[t], lp[t], None if tl is None else tl[t]
                            )
                            for w, ids, lp, tl in r.teachers
                        )
                        tok = divergence_token(div, s, r.b, t, c)
                    out.append(tok[0])
                    _add(sums, "rl" if name == "rl" else "distill", tok[1:])
                per_term[name].append(out)
        scales = {
            "rl": lc.hybrid.rl_weight,
            distill: lc.hybrid.distill_weight if lc.loss == "hybrid" else 1.0,
        }
        constant = lc.aggregation_constant or MAX_NEW
        loss = sum(scales[name] * aggregate(per_term[name], lc.aggregation, constant) for name in terms)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(params, grads, strict=True)
            ]
        )
        steps.append((val(loss), flat))
    return steps, _means(sums, lc.loss == "hybrid")


def check(overrides: list[str], batch, copies, with_tail=True) -> dict:
    cfg = load_config(None, BASE + overrides)
    if not with_tail:
        batch = [replace(t, teacher_tail_logprobs=None, mixture_tail_logprobs=None) for t in batch]
    record, seen = engine_step(cfg, batch)
    steps, metrics = reference_step(cfg, mix_rows(copies, with_tail), [p for p, _ in seen])
    assert len(seen) == len(steps) == cfg.learner.minibatches and record["skipped_steps"] == 0
    assert record["loss"] == pytest.approx(sum(v for v, _ in steps) / len(steps), rel=1e-6, abs=1e-7)
    for (_, got), (_, want) in zip(seen, steps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    for key, want in metrics.items():
        assert record[key] == pytest.approx(want, rel=1e-6, abs=1e-9), key
    return record


CASES = {
    "reverse_kl_pg": ["learner.loss=reverse_kl_pg", "learner.gamma=0.5", "learner.whiten=true"],
    "opd_penalty": ["learner.loss=opd_penalty", "learner.opd_lambda=0.7", "learner.correction.mode=ppo_clip"],
    "topk_forward_kl": ["learner.loss=topk_forward_kl"],
    "topk_reverse_kl": ["learner.loss=topk_reverse_kl", "learner.correction.mode=mask"],
    "gkd_jsd": ["learner.loss=gkd_jsd", "learner.jsd_beta=0.3", "learner.aggregation=seq_mean_token_mean"],
    "hybrid": [
        "learner.loss=hybrid",
        "learner.hybrid.distill=topk_reverse_kl",
        "learner.hybrid.rl_weight=0.7",
        "learner.hybrid.distill_weight=1.3",
    ],
    "hybrid-sampled": [
        "learner.loss=hybrid",
        "learner.hybrid.distill=reverse_kl_pg",
        "learner.minibatches=2",
    ],
    "hybrid-jsd-seq-sum": [
        "learner.loss=hybrid",
        "learner.hybrid.distill=gkd_jsd",
        "learner.aggregation=seq_sum",
    ],
}


def test_the_cases_cover_every_registered_loss():
    assert set(LOSSES) <= {c.split("-")[0] for c in CASES}


@pytest.mark.parametrize("name", CASES)
def test_a_batch_with_mixtures_matches_the_float64_reference(mixed, name):
    batch, copies = mixed
    assert collate(batch, 0).topk_weights.shape[-1] == 3  # a teacher axis, padded for rows of 1 and 2
    check(CASES[name], batch, copies)


@pytest.mark.parametrize("name", ["topk_forward_kl", "topk_reverse_kl", "gkd_jsd"])
def test_mixture_top_k_without_the_scorers_tail(mixed, name):
    """Remote teachers send no tail: each teacher's own is estimated from its own top-k."""
    batch, copies = mixed
    check(CASES[name], batch, copies, with_tail=False)


def test_the_joined_sampled_logprob_is_the_float64_logsumexp(mixed):
    batch, copies = mixed
    for t, row in zip(batch, mix_rows(copies), strict=True):
        np.testing.assert_allclose(t.teacher_logprobs, row.q, rtol=2e-7, atol=1e-7)


# ------------------------------------------------------------------------------ what the top-k sum equals
def _full(seed: int, teachers: int = 3):
    """Teachers whose 'top-k' is the whole vocabulary (exact distributions), weights, and student logits."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(teachers, 1, 5, VOCAB, generator=g, dtype=D) * 2, -1)
    ids = torch.arange(VOCAB).expand(teachers, 1, 5, VOCAB)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=D)[:teachers]
    student = torch.randn(1, 5, VOCAB, generator=g, dtype=D, requires_grad=True)
    return logp, ids, w, student


def test_the_forward_kl_sum_has_the_gradient_of_kl_from_the_mixture():
    logp, ids, w, student = _full(0)
    summed = sum(w[i] * topk_forward_kl(student, ids[i], logp[i]) for i in range(len(w))).sum()
    (g_sum,) = torch.autograd.grad(summed, student)
    mixture = torch.logsumexp(logp + w.log()[:, None, None, None], 0)
    (g_mix,) = torch.autograd.grad(topk_forward_kl(student, ids[0], mixture).sum(), student)
    torch.testing.assert_close(g_sum, g_mix, rtol=1e-12, atol=1e-12)


def test_the_reverse_kl_sum_is_the_reverse_kl_to_the_geometric_mixture_up_to_log_z():
    logp, ids, w, student = _full(1)
    summed = sum(w[i] * topk_reverse_kl(student, ids[i], logp[i]) for i in range(len(w)))
    weighted = (w[:, None, None, None] * logp).sum(0)  # log prod_i p_i^w_i, unnormalised
    log_z = torch.logsumexp(weighted, -1)
    geometric = weighted - log_z[..., None]
    torch.testing.assert_close(
        summed, topk_reverse_kl(student, ids[0], geometric) - log_z, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", ["reverse_kl_pg", "topk_forward_kl", "gkd_jsd", "hybrid"])
def test_a_mixture_of_one_teacher_twice_trains_as_that_teacher(trajectories, name):  # noqa: F811
    """Weights (0.3, 0.7) over two identical copies: the mixture is that teacher, through the teacher axis and the
    logsumexp, so loss, gradient and every metric (the top-k ones included) are the single teacher's."""
    cfg = load_config(None, BASE + CASES[name])
    twice = []
    for t in trajectories:
        w = {"alpha": 0.3, "beta": 0.7}
        copies = {n: replace(t, teacher_name=n, teacher_weights=w) for n in w}
        twice.append(decode(encode(combine(copies, w)), vocab_size=VOCAB, require_scored=True))
    got, got_seen = engine_step(cfg, twice)
    want, want_seen = engine_step(cfg, trajectories)
    assert collate(twice, 0).topk_weights is not None
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for (_, g), (_, w) in zip(got_seen, want_seen, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
