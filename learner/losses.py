"""The distillation loss family as pure tensor functions (notation of DESIGN.md).

Per response token t: s_t = log pi_theta (learner forward, differentiable), b_t = behaviour logprob (the actor's,
at sampling time), q_t = teacher logprob, m_t = mask. Tensors are (B, T) with padding at m_t = 0; top-k inputs are
(B, T, k) and student logits (B, T, V).

The functions are layered so that the learner can split a batch into micro-batches and still get the gradient
of the whole batch: advantages and normalisers are computed once over the full batch (they do not depend on the
parameters), and each micro-batch's aggregated loss is divided by the full batch's counts, so the micro-batch
losses add up to the full-batch loss exactly.

`LOSSES` at the bottom is the one registry of loss names: each `LossSpec` says what the loss needs from the
messages (rewards, top-k), whether the ratio-clipping corrections apply to it, and its per-token function.
`learner.objective` dispatches through it and `config_errors` checks a config against it; adding a loss is one
function here and one entry there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.protocol import LOGPROB_FLOOR  # stands in for log 0 (a -inf teacher logprob): 0 * log 0 never NaN

# The teacher's tail mass when the scorer did not send it (remote teachers): 1 - sum(exp(top-k)) from float32
# logprobs carries an error of order k x 6e-8, so a smaller tail cannot be told from 0. Flooring the *mass* here
# bounds a confident teacher's reverse-KL tail term at s_tail (log s_tail + 13.8) per token, where a log-floor
# of LOGPROB_FLOOR made it s_tail x 1e4 (issue 13, defect 1).
TAIL_MASS_FLOOR = 1e-6
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
def teacher_tail(topk_logprobs: torch.Tensor, tail_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """log of the teacher's mass outside its top-k, (B, T).

    The scorer's own value (from its full logits) when sent; otherwise log max(1 - sum exp topk, TAIL_MASS_FLOOR),
    summed in float64 so the learner's compute dtype adds no error to the float32 wire values."""
    if tail_logprobs is not None:
        return floor_logprobs(tail_logprobs.to(topk_logprobs.dtype))
    mass = 1.0 - floor_logprobs(topk_logprobs).double().exp().sum(-1)
    return torch.log(mass.clamp(min=TAIL_MASS_FLOOR)).to(topk_logprobs.dtype)


def teacher_buckets(
    topk_logprobs: torch.Tensor, with_tail: bool, tail_logprobs: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher log-probs over its top-k plus a tail bucket (see teacher_tail): (B, T, k[+1])."""
    lt = floor_logprobs(topk_logprobs)
    if not with_tail:
        return lt
    return torch.cat([lt, teacher_tail(topk_logprobs, tail_logprobs).unsqueeze(-1)], dim=-1)


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
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float,
    tail_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probs over the same k+1 buckets; no tail bucket when k covers the vocabulary."""
    with_tail = topk_ids.shape[-1] < logits.shape[-1]
    return (
        student_buckets(logits, topk_ids, temperature, with_tail),
        teacher_buckets(topk_logprobs, with_tail, tail_logprobs),
    )


def topk_forward_kl(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(teacher || student) over the teacher's top-k plus tail: mode-covering, (B, T)."""
    ls, lt = bucket_pair(logits, topk_ids, topk_logprobs, temperature, tail_logprobs)
    return _kl(lt, ls)


def topk_reverse_kl(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    tail_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL(student || teacher) over the teacher's top-k plus tail: mode-seeking, (B, T)."""
    ls, lt = bucket_pair(logits, topk_ids, topk_logprobs, temperature, tail_logprobs)
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
    tail_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token generalised Jensen-Shannon divergence over the teacher's top-k plus tail, (B, T)."""
    ls, lt = bucket_pair(logits, topk_ids, topk_logprobs, temperature, tail_logprobs)
    return jsd_from_logprobs(ls, lt, beta)


# ------------------------------------------------------------------------------------------- task reward
TASK_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_advantage,  # (rewards (B,), groups (B,)) -> (B,)
    "reinforce_pp": lambda rewards, groups: reinforce_pp_advantage(rewards),
}


# -------------------------------------------------------------------------------------------- registry
RATIO_MODES = ("ppo_clip", "decoupled")  # corrections that clip a policy-gradient ratio


@dataclass(frozen=True)
class LossSettings:
    """What the registered functions read from the config: the learner section plus the two temperatures."""

    correction: Correction = Correction()
    gamma: float = 0.0
    whiten: bool = False
    opd_lambda: float = 1.0
    jsd_beta: float = 0.5
    teacher_temperature: float = 1.0
    hybrid_distill: str = "reverse_kl_pg"
    rl_weight: float = 1.0
    distill_weight: float = 1.0


@dataclass
class TokenInputs:
    """One micro-batch as the per-token functions see it, all in the learner's compute dtype."""

    s: torch.Tensor  # (B, T) log pi_theta of the sampled tokens at the sampling temperature, differentiable
    b: torch.Tensor  # (B, T) behaviour logprobs
    q: torch.Tensor  # (B, T) teacher logprobs of the sampled tokens
    mask: torch.Tensor  # (B, T)
    logits: torch.Tensor  # (B, T, V) the student's logit rows, differentiable
    advantages: torch.Tensor | None = None  # (B, T) from LossSpec.advantage over the whole batch
    task_advantages: torch.Tensor | None = None  # (B,) from TASK_ESTIMATORS over the whole batch
    proximal: torch.Tensor | None = None  # (B, T) for correction decoupled
    topk_ids: torch.Tensor | None = None  # (B, T, k)
    topk_logprobs: torch.Tensor | None = None  # (B, T, k)
    teacher_tail: torch.Tensor | None = None  # (B, T) log tail mass from the scorer, when it sent one
    # (B, T, M) with a teacher axis (a joined mixture in the batch): top-k (B, T, M, k), tail (B, T, M)
    topk_weights: torch.Tensor | None = None


@dataclass
class Part:
    """One term of a loss: `scale` x aggregate(terms.per_token). `name` prefixes its metrics ("" for a loss of
    one term; "rl" and "distill" in hybrid)."""

    name: str
    scale: float
    terms: PolicyTerms


PerToken = Callable[[TokenInputs, LossSettings], list[Part]]
# Whole-batch advantage (detached): (b, q, mask, task_advantages or None, settings) -> (B, T) or None.
Advantage = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, LossSettings], torch.Tensor
]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. `takes_ratio`: its per-token loss is a policy gradient, so the ratio-clipping corrections
    (ppo_clip, decoupled) apply; the divergence losses accept none, tis and mask only. `distill_term`: it may be
    hybrid's distillation term (`learner.hybrid.distill`)."""

    name: str
    summary: str
    per_token: PerToken
    advantage: Advantage | None = None
    needs_topk: bool = False
    needs_rewards: bool = False
    takes_ratio: bool = False
    distill_term: bool = False
    composes_distill: bool = False  # its distillation term is the one `learner.hybrid.distill` names


def pg_per_token(x: TokenInputs, cfg: LossSettings) -> list[Part]:
    """Policy gradient on the whole-batch advantage `x.advantages` under the configured correction."""
    return [Part("", 1.0, policy_loss(x.s, x.b, x.advantages, x.mask, cfg.correction, x.proximal))]


def divergence_per_token(fn: Callable[[TokenInputs, LossSettings], torch.Tensor]) -> PerToken:
    """A top-k divergence as a per-token loss, weighted by tis or masked by mask. Under ppo_clip/decoupled (hybrid
    only: the config refuses them for a divergence alone) the clip belongs to the RL term and this one is plain."""

    def per_token(x: TokenInputs, cfg: LossSettings) -> list[Part]:
        div = fn(x, cfg)
        c = cfg.correction
        if c.mode in RATIO_MODES:
            weight = kept = torch.ones_like(x.s)
        else:
            weight, kept = divergence_weights(x.s, x.b, x.mask, c)
        clipped = (weight >= c.cap).to(x.s.dtype) if c.mode == "tis" else 1 - kept
        return [Part("", 1.0, PolicyTerms(div * weight * kept, weight, clipped, kept))]

    return per_token


TopkDivergence = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def over_teachers(x: TokenInputs, divergence: TopkDivergence) -> torch.Tensor:
    """`divergence(topk_ids, topk_logprobs, tail)` per token over the teacher's top-k; with a teacher axis (a
    joined mixture, learner/join.py) the weighted sum over the teachers, sum_i w_i D(teacher_i, student), each
    over its own top-k + tail: the teachers never saw each other's top-k, so the mixture over the union of their
    ids is unknown. For forward KL its student gradient is that of KL(mixture || student) exactly; for reverse KL
    it is KL(student || G) - log Z, G the normalised geometric mixture (see learner/join.py). A weight-0 slot
    (padding) holds finite values, so it adds exactly 0 to the loss and its gradient."""
    if x.topk_weights is None:
        return divergence(x.topk_ids, x.topk_logprobs, x.teacher_tail)
    total = torch.zeros_like(x.s)
    for m in range(x.topk_weights.shape[-1]):
        tail = None if x.teacher_tail is None else x.teacher_tail[..., m]
        total = total + x.topk_weights[..., m] * divergence(
            x.topk_ids[..., m, :], x.topk_logprobs[..., m, :], tail
        )
    return total


def _topk_loss(fn: Callable[..., torch.Tensor]) -> PerToken:
    """A registered top-k divergence `fn(logits, ids, logprobs, temperature, tail)` as a per-token loss."""
    return divergence_per_token(
        lambda x, cfg: over_teachers(
            x, lambda ids, lp, tail: fn(x.logits, ids, lp, cfg.teacher_temperature, tail)
        )
    )


def _hybrid(x: TokenInputs, cfg: LossSettings) -> list[Part]:
    task = x.task_advantages[:, None].expand_as(x.s)
    rl = policy_loss(x.s, x.b, task, x.mask, cfg.correction, x.proximal)
    (distill,) = LOSSES[cfg.hybrid_distill].per_token(x, cfg)
    return [Part("rl", cfg.rl_weight, rl), Part("distill", cfg.distill_weight, distill.terms)]


def _hybrid_advantage(b, q, mask, task, cfg: LossSettings):
    advantage = LOSSES[cfg.hybrid_distill].advantage
    return advantage(b, q, mask, task, cfg) if advantage is not None else None


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "reverse_kl_pg",
            "policy gradient on A_t = -(b_t - q_t), optionally discounted (gamma) and whitened",
            pg_per_token,
            advantage=lambda b, q, mask, task, cfg: distill_advantage(b, q, mask, cfg.gamma, cfg.whiten),
            takes_ratio=True,
            distill_term=True,
        ),
        LossSpec(
            "opd_penalty",
            "policy gradient on A_t = A^task - lambda (b_t - q_t): distillation as a penalty on RL",
            pg_per_token,
            advantage=lambda b, q, mask, task, cfg: opd_penalty_advantage(task, b, q, mask, cfg.opd_lambda),
            needs_rewards=True,
            takes_ratio=True,
        ),
        LossSpec(
            "topk_forward_kl",
            "KL(teacher || student) over the teacher's top-k plus a tail bucket (mode-covering)",
            _topk_loss(topk_forward_kl),
            needs_topk=True,
            distill_term=True,
        ),
        LossSpec(
            "topk_reverse_kl",
            "KL(student || teacher) over the teacher's top-k plus a tail bucket (mode-seeking)",
            _topk_loss(topk_reverse_kl),
            needs_topk=True,
            distill_term=True,
        ),
        LossSpec(
            "gkd_jsd",
            "generalised Jensen-Shannon divergence (jsd_beta) over the teacher's top-k plus a tail bucket",
            divergence_per_token(
                lambda x, cfg: over_teachers(
                    x,
                    lambda ids, lp, tail: gkd_jsd(
                        x.logits, ids, lp, cfg.jsd_beta, cfg.teacher_temperature, tail
                    ),
                )
            ),
            needs_topk=True,
            distill_term=True,
        ),
        LossSpec(
            "hybrid",
            "rl_weight x policy gradient on A^task + distill_weight x the term hybrid.distill",
            _hybrid,
            advantage=_hybrid_advantage,
            needs_rewards=True,
            takes_ratio=True,
            composes_distill=True,
        ),
    )
}


def _unknown(field: str, name: str, choices: list[str], what: str) -> str:
    return f"{field} {name!r} is not {what}; choose one of {', '.join(choices)}"


def loss_spec(name: str) -> LossSpec:
    """The registered loss `name`; an unknown name raises, naming the choices."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(_unknown("learner.loss", name, list(LOSSES), "a registered loss")) from None


def teacher_term(loss: str, hybrid_distill: str) -> LossSpec:
    """The loss that reads the teacher: the loss itself, or hybrid's distillation term."""
    spec = loss_spec(loss)
    return loss_spec(hybrid_distill) if spec.composes_distill else spec


def config_errors(cfg) -> list[tuple[str, str]]:
    """(dotted field, message naming the fix) for every loss setting this config cannot run; [] when it can.

    `cfg` is the root config, because a loss's inputs come from other sections (scorer.topk, sampling.n). The
    messages are the ones the config gave before the registry moved here."""
    lc = cfg.learner
    if lc.loss not in LOSSES:
        return [("learner.loss", _unknown("learner.loss", lc.loss, list(LOSSES), "a registered loss"))]
    terms = [n for n, s in LOSSES.items() if s.distill_term]
    if lc.hybrid.distill not in terms:
        msg = _unknown("learner.hybrid.distill", lc.hybrid.distill, terms, "a distillation term")
        return [("learner.hybrid.distill", msg)]
    spec, term, errors = LOSSES[lc.loss], teacher_term(lc.loss, lc.hybrid.distill), []
    if term.needs_topk and cfg.scorer.topk == 0:
        msg = f"learner.loss {term.name} needs the teacher's top-k logprobs; set scorer.topk (e.g. 8)"
        errors.append(("scorer.topk", msg))
    if spec.needs_rewards and lc.task_estimator == "grpo" and cfg.sampling.n < 2:
        msg = (
            f"learner.loss {lc.loss} with task_estimator grpo normalises rewards within a prompt's group; "
            "set sampling.n >= 2 or learner.task_estimator: reinforce_pp"
        )
        errors.append(("sampling.n", msg))
    if not spec.takes_ratio and lc.correction.mode in RATIO_MODES:
        msg = (
            f"correction.mode: {lc.correction.mode} clips a policy-gradient ratio, and loss {lc.loss} has none; "
            "use learner.correction.mode: tis, mask or none"
        )
        errors.append(("learner.correction.mode", msg))
    return errors
