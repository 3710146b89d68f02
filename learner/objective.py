"""The configured training objective: which loss, which correction, how it is aggregated, and its metrics.

Split in two on purpose. `prepare` runs once over the whole consumed batch and computes everything that does
not depend on the parameters (advantages, whitening, group-normalised rewards); `micro_loss` runs per
micro-batch and divides by the optimiser step's full counts, so micro-batching never changes the update.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from learner import losses as L
from learner.batching import Batch
from opd.config import _LOGIT_LOSSES, _REWARD_LOSSES, Config

SUM_KEYS = ("importance_weight", "clip_fraction", "masked_fraction", "reverse_kl")
TOPK_KEYS = ("teacher_topk_mass", "student_topk_mass", "topk_overlap")


class Objective:
    def __init__(self, cfg: Config):
        lc = cfg.learner
        self.loss_name, self.distill = lc.loss, lc.distill_loss
        c = lc.correction
        self.correction = L.Correction(c.mode, c.level, c.cap, c.clip_eps, c.clip_eps_high, c.dual_clip)
        self.aggregation = lc.aggregation
        self.constant = float(lc.aggregation_constant or cfg.sampling.max_new_tokens)
        self.gamma, self.whiten, self.lam, self.beta = lc.gamma, lc.whiten, lc.opd_lambda, lc.jsd_beta
        self.estimator, self.hybrid = lc.task_estimator, lc.hybrid
        self.sample_temperature = cfg.sampling.temperature
        self.teacher_temperature = cfg.scorer.temperature
        self.topk = cfg.scorer.topk
        self.needs_rewards = lc.loss in _REWARD_LOSSES
        self.needs_proximal = c.mode == "decoupled"
        self.logit_loss = self.distill in _LOGIT_LOSSES

    # ------------------------------------------------------------------------------- whole batch
    def prepare(self, batch: Batch) -> Batch:
        """Advantages over the whole consumed batch (detached): whitening and reward normalisation see it all."""
        adv = task = None
        if self.distill == "reverse_kl_pg":
            adv = L.distill_advantage(batch.behaviour, batch.teacher, batch.mask, self.gamma, self.whiten)
        if self.needs_rewards:
            if batch.rewards is None:
                raise ValueError(f"loss {self.loss_name} needs a verifier reward on every trajectory")
            if self.estimator == "grpo":
                task = L.grpo_advantage(batch.rewards, batch.groups)
            else:
                task = L.reinforce_pp_advantage(batch.rewards)
        if self.loss_name == "opd_penalty":
            adv = L.opd_penalty_advantage(task, batch.behaviour, batch.teacher, batch.mask, self.lam)
        return replace(batch, advantages=adv, task_advantages=task)

    def normaliser(self, step_rows: Batch) -> L.Normaliser:
        return L.Normaliser.of(step_rows.mask, self.constant)

    # ------------------------------------------------------------------------------ micro-batch
    def token_logprobs(self, rows: torch.Tensor, mb: Batch) -> torch.Tensor:
        """s_t at the sampling temperature, the one the behaviour logprobs b_t were taken at."""
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 logits are scored in fp32
        logp = torch.log_softmax(rows / self.sample_temperature, dim=-1)
        return logp.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)

    def micro_loss(
        self, rows: torch.Tensor, mb: Batch, norm: L.Normaliser
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (already divided by the step's counts) and its metric sums."""
        mask = mb.mask.to(rows.dtype)
        s = self.token_logprobs(rows, mb)
        b, q = mb.behaviour.to(s.dtype), mb.teacher.to(s.dtype)
        prox = mb.proximal.to(s.dtype) if mb.proximal is not None else None
        if self.logit_loss:
            per, terms = self._divergence(rows, s, b, mb, mask)
        else:
            terms = L.policy_loss(s, b, mb.advantages.to(s.dtype), mask, self.correction, prox)
            per = terms.per_token
        loss = L.aggregate(per, mask, self.aggregation, norm)
        if self.loss_name == "hybrid":
            task_adv = mb.task_advantages.to(s.dtype)[:, None].expand_as(s)
            rl = L.policy_loss(s, b, task_adv, mask, self.correction, prox)
            rl_loss = L.aggregate(rl.per_token, mask, self.aggregation, norm)
            loss = L.hybrid(rl_loss, loss, self.hybrid.rl_weight, self.hybrid.distill_weight)
        return loss, self._sums(rows, terms, b, q, mb, mask)

    def _divergence(self, rows, s, b, mb: Batch, mask) -> tuple[torch.Tensor, L.PolicyTerms]:
        logits = rows.to(s.dtype)  # at least fp32, like s
        ids, lp = mb.topk_ids, mb.topk_logprobs.to(s.dtype)
        t = self.teacher_temperature
        if self.distill == "topk_forward_kl":
            div = L.topk_forward_kl(logits, ids, lp, t)
        elif self.distill == "topk_reverse_kl":
            div = L.topk_reverse_kl(logits, ids, lp, t)
        else:
            div = L.gkd_jsd(logits, ids, lp, self.beta, t)
        if self.correction.mode in (
            "ppo_clip",
            "decoupled",
        ):  # only in hybrid: the clip belongs to the RL term
            weight = kept = torch.ones_like(s)
        else:
            weight, kept = L.divergence_weights(s, b, mask, self.correction)
        clipped = (weight >= self.correction.cap).to(s.dtype) if self.correction.mode == "tis" else 1 - kept
        return div * weight * kept, L.PolicyTerms(div, weight, clipped, kept)

    @torch.no_grad()
    def _sums(self, rows, terms: L.PolicyTerms, b, q, mb: Batch, mask) -> dict[str, float]:
        m = mask > 0
        kl_tok = b - L.floor_logprobs(q)
        seq_kl = (torch.where(m, kl_tok, 0).sum(-1) / mask.sum(-1).clamp(min=1))[mask.sum(-1) > 0]
        out = {
            "tokens": float(mask.sum()),
            "importance_weight": float(terms.weight[m].sum()),
            "clip_fraction": float(terms.clipped[m].sum()),
            "masked_fraction": float((1 - terms.kept)[m].sum()),
            "reverse_kl": float(kl_tok[m].sum()),
            "reverse_kl_seq_min": float(seq_kl.min()) if len(seq_kl) else float("inf"),
            "reverse_kl_seq_max": float(seq_kl.max()) if len(seq_kl) else float("-inf"),
        }
        if mb.topk_ids is not None:
            out.update(self._topk_sums(rows, mb, m))
        return out

    def _topk_sums(self, rows, mb: Batch, m) -> dict[str, float]:
        """How much of the teacher's mass its top-k holds, how much the student puts there, and their overlap."""
        k = mb.topk_ids.shape[-1]
        logp = torch.log_softmax(rows.float() / self.teacher_temperature, dim=-1)
        student_on = logp.gather(-1, mb.topk_ids).exp().sum(-1)
        teacher_mass = mb.topk_logprobs.float().exp().sum(-1)
        own = logp.topk(k, dim=-1).indices
        overlap = (own.unsqueeze(-1) == mb.topk_ids.unsqueeze(-2)).any(-1).float().sum(-1) / k
        return {
            "teacher_topk_mass": float(teacher_mass[m].sum()),
            "student_topk_mass": float(student_on[m].sum()),
            "topk_overlap": float(overlap[m].sum()),
        }


def finish_metrics(sums: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted means of the micro-batch sums."""
    tokens = max(sum(d["tokens"] for d in sums), 1.0)
    out = {k: sum(d[k] for d in sums) / tokens for k in SUM_KEYS}
    out["reverse_kl_seq_min"] = min(d["reverse_kl_seq_min"] for d in sums)
    out["reverse_kl_seq_max"] = max(d["reverse_kl_seq_max"] for d in sums)
    if all(k in sums[0] for k in TOPK_KEYS):
        out.update({k: sum(d[k] for d in sums) / tokens for k in TOPK_KEYS})
    return out
