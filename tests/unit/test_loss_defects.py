"""Defects an independent check found on the production loss path (issue 13), each through collate + objective.

1. A confident teacher's top-k tail: log(1 - sum exp topk) from float32 values is log 0 below a tail of ~1e-8,
   floored at -1e4, so the reverse KL charged ~1e4 x the student's tail mass per token.
3. Reward normalisation divides by the population std (n, not n - 1) plus eps; a group of one gives 0.
4. hybrid reported the distillation term's correction metrics only: clip_fraction 0 while the RL term clipped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learner.batching import collate
from learner.engines.torch import TorchEngine
from learner.losses import LOSSES
from learner.objective import Objective
from opd.config import load_config
from opd.protocol import Trajectory
from tests.scored import scored_trajectories, tiny_model

D = torch.float64
V, K, B, T = 32000, 8, 2, 4
TAIL_FLOOR = 1e-6  # the least teacher tail mass the learner assumes when the scorer sent none


# -------------------------------------------------------------------------------- 1. teacher tail
def peaked(seed: int, top_logits: tuple[float, float]):
    """Teacher logits 0 everywhere but its top-k (uniform in `top_logits`), and a student that is unsure:
    (teacher log-probs (B, T, V) float64, top-k ids, student logits (B, T, V) float64, leaf)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    lo, hi = top_logits
    logits = torch.zeros(B, T, V, dtype=D)
    logits.scatter_(-1, ids, lo + (hi - lo) * torch.rand(B, T, K, generator=g, dtype=D))
    student = torch.randn(B, T, V, generator=g, dtype=D)
    student.scatter_add_(-1, ids, torch.full((B, T, K), 9.0, dtype=D))  # about half its mass on the top-k
    return torch.log_softmax(logits, -1), ids, student.requires_grad_()


def trajectories(teacher_logp, ids, send_tail: bool) -> list[Trajectory]:
    """What a scorer sends: float32 top-k logprobs sorted high to low, and (an HF scorer) the tail log-mass."""
    top_lp = teacher_logp.gather(-1, ids)
    order = top_lp.argsort(-1, descending=True)
    top_lp, ids = top_lp.gather(-1, order), ids.gather(-1, order)
    tail = torch.logsumexp(teacher_logp.scatter(-1, ids, -math.inf), -1)
    rng = np.random.default_rng(0)
    out = []
    for i in range(B):
        resp = ids[i, :, 0].numpy().astype(np.int32)  # the student sampled the teacher's favourite
        out.append(
            Trajectory(
                run_id="tail",
                prompt_id=f"p{i}",
                group_id=f"g{i}",
                sample_index=0,
                prompt_token_ids=np.array([1, 5, 7], dtype=np.int32),
                response_token_ids=resp,
                behaviour_logprobs=-rng.random(T).astype(np.float32),
                policy_version=0,
                teacher_logprobs=top_lp[i, :, 0].numpy().astype(np.float32),
                teacher_topk_ids=ids[i].numpy().astype(np.int32),
                teacher_topk_logprobs=top_lp[i].numpy().astype(np.float32),
                teacher_tail_logprobs=tail[i].numpy().astype(np.float32) if send_tail else None,
            )
        )
    return out


def full_reference(kind: str, beta: float, student, teacher_logp, ids):
    """The k+1-bucket divergence in float64 from the full-vocabulary distributions: (B, T)."""

    def buckets(logp):
        return torch.cat(
            [logp.gather(-1, ids), torch.logsumexp(logp.scatter(-1, ids, -math.inf), -1)[..., None]], -1
        )

    ls, lt = buckets(torch.log_softmax(student, -1)), buckets(teacher_logp)

    def kl(p, q):
        return F.kl_div(q, p, log_target=True, reduction="none").sum(-1)

    if kind == "topk_forward_kl":
        return kl(lt, ls)
    if kind == "topk_reverse_kl" or beta == 1.0:
        return kl(ls, lt)
    mix = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
    return beta * kl(lt, mix) + (1 - beta) * kl(ls, mix)


def objective_for(kind: str, beta: float = 0.5) -> Objective:
    over = [
        f"learner.loss={kind}",
        f"scorer.topk={K}",
        "learner.correction.mode=none",
        f"learner.jsd_beta={beta}",
    ]
    return Objective(load_config(None, over))


def production(obj: Objective, trajs, student, dtype):
    """The loss as the learner computes it from the collated batch and these logit rows."""
    batch = obj.prepare(collate(trajs, 0))
    return obj.micro_loss(student.to(dtype), batch, obj.normaliser(batch))[0]


def per_token(obj: Objective, trajs, student, dtype):
    """The registered per-token loss on the same inputs: (B, T)."""
    batch = obj.prepare(collate(trajs, 0))
    (part,) = obj.spec.per_token(obj.inputs(student.to(dtype), batch), obj.settings)
    return part.terms.per_token


CONFIDENT = [("topk_reverse_kl", 0.5), ("gkd_jsd", 1.0), ("gkd_jsd", 0.5), ("topk_forward_kl", 0.5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind, beta", CONFIDENT)
def test_a_confident_teachers_tail_sent_by_the_scorer_gives_the_full_vocabulary_loss(kind, beta, dtype):
    """V = 32000, k = 8, teacher tail ~1e-9: the loss and its gradient are the float64 full-vocabulary ones.
    Before the fix the reverse KL read ~1e4 x the student's tail mass (about 0.5) per token."""
    teacher_logp, ids, student = peaked(0, (26.0, 30.0))
    tail = torch.logsumexp(teacher_logp.scatter(-1, ids, -math.inf), -1)
    assert float(tail.exp().max()) < 1e-8
    obj = objective_for(kind, beta)
    loss = production(obj, trajectories(teacher_logp, ids, send_tail=True), student, dtype)
    ref = full_reference(kind, beta, student, teacher_logp, ids).mean()
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    got, want = torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("kind, beta", CONFIDENT)
def test_without_the_tail_a_confident_teacher_costs_a_bounded_tail_term(kind, beta):
    """A remote teacher sends no tail: the learner assumes TAIL_FLOOR mass. Finite, and per token the loss is
    the reference with log t_tail replaced by log TAIL_FLOOR in the tail bucket: for the reverse KL at most
    s_tail (log TAIL_FLOOR - log t_tail) below it, never ~1e4 s_tail above."""
    teacher_logp, ids, student = peaked(1, (26.0, 30.0))
    obj, trajs = objective_for(kind, beta), trajectories(teacher_logp, ids, send_tail=False)
    loss = production(obj, trajs, student, torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, student)[0]).all()
    ref = full_reference(kind, beta, student, teacher_logp, ids).detach()
    s_logp = torch.log_softmax(student.detach(), -1)
    s_tail = torch.logsumexp(s_logp.scatter(-1, ids, -math.inf), -1).exp()
    t_tail = torch.logsumexp(teacher_logp.scatter(-1, ids, -math.inf), -1).exp()
    gap = s_tail * (math.log(TAIL_FLOOR) - t_tail.log())  # > 0: what the floor forgives per token
    got = per_token(obj, trajs, student, torch.float32).detach().double()
    assert (got <= ref + 1e-4).all() and (got >= ref - gap - 1e-4).all()


@pytest.mark.parametrize(
    "top_logits, tol", [((8.0, 10.0), 1e-5), ((17.0, 19.0), 1e-3)], ids=["tail0.3", "tail5e-5"]
)
@pytest.mark.parametrize("kind, beta", CONFIDENT)
def test_without_the_tail_a_resolvable_tail_is_estimated_closely(kind, beta, top_logits, tol):
    """Tails of ~0.3 and ~5e-5 are within float32's reach: 1 - sum(top-k) gives the full-vocabulary loss."""
    teacher_logp, ids, student = peaked(2, top_logits)
    t_tail = torch.logsumexp(teacher_logp.scatter(-1, ids, -math.inf), -1).exp()
    assert float(t_tail.min()) > 10 * TAIL_FLOOR
    loss = production(objective_for(kind, beta), trajectories(teacher_logp, ids, send_tail=False), student, D)
    ref = full_reference(kind, beta, student, teacher_logp, ids).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    got, want = torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


# -------------------------------------------------------------------------- 3. population std
def test_reward_normalisation_uses_the_population_std_and_a_group_of_one_gives_zero():
    """grpo per group and reinforce_pp over the batch: (r - mean) / (std over n, not n - 1, + 1e-6)."""
    trajs = scored_trajectories(6, seed=0)
    for t, group, reward in zip(trajs, "aabbbc", (0.0, 1.0, 0.0, 0.0, 1.0, 1.0), strict=True):
        t.group_id, t.reward = group, reward
    over = ["learner.loss=opd_penalty", "learner.batch_size=6"]
    grpo = Objective(load_config(None, over)).prepare(collate(trajs, 0)).task_advantages
    third = math.sqrt(2) / 3  # population std of (0, 0, 1); the sample std would be 1/sqrt(3)
    expected = [-0.5 / (0.5 + 1e-6), 0.5 / (0.5 + 1e-6), -1 / 3 / (third + 1e-6), -1 / 3 / (third + 1e-6)]
    expected += [2 / 3 / (third + 1e-6), 0.0]
    torch.testing.assert_close(grpo.double(), torch.tensor(expected, dtype=D), rtol=1e-6, atol=1e-7)
    batch_pp = Objective(load_config(None, [*over, "learner.task_estimator=reinforce_pp"]))
    pp = batch_pp.prepare(collate(trajs, 0)).task_advantages
    std = math.sqrt(0.25)  # rewards 0,1,0,0,1,1: mean 1/2, population variance 1/4
    want = torch.tensor([(r - 0.5) / (std + 1e-6) for r in (0.0, 1.0, 0.0, 0.0, 1.0, 1.0)], dtype=D)
    torch.testing.assert_close(pp.double(), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ 4. hybrid metrics
HYBRID = ["learner.loss=hybrid", "learner.batch_size=8", "scorer.topk=4", "learner.warmup_steps=0"]


def _step(overrides):
    cfg = load_config(None, HYBRID + overrides)
    return TorchEngine(tiny_model(0, D), cfg).step(collate(scored_trajectories(8, seed=0), 0))


@pytest.mark.parametrize("distill", ["topk_forward_kl", "gkd_jsd"])
def test_hybrid_reports_each_terms_clipping_under_its_own_name(distill):
    """ppo_clip bites on the RL term only: rl_clip_fraction > 0, distill_clip_fraction 0, and the unprefixed
    clip_fraction (any term) no longer reads 0."""
    rec = _step([f"learner.hybrid.distill={distill}", "learner.correction.mode=ppo_clip"])
    assert rec["rl_clip_fraction"] > 0.2
    assert rec["distill_clip_fraction"] == 0.0 and rec["distill_importance_weight"] == 1.0
    assert rec["clip_fraction"] == rec["rl_clip_fraction"]
    assert rec["importance_weight"] == rec["rl_importance_weight"] != 1.0
    assert rec["rl_masked_fraction"] == rec["distill_masked_fraction"] == rec["masked_fraction"] == 0.0


def test_hybrid_terms_under_tis_and_mask_share_the_tokens_weights():
    """tis and mask weigh both terms by the same per-token ratio, so both terms report the same figures."""
    for mode, key in (("tis", "clip_fraction"), ("mask", "masked_fraction")):
        rec = _step(["learner.hybrid.distill=topk_reverse_kl", f"learner.correction.mode={mode}"])
        assert rec[f"rl_{key}"] == pytest.approx(rec[f"distill_{key}"]) and rec[key] > 0
        assert rec["rl_importance_weight"] == pytest.approx(rec["distill_importance_weight"])


def test_single_term_losses_keep_their_metric_names_only():
    rec = _step(["learner.loss=topk_forward_kl"])
    assert {"importance_weight", "clip_fraction", "masked_fraction"} <= set(rec)
    assert not any(k.startswith(("rl_", "distill_")) for k in rec)


# ---------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_a_neg_inf_teacher_logprob_trains_finitely(loss):
    """-inf teacher logprobs (sampled token and top-k) are floored: a finite step, not a skipped one."""
    cfg = load_config(None, [*HYBRID[1:], f"learner.loss={loss}", "learner.whiten=true", "learner.gamma=0.9"])
    batch = collate(scored_trajectories(8, seed=1), 0)
    batch.teacher[0, 0] = batch.topk_logprobs[1, 0, -1] = -math.inf
    rec = TorchEngine(tiny_model(0, D), cfg).step(batch)
    assert rec["skipped_steps"] == 0 and math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
