"""The distillation loss family as pure tensor functions (notation of DESIGN.md).

Per response token t: s_t = log pi_theta (learner forward, differentiable), b_t = behaviour logprob (the actor's,
at sampling time), q_t = teacher logprob, m_t = mask. Tensors are (B, T) with padding at m_t = 0; top-k inputs are
(B, T, k) and student logits (B, T, V).

The functions are layered so that the learner can split a batch into micro-batches and still get the gradient
of the whole batch: advantages and normalisers are computed once over the full batch (they do not depend on the
parameters), and each micro-batch's aggregated loss is divided by the full batch's counts, so the micro-batch
losses add up to the full-batch loss exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOGPROB_FLOOR = -1e4  # stands in for log 0 (a -inf teacher logprob), so 0 * log 0 never becomes NaN
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum")
CORRECTIONS = ("none", "tis", "ppo_clip", "decoupled", "mask")


# ------------------------------------------------------------------------------------------- aggregation
@dataclass(frozen=True)
class Normaliser:
    """Counts of the *full* batch that every micro-batch divides by, so micro-batch losses sum to the batch loss.

    `constant` is the divisor of `seq_sum` (a fixed token budget, e.g. the longest allowed response), which keeps
    the per-token weight independent of how long the other responses in the batch happen to be.
    """

    num_tokens: float
    num_seqs: float
    constant: float = 1.0

    @staticmethod
    def of(mask: torch.Tensor, constant: float = 1.0) -> Normaliser:
        return Normaliser(float(mask.sum()), float((mask.sum(-1) > 0).sum()), constant)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm: Normaliser | None = None
) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar.

    token_mean: sum over all tokens / tokens in the batch (long responses weigh more).
    seq_mean_token_mean: mean over sequences of each sequence's token-mean (every response weighs the same).
    seq_sum: sum over all tokens / (sequences * constant) (no length normalisation bias, Dr. GRPO style).
    An empty mask gives 0, never NaN.
    """
    norm = norm or Normaliser.of(mask)
    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))  # padding never leaks NaN/inf
    if mode == "token_mean":
        return per_token.sum() / max(norm.num_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
        return seq.sum() / max(norm.num_seqs, 1.0)
    if mode == "seq_sum":
        return per_token.sum() / (max(norm.num_seqs, 1.0) * norm.constant)
    raise ValueError(f"aggregation {mode!r} is not one of {AGGREGATIONS}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean over the mask; 0 (not NaN) when the mask is empty."""
    return torch.where(mask > 0, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


# -------------------------------------------------------------------------------------------- advantages
def floor_logprobs(x: torch.Tensor) -> torch.Tensor:
    """Replace -inf (and NaN) logprobs with LOGPROB_FLOOR: a token the teacher rules out is a large finite penalty."""
    return torch.nan_to_num(x, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)


def discounted_sum(x: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = sum_{t' >= t} gamma^(t'-t) x_t' over the sequence's own tokens; gamma = 0 returns x (masked).

    Response masks here are a contiguous prefix; a masked position inside one (e.g. tool output in a multi-turn
    reply, not produced by this system yet) ends the sum there rather than being skipped over."""
    x = torch.where(mask > 0, x, torch.zeros_like(x))
    if gamma == 0.0:
        return x
    out = torch.zeros_like(x)
    running = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        running = x[:, t] + gamma * running * mask[:, t]
        out[:, t] = running
    return out


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked tokens of the batch (population std); padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return torch.where(mask > 0, (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))


def distill_advantage(
    b: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, gamma: float = 0.0, whitened: bool = False
) -> torch.Tensor:
    """A_t = -(b_t - q_t), optionally discounted over future tokens and whitened over the batch. Detached."""
    a = discounted_sum((floor_logprobs(q) - b).detach(), mask, gamma)
    return whiten(a, mask) if whitened else a


def grpo_advantage(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group r) / (std_group r + eps) per sequence; groups: (B,) integer ids. A group of one gives 0."""
    out = torch.zeros_like(rewards)
    for g in torch.unique(groups):
        idx = groups == g
        r = rewards[idx]
        out[idx] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return out


def reinforce_pp_advantage(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: the reward normalised over the whole batch, (r - mean r) / (std r + eps), per sequence."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def opd_penalty_advantage(
    task_advantage: torch.Tensor, b: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, lam: float
) -> torch.Tensor:
    """A_t = A^task (per sequence, broadcast over its tokens) - lambda * (b_t - q_t). Detached."""
    a = task_advantage.detach()[:, None] - lam * (b - floor_logprobs(q)).detach()
    return torch.where(mask > 0, a, torch.zeros_like(a))


# ------------------------------------------------------------------------------------------ corrections
@dataclass(frozen=True)
class Correction:
    """How tokens sampled by an older policy are reweighted; see README for when to use which mode.

    level 'sequence' replaces each token's ratio by the geometric mean of its sequence's ratios (value), while the
    gradient still flows through the token's own logprob, so with no lag every mode is the on-policy gradient.
    """

    mode: str = "tis"
    level: str = "token"
    cap: float = 2.0  # C for tis, decoupled (behaviour -> proximal weight) and mask ([1/C, C])
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # None: the same as clip_eps
    dual_clip: float | None = None  # c > 1: bounds the loss of negative-advantage tokens at c * |A|


@dataclass
class PolicyTerms:
    per_token: torch.Tensor  # (B, T) loss per token, before aggregation
    weight: torch.Tensor  # (B, T) detached importance weight used (1 where none)
    clipped: torch.Tensor  # (B, T) 1 where a cap or clip was active
    kept: torch.Tensor  # (B, T) 0 where `mask` mode dropped the token


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's token-mean of x, broadcast back to (B, T)."""
    x = torch.where(mask > 0, x, torch.zeros_like(x))
    return (x.sum(-1) / mask.sum(-1).clamp(min=1))[:, None].expand_as(x)


def log_ratio(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log(pi_new / pi_old) per token, or (level=sequence) the sequence's mean log-ratio in value while the
    gradient is that of the token's own log pi_new (a straight-through estimator)."""
    lr = new - old
    if level == "token":
        return lr
    if level == "sequence":
        return sequence_mean(lr.detach(), mask) + (new - new.detach())
    raise ValueError(f"correction level {level!r} is not token or sequence")


def _ppo_per_token(
    ratio: torch.Tensor, adv: torch.Tensor, c: Correction
) -> tuple[torch.Tensor, torch.Tensor]:
    high = c.clip_eps if c.clip_eps_high is None else c.clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - c.clip_eps, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if c.dual_clip is not None:
        bound = -adv * c.dual_clip  # for A < 0 this is c|A|: the loss of one token cannot grow without limit
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound.expand_as(loss), loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def policy_loss(
    s: torch.Tensor,
    b: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    c: Correction,
    proximal: torch.Tensor | None = None,
) -> PolicyTerms:
    """Per-token policy-gradient loss with the staleness correction `c.mode` (see Correction and README)."""
    b = b.detach()
    one = torch.ones_like(s)
    zero = torch.zeros_like(s)
    lr_b = log_ratio(s, b, mask, c.level)
    if c.mode == "none":
        return PolicyTerms(-adv * s, one, zero, one)
    if c.mode == "tis":
        ratio = lr_b.detach().exp()
        w = ratio.clamp(max=c.cap)
        return PolicyTerms(-w * adv * s, w, (ratio > c.cap).to(s.dtype), one)
    if c.mode == "mask":
        ratio = lr_b.detach().exp()
        kept = ((ratio >= 1.0 / c.cap) & (ratio <= c.cap)).to(s.dtype)
        return PolicyTerms(-adv * s * kept, one, 1 - kept, kept)
    if c.mode == "ppo_clip":
        ratio = lr_b.exp()
        loss, clipped = _ppo_per_token(ratio, adv, c)
        return PolicyTerms(loss, ratio.detach(), clipped.to(s.dtype), one)
    if c.mode == "decoupled":
        if proximal is None:
            raise ValueError(
                "correction decoupled needs proximal logprobs (learner.correction.proximal: recompute)"
            )
        proximal = proximal.detach()
        w_raw = log_ratio(proximal, b, mask, c.level).exp()
        w = w_raw.clamp(max=c.cap)
        loss, clipped = _ppo_per_token(log_ratio(s, proximal, mask, c.level).exp(), adv, c)
        return PolicyTerms(w * loss, w, (clipped | (w_raw > c.cap)).to(s.dtype), one)
    raise ValueError(f"correction mode {c.mode!r} is not one of {CORRECTIONS}")


def divergence_weights(
    s: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, c: Correction
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (weight, kept) for the logit losses, which have no ratio to clip: only none, tis and mask apply."""
    ratio = log_ratio(s.detach(), b, mask, c.level).exp()
    one = torch.ones_like(ratio)
    if c.mode == "none":
        return one, one
    if c.mode == "tis":
        return ratio.clamp(max=c.cap), one
    if c.mode == "mask":
        return one, ((ratio >= 1.0 / c.cap) & (ratio <= c.cap)).to(s.dtype)
    raise ValueError(f"correction {c.mode!r} applies to policy-gradient losses only; use none, tis or mask")


# ----------------------------------------------------------------------------------- top-k distributions
def teacher_buckets(topk_logprobs: torch.Tensor, with_tail: bool) -> torch.Tensor:
    """Teacher log-probs over its top-k plus a tail bucket log(1 - sum exp topk): (B, T, k[+1])."""
    lt = floor_logprobs(topk_logprobs)
    if not with_tail:
        return lt
    tail = (1.0 - lt.exp().sum(-1)).clamp(min=0.0)
    log_tail = torch.log(tail).clamp(min=LOGPROB_FLOOR)
    return torch.cat([lt, log_tail.unsqueeze(-1)], dim=-1)


def student_buckets(
    logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float, with_tail: bool
) -> torch.Tensor:
    """Student log-probs (from full logits at `temperature`) on the teacher's top-k ids plus the tail: (B,T,k[+1])."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    on_topk = logp.gather(-1, topk_ids.long())
    if not with_tail:
        return on_topk
    outside = logp.scatter(-1, topk_ids.long(), float("-inf"))
    log_tail = torch.logsumexp(outside, dim=-1).clamp(min=LOGPROB_FLOOR)
    return torch.cat([on_topk, log_tail.unsqueeze(-1)], dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs; terms with p = 0 contribute 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def bucket_pair(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probs over the same k+1 buckets; no tail bucket when k covers the vocabulary."""
    with_tail = topk_ids.shape[-1] < logits.shape[-1]
    return (
        student_buckets(logits, topk_ids, temperature, with_tail),
        teacher_buckets(topk_logprobs, with_tail),
    )


def topk_forward_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KL(teacher || student) over the teacher's top-k plus tail: mode-covering, (B, T)."""
    ls, lt = bucket_pair(logits, topk_ids, topk_logprobs, temperature)
    return _kl(lt, ls)


def topk_reverse_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KL(student || teacher) over the teacher's top-k plus tail: mode-seeking, (B, T)."""
    ls, lt = bucket_pair(logits, topk_ids, topk_logprobs, temperature)
    return _kl(ls, lt)


def jsd_from_logprobs(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """beta KL(T||M) + (1-beta) KL(S||M), M = beta T + (1-beta) S; beta = 0 / 1 are KL(T||S) / KL(S||T) exactly
    (the convention of TRL's GKD trainer: the mixture formula itself vanishes at the end points)."""
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)


def gkd_jsd(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token generalised Jensen-Shannon divergence over the teacher's top-k plus tail, (B, T)."""
    ls, lt = bucket_pair(logits, topk_ids, topk_logprobs, temperature)
    return jsd_from_logprobs(ls, lt, beta)


# ------------------------------------------------------------------------------------ whole-batch forms
@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    reverse_kl: torch.Tensor  # detached token-mean of b_t - q_t: a sample estimate of KL(student || teacher)
    importance_weight: torch.Tensor  # detached token-mean of the weight applied
    clip_fraction: torch.Tensor  # detached share of tokens where a cap or clip was active
    masked_fraction: torch.Tensor  # detached share of tokens dropped by `mask`


def _output(loss, terms: PolicyTerms, b, q, mask) -> LossOutput:
    return LossOutput(
        loss=loss,
        reverse_kl=masked_mean(b - floor_logprobs(q), mask).detach(),
        importance_weight=masked_mean(terms.weight, mask).detach(),
        clip_fraction=masked_mean(terms.clipped, mask).detach(),
        masked_fraction=masked_mean(1 - terms.kept, mask).detach(),
    )


def reverse_kl_pg(
    s: torch.Tensor,
    b: torch.Tensor,
    q: torch.Tensor,
    mask: torch.Tensor,
    correction: Correction = Correction(),
    aggregation: str = "token_mean",
    gamma: float = 0.0,
    whitened: bool = False,
    proximal: torch.Tensor | None = None,
    norm: Normaliser | None = None,
) -> LossOutput:
    """Sampled-token reverse KL as a per-token advantage A_t = -(b_t - q_t), optimised by policy gradient."""
    mask = mask.to(s.dtype)
    adv = distill_advantage(b, q, mask, gamma, whitened)
    terms = policy_loss(s, b, adv, mask, correction, proximal)
    return _output(aggregate(terms.per_token, mask, aggregation, norm), terms, b, q, mask)


def opd_penalty(
    s: torch.Tensor,
    b: torch.Tensor,
    q: torch.Tensor,
    mask: torch.Tensor,
    task_advantage: torch.Tensor,
    lam: float = 1.0,
    correction: Correction = Correction(),
    aggregation: str = "token_mean",
    proximal: torch.Tensor | None = None,
    norm: Normaliser | None = None,
) -> LossOutput:
    """Distillation as an additive penalty on a task-reward advantage: A_t = A^task - lambda (b_t - q_t)."""
    mask = mask.to(s.dtype)
    adv = opd_penalty_advantage(task_advantage, b, q, mask, lam)
    terms = policy_loss(s, b, adv, mask, correction, proximal)
    return _output(aggregate(terms.per_token, mask, aggregation, norm), terms, b, q, mask)


def hybrid(rl_loss: torch.Tensor, distill_loss: torch.Tensor, rl_weight: float, distill_weight: float):
    """lambda_rl * RL loss + lambda_distill * distillation loss (both already aggregated scalars)."""
    return rl_weight * rl_loss + distill_weight * distill_loss


def config_errors(cfg) -> list[tuple[str, str]]:
    """TEMP stub (dropped at merge): the loss registry's checks of a config."""
    return []
