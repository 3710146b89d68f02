"""learner/losses.py against independent float64 references written like the formulas (explicit loops over rows
b and tokens t), values and gradients, plus the properties the learner relies on: chunking, no lag, guards."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from learner import losses
from learner.losses import Correction, Normaliser

D = torch.float64
FLOOR = -1e4
TAIL_FLOOR = 1e-6  # the least teacher tail mass the learner assumes when the scorer sent none
CASES = [(0, 3, 4, 6, False), (1, 4, 7, 8, False), (2, 5, 5, 11, True)]  # seed, B, T, V, last row empty
MODES = ("token_mean", "seq_mean_token_mean", "seq_sum")
LEVELS = ("token", "sequence")
CHUNKS = [slice(0, 1), slice(1, 3), slice(3, None)]
CORRECTIONS = [
    Correction("none"),
    Correction("tis", cap=1.5),
    Correction("mask", cap=1.5),
    Correction("ppo_clip", clip_eps=0.2),
    Correction("ppo_clip", clip_eps=0.2, clip_eps_high=0.28, dual_clip=1.5),
    Correction("decoupled", cap=1.5),
    Correction("decoupled", cap=1.3, clip_eps_high=0.28, dual_clip=1.5),
]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)


def val(x):
    return float(x.detach())


def cid(c):
    return f"{c.mode}-dual{c.dual_clip}"


def grad(y, x):
    """d y / d x, zeros where y does not depend on x (so a reference that drops every token still compares)."""
    if not y.requires_grad:
        return torch.zeros_like(x)
    g = torch.autograd.grad(y, x, allow_unused=True)[0]
    return torch.zeros_like(x) if g is None else g


def make_batch(seed, B, T, V, empty_row=False):
    """s (a leaf), b, q, proximal: valid logprobs of sampled tokens under related random logits, plus A and m."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=D)
    tokens = torch.randint(V, (B, T, 1), generator=g)

    def logprob(logits):
        return torch.log_softmax(logits, -1).gather(-1, tokens).squeeze(-1)

    noise = torch.randn(B, T, V, generator=g, dtype=D)
    s = logprob(student).requires_grad_()
    b = logprob(student + 0.6 * noise)
    p = logprob(student + 0.3 * noise + 0.2 * torch.randn(B, T, V, generator=g, dtype=D))
    q = logprob(2 * torch.randn(B, T, V, generator=g, dtype=D))
    adv = torch.randn(B, T, generator=g, dtype=D)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, T - 2  # one full row, one shorter; trailing padding like real batches
    if empty_row:
        lengths[-1] = 0
    return s, b, q, p, adv, (torch.arange(T)[None, :] < lengths[:, None]).to(D)


# ------------------------------------------------------------------------------------------- references
def real(m):
    """The (row, token) pairs that hold real tokens."""
    return [(i, t) for i in range(m.shape[0]) for t in range(m.shape[1]) if m[i, t] > 0]


def ref_aggregate(x, m, mode, constant=1.0):
    """Padding is skipped, never multiplied by 0, so NaN there cannot reach the reference."""
    total, tokens, rows, seq_means = x.new_zeros(()), 0, 0, x.new_zeros(())
    for i in range(x.shape[0]):
        row, n = x.new_zeros(()), 0
        for t in range(x.shape[1]):
            if m[i, t] > 0:
                row, n = row + x[i, t], n + 1
        total, tokens = total + row, tokens + n
        if n:
            rows, seq_means = rows + 1, seq_means + row / n
    if mode == "token_mean":
        return total / max(tokens, 1)
    if mode == "seq_mean_token_mean":
        return seq_means / max(rows, 1)
    return total / (max(rows, 1) * constant)


def ref_discounted(x, m, gamma):
    out = torch.zeros_like(x)
    for i, t in real(m):
        out[i, t] = sum(gamma ** (u - t) * x[i, u] for u in range(t, x.shape[1]) if m[i, u] > 0)
    return out


def ref_whiten(x, m):
    vals = [val(x[i, t]) for i, t in real(m)]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    out = torch.zeros_like(x)
    for i, t in real(m):
        out[i, t] = (x[i, t] - mean) / (std + 1e-8)
    return out


def ref_ratio(new, old, m, i, t, level):
    """r_t = exp(new_t - old_t); sequence level: the row's geometric mean in value, gradient r * d new_t."""
    if level == "token":
        return torch.exp(new[i, t] - old[i, t])
    idx = [u for u in range(new.shape[1]) if m[i, u] > 0]
    mean = sum(val(new[i, u] - old[i, u]) for u in idx) / len(idx)
    return math.exp(mean) * torch.exp(new[i, t] - new[i, t].detach())


def ref_ppo(r, a, c):
    """max(-A r, -A clip(r, 1-eps, 1+eps_high)), then for A < 0 at most c |A|; branches chosen by value."""
    high = c.clip_eps if c.clip_eps_high is None else c.clip_eps_high
    lo, hi = 1.0 - c.clip_eps, 1.0 + high
    rc = r if lo <= val(r) <= hi else torch.tensor(min(max(val(r), lo), hi), dtype=D)
    loss = -a * r if val(-a * r) >= val(-a * rc) else -a * rc
    if c.dual_clip is not None and a < 0 and val(loss) > c.dual_clip * abs(a):
        loss = torch.tensor(c.dual_clip * abs(a), dtype=D)
    return loss


def ref_policy_token(s, b, p, a, m, c, i, t):
    """(loss, weight, kept) of token (i, t) for correction c."""
    if c.mode == "none":
        return -a * s[i, t], 1.0, 1.0
    r = ref_ratio(s, b, m, i, t, c.level)
    if c.mode == "tis":
        w = min(val(r), c.cap)
        return -w * a * s[i, t], w, 1.0
    if c.mode == "mask":
        kept = 1.0 if 1.0 / c.cap <= val(r) <= c.cap else 0.0
        return -a * s[i, t] * kept, 1.0, kept
    if c.mode == "ppo_clip":
        return ref_ppo(r, a, c), val(r), 1.0
    w = min(val(ref_ratio(p, b, m, i, t, c.level)), c.cap)
    return w * ref_ppo(ref_ratio(s, p, m, i, t, c.level), a, c), w, 1.0


def ref_policy(s, b, p, adv, m, c):
    """(B, T) per-token losses, weights and kept flags; padding holds 0."""
    loss = [[torch.zeros((), dtype=D) for _ in range(s.shape[1])] for _ in range(s.shape[0])]
    weight, kept = torch.zeros_like(b), torch.zeros_like(b)
    for i, t in real(m):
        loss[i][t], weight[i, t], kept[i, t] = ref_policy_token(s, b, p, float(adv[i, t]), m, c, i, t)
    return torch.stack([torch.stack(row) for row in loss]), weight, kept


# ------------------------------------------------------------------------------------------ aggregation
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_aggregate_matches_reference_and_padding_never_leaks(case, mode):
    """NaN and inf planted in the padding reach neither value nor gradient; an empty mask gives 0, not NaN."""
    _, _, _, _, x, m = make_batch(*case)
    x = torch.where(m > 0, x, torch.full_like(x, math.nan))
    x[1, -1] = math.inf
    x.requires_grad_()
    for norm, constant in ((None, 1.0), (Normaliser.of(m, 7.0), 7.0)):
        out, ref = losses.aggregate(x, m, mode, norm), ref_aggregate(x, m, mode, constant)
        close(out, ref)
        close(grad(out, x), grad(ref, x))
    out = losses.aggregate(x, torch.zeros_like(m), mode)  # every position is NaN/inf padding
    assert out.item() == 0.0 and torch.equal(grad(out, x), torch.zeros_like(x))


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_chunks_sum_to_full_batch(mode):
    """Micro-batches divided by the full batch's counts add up to the full-batch loss and gradient."""
    _, _, _, _, x, m = make_batch(2, 5, 5, 11, empty_row=True)
    x.requires_grad_()
    norm = Normaliser.of(m, 5.0)
    assert (norm.num_tokens, norm.num_seqs, norm.constant) == (float(len(real(m))), 4.0, 5.0)
    full = losses.aggregate(x, m, mode, norm)
    parts = sum(losses.aggregate(x[c], m[c], mode, norm) for c in CHUNKS)
    close(parts, full)
    close(grad(parts, x), grad(full, x))


# ------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", CASES)
def test_discounted_sum(case, gamma):
    seed, B, T, V, empty = case
    _, _, _, _, x, m = make_batch(seed, B, T, V, empty)
    x = torch.where(m > 0, x, torch.full_like(x, math.nan))  # padding garbage must not leak
    close(losses.discounted_sum(x, m, gamma), ref_discounted(x, m, gamma))


@pytest.mark.parametrize("gamma, whitened", [(0.0, False), (0.9, False), (0.0, True), (0.7, True)])
@pytest.mark.parametrize("case", CASES)
def test_distill_advantage(case, gamma, whitened):
    """Also the only check of whiten: (x - mean) / (population std + 1e-8) over real tokens, padding 0."""
    seed, B, T, V, empty = case
    _, b, q, _, _, m = make_batch(seed, B, T, V, empty)
    ref = ref_discounted(q - b, m, gamma)
    close(losses.distill_advantage(b, q, m, gamma, whitened), ref_whiten(ref, m) if whitened else ref)


def ref_normalise(r):
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    return [(x - mean) / (std + 1e-6) for x in r]


def test_grpo_and_reinforce_pp_advantages():
    """Per-group (a group of one gives 0) and whole-batch normalisation with population std."""
    rewards = torch.randn(8, dtype=D, generator=torch.Generator().manual_seed(7))
    groups = torch.tensor([3, 0, 3, 1, 0, 3, 2, 0])  # groups 1 and 2 have one member
    expected = torch.zeros(8, dtype=D)
    for gid in set(groups.tolist()):
        idx = [i for i in range(8) if groups[i] == gid]
        expected[idx] = torch.tensor(ref_normalise([float(rewards[i]) for i in idx]), dtype=D)
    assert expected[3] == 0 and expected[6] == 0
    close(losses.grpo_advantage(rewards, groups), expected)
    close(losses.reinforce_pp_advantage(rewards), torch.tensor(ref_normalise(rewards.tolist()), dtype=D))


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_opd_penalty_advantage(lam):
    _, b, q, _, _, m = make_batch(4, 4, 6, 7)
    task = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(4))
    expected = torch.zeros_like(b)
    for i, t in real(m):
        expected[i, t] = task[i] - lam * (b[i, t] - q[i, t])
    close(losses.opd_penalty_advantage(task, b, q, m, lam), expected)


# ------------------------------------------------------------------------------------------ corrections
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("c", CORRECTIONS, ids=cid)
@pytest.mark.parametrize("case", CASES)
def test_policy_loss_matches_reference_and_is_on_policy_without_lag(case, c, level):
    """With b = proximal = s every correction must reduce to the plain gradient -(1/sum m) sum m A ds."""
    seed, B, T, V, empty = case
    s, b, _, p, adv, m = make_batch(seed, B, T, V, empty)
    c = dataclasses.replace(c, level=level)
    terms = losses.policy_loss(s, b, adv, m, c, proximal=p)
    ref, weight, kept = ref_policy(s, b, p, adv, m, c)
    on = m > 0
    close(terms.per_token[on], ref[on])
    expected = grad(ref_aggregate(ref, m, "token_mean"), s)
    close(grad(losses.aggregate(terms.per_token, m, "token_mean"), s), expected)
    close(terms.kept[on], kept[on])
    if c.mode != "ppo_clip":  # the ppo weight is a diagnostic the formulas do not fix
        close(terms.weight[on], weight[on])
    no_lag = losses.policy_loss(s, s.detach(), adv, m, c, proximal=s.detach())
    close(grad(losses.aggregate(no_lag.per_token, m, "token_mean"), s), -(m * adv) / m.sum())


def test_ppo_clip_by_hand():
    """r = e^0.5, e^0.5, e^-0.5 with A = 1, -1, -1: clipped high, unclipped, clipped low; dual clip at 1.5."""
    s = torch.zeros(1, 3, dtype=D, requires_grad=True)
    b = torch.tensor([[-0.5, -0.5, 0.5]], dtype=D)
    adv, m, r = torch.tensor([[1.0, -1.0, -1.0]], dtype=D), torch.ones(1, 3, dtype=D), math.exp(0.5)
    for dual, loss, g, clipped in ((None, r, r, 0.0), (1.5, 1.5, 0.0, 1.0)):
        terms = losses.policy_loss(s, b, adv, m, Correction("ppo_clip", clip_eps=0.2, dual_clip=dual))
        close(terms.per_token, torch.tensor([[-1.2, loss, 0.8]], dtype=D))
        close(grad(terms.per_token.sum(), s), torch.tensor([[0.0, g, 0.0]], dtype=D))
        close(terms.clipped, torch.tensor([[1.0, clipped, 1.0]], dtype=D))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["none", "tis", "mask", "ppo_clip", "decoupled"])
def test_divergence_weights(mode, level):
    """Logit losses have no ratio to clip: none/tis/mask weights as the reference, the ratio modes refused."""
    s, b, _, p, adv, m = make_batch(7, 4, 6, 8)
    c = Correction(mode, level=level, cap=1.4)
    if mode in ("ppo_clip", "decoupled"):
        with pytest.raises(ValueError):
            losses.divergence_weights(s, b, m, c)
        return
    weight, kept = losses.divergence_weights(s, b, m, c)
    _, ref_w, ref_kept = ref_policy(s, b, p, adv, m, c)
    close(weight[m > 0], ref_w[m > 0])
    close(kept[m > 0], ref_kept[m > 0])


# ---------------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("c", CORRECTIONS, ids=cid)
@pytest.mark.parametrize("penalty", [False, True], ids=["reverse_kl_pg", "opd_penalty"])
def test_guards_neg_inf_teacher_and_empty_mask(penalty, c, level):
    """A -inf teacher logprob gives a finite advantage, loss and gradient; an all-zero mask gives 0 and zero
    gradient (the advantage functions, policy_loss and aggregate the registered losses are made of)."""
    c = dataclasses.replace(c, level=level)
    s, b, q, p, _, m = make_batch(8, 4, 6, 7, empty_row=True)
    q[0, 1] = q[1, 0] = q[2, -1] = -math.inf
    task = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(8))
    for mask in (m, torch.zeros_like(m)):
        if penalty:
            adv = losses.opd_penalty_advantage(task, b, q, mask, 0.7)
        else:
            adv = losses.distill_advantage(b, q, mask, gamma=0.9, whitened=True)
        assert torch.isfinite(adv).all()
        for mode in MODES:
            out = losses.aggregate(losses.policy_loss(s, b, adv, mask, c, proximal=p).per_token, mask, mode)
            g = grad(out, s)
            assert torch.isfinite(out) and torch.isfinite(g).all()
            if not mask.any():
                assert out.item() == 0.0 and torch.equal(g, torch.zeros_like(s))


# ------------------------------------------------------------------------------------------ top-k losses
KINDS = [("fkl", None), ("rkl", None), ("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)]
TOPK_CASES = [(0, 3, 4, 6, 1.0), (1, 4, 5, 8, 0.7), (2, 3, 6, 11, 2.0)]  # seed, B, T, V, temperature


def make_topk(seed, B, T, V, k, tau, same=False):
    """Student logits (leaf) and the teacher's top-k of log_softmax(teacher logits / tau)."""
    g = torch.Generator().manual_seed(seed)
    teacher = 1.5 * torch.randn(B, T, V, generator=g, dtype=D)
    logits = teacher.clone() if same else 1.5 * torch.randn(B, T, V, generator=g, dtype=D)
    teacher_logp = torch.log_softmax(teacher / tau, -1)
    lps, ids = teacher_logp.topk(k, dim=-1)
    return logits.requires_grad_(), ids, lps, teacher_logp


def call(kind, beta, logits, ids, lps, tau, tail=None):
    if kind == "jsd":
        return losses.gkd_jsd(logits, ids, lps, beta=beta, temperature=tau, tail_logprobs=tail)
    fn = losses.topk_forward_kl if kind == "fkl" else losses.topk_reverse_kl
    return fn(logits, ids, lps, temperature=tau, tail_logprobs=tail)


def ref_buckets(logits, ids, lps, tau, tail=None):
    """Student (differentiable) and teacher log-probs over the k ids plus a tail bucket (none when k == V). The
    teacher's tail is the given log-mass, else 1 - sum of its top-k probabilities, at least TAIL_FLOOR."""
    logp = torch.log_softmax(logits / tau, -1)
    ls = [logp[j] for j in ids.tolist()]
    lt = [max(float(x), FLOOR) for x in lps]
    if len(ls) < logits.shape[-1]:
        ls.append(torch.log(1 - sum(torch.exp(x) for x in ls)))
        if tail is not None:
            lt.append(max(float(tail), FLOOR))
        else:
            lt.append(math.log(max(1 - sum(math.exp(x) for x in lt), TAIL_FLOOR)))
    return ls, lt


def ref_divergence(kind, beta, ls, lt):
    pt, ps = [math.exp(x) for x in lt], [torch.exp(x) for x in ls]
    if kind == "fkl" or beta == 0.0:
        return sum(a * (x - y) for a, x, y in zip(pt, lt, ls, strict=True))
    if kind == "rkl" or beta == 1.0:
        return sum(a * (y - x) for a, x, y in zip(ps, lt, ls, strict=True))
    total = 0.0
    for a, c, x, y in zip(pt, ps, lt, ls, strict=True):
        log_mix = torch.log(beta * a + (1 - beta) * c)
        total = total + beta * a * (x - log_mix) + (1 - beta) * c * (y - log_mix)
    return total


def ref_topk(kind, beta, logits, ids, lps, tau, tail=None):
    """(B, T) divergences, one token at a time."""
    B, T = logits.shape[:2]
    at = [
        [
            ref_buckets(logits[i, t], ids[i, t], lps[i, t], tau, None if tail is None else tail[i, t])
            for t in range(T)
        ]
        for i in range(B)
    ]
    return torch.stack([torch.stack([ref_divergence(kind, beta, *x) for x in row]) for row in at])


@pytest.mark.parametrize("full_vocab", [False, True], ids=["k3", "kV"])
@pytest.mark.parametrize("kind, beta", KINDS)
@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_losses_match_reference(case, kind, beta, full_vocab):
    seed, B, T, V, tau = case
    logits, ids, lps, _ = make_topk(seed, B, T, V, V if full_vocab else 3, tau)
    out, ref = call(kind, beta, logits, ids, lps, tau), ref_topk(kind, beta, logits, ids, lps, tau)
    close(out, ref)
    w = torch.randn(B, T, dtype=D, generator=torch.Generator().manual_seed(seed))
    close(grad((w * out).sum(), logits), grad((w * ref).sum(), logits))


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_topk_identical_distributions_give_zero(kind, beta, k, tau):
    """Zero divergence and, at this minimum, zero gradient."""
    logits, ids, lps, _ = make_topk(9, 3, 4, 8, k, tau, same=True)
    out = call(kind, beta, logits, ids, lps, tau)
    close(out, torch.zeros_like(out))
    close(grad(out.sum(), logits), torch.zeros_like(logits))


def full_divergence(kind, beta, student_logp, teacher_logp):
    """Full-vocabulary divergences through F.kl_div (kl_div(input, target) = KL(target || input))."""

    def kl(p, q):  # KL(p || q) from log-probs
        return F.kl_div(q, p, log_target=True, reduction="none").sum(-1)

    if kind == "fkl" or beta == 0.0:
        return kl(teacher_logp, student_logp)
    if kind == "rkl" or beta == 1.0:
        return kl(student_logp, teacher_logp)
    log_mix = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    return beta * kl(teacher_logp, log_mix) + (1 - beta) * kl(student_logp, log_mix)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_topk_with_full_vocabulary_is_the_full_divergence(kind, beta, tau):
    logits, ids, lps, teacher_logp = make_topk(10, 3, 5, 7, 7, tau)
    out = call(kind, beta, logits, ids, lps, tau)
    expected = full_divergence(kind, beta, torch.log_softmax(logits / tau, -1), teacher_logp)
    close(out, expected)
    close(grad(out.sum(), logits), grad(expected.sum(), logits))


@pytest.mark.parametrize("k", [3, 9])
@pytest.mark.parametrize("kind, beta", KINDS)
def test_topk_neg_inf_teacher_and_empty_tail_are_floored(kind, beta, k):
    """-inf teacher logprobs act as LOGPROB_FLOOR and a zero teacher tail as TAIL_FLOOR mass: finite, and still
    the reference."""
    logits, ids, lps, _ = make_topk(11, 3, 4, 9, k, 1.0)
    lps[:, ::2, -1] = -math.inf
    lps[0, 1, 0] = -math.inf
    lps[1, 1] = torch.log_softmax(lps[1, 1], -1) + 1e-9  # top-k mass a hair above 1: tail clamped to 0
    out, ref = call(kind, beta, logits, ids, lps, 1.0), ref_topk(kind, beta, logits, ids, lps, 1.0)
    g = grad(out.sum(), logits)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    close(out, ref)
    close(g, grad(ref.sum(), logits))


@pytest.mark.parametrize("kind, beta", KINDS)
def test_topk_losses_use_the_scorers_tail_when_sent(kind, beta):
    """With the tail log-mass sent (and -inf floored like any teacher logprob) the reference uses it, not 1 - sum."""
    logits, ids, lps, teacher_logp = make_topk(12, 3, 4, 9, 3, 1.0)
    outside = teacher_logp.scatter(-1, ids, -math.inf)
    tail = torch.logsumexp(outside, -1) - 0.5  # not what 1 - sum(topk) gives, so the source is visible
    tail[0, 0] = -math.inf
    out, ref = (
        call(kind, beta, logits, ids, lps, 1.0, tail),
        ref_topk(kind, beta, logits, ids, lps, 1.0, tail),
    )
    close(out, ref)
    close(grad(out.sum(), logits), grad(ref.sum(), logits))
    assert not torch.allclose(out, call(kind, beta, logits, ids, lps, 1.0))
