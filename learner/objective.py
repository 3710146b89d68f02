"""The configured training objective: which loss, which correction, how it is aggregated, and its metrics.

Split in two on purpose. `prepare` runs once over the whole consumed batch and computes everything that does
not depend on the parameters (advantages, whitening, group-normalised rewards); `micro_loss` runs per
micro-batch and divides by the optimiser step's full counts, so micro-batching never changes the update.
The loss itself is looked up in the registry `learner.losses.LOSSES`; nothing here branches on its name.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from learner import losses as L
from learner.batching import Batch
from opd.config import Config

EXTREMES = {"reverse_kl_seq_min": min, "reverse_kl_seq_max": max}  # every other sum is token-weighted


class Objective:
    def __init__(self, cfg: Config):
        lc = cfg.learner
        self.loss_name = lc.loss
        self.spec = L.loss_spec(lc.loss)
        self.term = L.teacher_term(lc.loss, lc.hybrid.distill)
        c = lc.correction
        self.correction = L.Correction(c.mode, c.level, c.cap, c.clip_eps, c.clip_eps_high, c.dual_clip)
        self.settings = L.LossSettings(
            correction=self.correction,
            gamma=lc.gamma,
            whiten=lc.whiten,
            opd_lambda=lc.opd_lambda,
            jsd_beta=lc.jsd_beta,
            teacher_temperature=cfg.scorer.temperature,
            hybrid_distill=lc.hybrid.distill,
            rl_weight=lc.hybrid.rl_weight,
            distill_weight=lc.hybrid.distill_weight,
        )
        self.aggregation = lc.aggregation
        self.constant = float(lc.aggregation_constant or cfg.sampling.max_new_tokens)
        self.task_advantage = L.TASK_ESTIMATORS[lc.task_estimator]
        self.sample_temperature = cfg.sampling.temperature
        self.teacher_temperature = cfg.scorer.temperature
        self.needs_rewards = self.spec.needs_rewards
        self.needs_proximal = c.mode == "decoupled"
        self.logit_loss = self.term.needs_topk  # the learner refuses trajectories without top-k then

    # ------------------------------------------------------------------------------- whole batch
    def prepare(self, batch: Batch) -> Batch:
        """Advantages over the whole consumed batch (detached): whitening and reward normalisation see it all."""
        task = adv = None
        if self.needs_rewards:
            if batch.rewards is None:
                raise ValueError(f"loss {self.loss_name} needs a verifier reward on every trajectory")
            task = self.task_advantage(batch.rewards, batch.groups)
        if self.spec.advantage is not None:
            adv = self.spec.advantage(batch.behaviour, batch.teacher, batch.mask, task, self.settings)
        return replace(batch, advantages=adv, task_advantages=task)

    def normaliser(self, step_rows: Batch) -> L.Normaliser:
        return L.Normaliser.of(step_rows.mask, self.constant)

    # ------------------------------------------------------------------------------ micro-batch
    def token_logprobs(self, rows: torch.Tensor, mb: Batch) -> torch.Tensor:
        """s_t at the sampling temperature, the one the behaviour logprobs b_t were taken at."""
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 logits are scored in fp32
        logp = torch.log_softmax(rows / self.sample_temperature, dim=-1)
        return logp.gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)

    def inputs(self, rows: torch.Tensor, mb: Batch) -> L.TokenInputs:
        """The micro-batch in the compute dtype (at least fp32, like s)."""
        s = self.token_logprobs(rows, mb)

        def cast(x):
            return None if x is None else x.to(s.dtype)

        return L.TokenInputs(
            s=s,
            b=mb.behaviour.to(s.dtype),
            q=mb.teacher.to(s.dtype),
            mask=mb.mask.to(s.dtype),
            logits=rows.to(s.dtype),
            advantages=cast(mb.advantages),
            task_advantages=cast(mb.task_advantages),
            proximal=cast(mb.proximal),
            topk_ids=mb.topk_ids,
            topk_logprobs=cast(mb.topk_logprobs),
            teacher_tail=cast(mb.teacher_tail),
            topk_weights=cast(mb.topk_weights),
        )

    def micro_loss(
        self, rows: torch.Tensor, mb: Batch, norm: L.Normaliser
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch (already divided by the step's counts) and its metric sums."""
        x = self.inputs(rows, mb)
        parts = self.spec.per_token(x, self.settings)
        loss = sum(p.scale * L.aggregate(p.terms.per_token, x.mask, self.aggregation, norm) for p in parts)
        return loss, self._sums(rows, parts, x, mb)

    @torch.no_grad()
    def _sums(self, rows, parts: list[L.Part], x: L.TokenInputs, mb: Batch) -> dict[str, float]:
        m = x.mask > 0
        kl_tok = x.b - L.floor_logprobs(x.q)
        seq_kl = (torch.where(m, kl_tok, 0).sum(-1) / x.mask.sum(-1).clamp(min=1))[x.mask.sum(-1) > 0]
        out = {
            "tokens": float(x.mask.sum()),
            "reverse_kl": float(kl_tok[m].sum()),
            "reverse_kl_seq_min": float(seq_kl.min()) if len(seq_kl) else float("inf"),
            "reverse_kl_seq_max": float(seq_kl.max()) if len(seq_kl) else float("-inf"),
            **_correction_sums(parts, m),
        }
        if mb.topk_ids is not None:
            out.update(self._topk_sums(rows, mb, m))
        return out

    def _topk_sums(self, rows, mb: Batch, m) -> dict[str, float]:
        """How much of the teacher's mass its top-k holds, how much the student puts there, and their overlap;
        with a teacher axis (a joined mixture) the route-weighted means over the teachers."""
        logp = torch.log_softmax(rows.float() / self.teacher_temperature, dim=-1)
        if mb.topk_weights is None:
            slabs = [(mb.topk_ids, mb.topk_logprobs, 1.0)]
        else:
            w = mb.topk_weights.float()
            slabs = [
                (mb.topk_ids[..., j, :], mb.topk_logprobs[..., j, :], w[..., j]) for j in range(w.shape[-1])
            ]
        k = mb.topk_ids.shape[-1]
        own = logp.topk(k, dim=-1).indices
        out = dict.fromkeys(("teacher_topk_mass", "student_topk_mass", "topk_overlap"), 0.0)
        for ids, lps, weight in slabs:
            student_on = logp.gather(-1, ids).exp().sum(-1)
            teacher_mass = lps.float().exp().sum(-1)
            overlap = (own.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).float().sum(-1) / k
            out["teacher_topk_mass"] += float((weight * teacher_mass)[m].sum())
            out["student_topk_mass"] += float((weight * student_on)[m].sum())
            out["topk_overlap"] += float((weight * overlap)[m].sum())
        return out


def _correction_sums(parts: list[L.Part], m: torch.Tensor) -> dict[str, float]:
    """Sums of what the correction did, per term.

    A loss of one term reports importance_weight, clip_fraction and masked_fraction. A loss of several (hybrid)
    also reports each term under its own prefix (rl_clip_fraction, distill_clip_fraction, ...), and the
    unprefixed names then read: the first (RL) term's weight, and the tokens that any term clipped or dropped, so
    a clipping RL term never hides behind an unclipped distillation term."""
    first = parts[0].terms
    clipped = torch.stack([p.terms.clipped for p in parts]).amax(0)
    dropped = torch.stack([1 - p.terms.kept for p in parts]).amax(0)
    out = {
        "importance_weight": float(first.weight[m].sum()),
        "clip_fraction": float(clipped[m].sum()),
        "masked_fraction": float(dropped[m].sum()),
    }
    for p in parts:
        if p.name:
            out[f"{p.name}_importance_weight"] = float(p.terms.weight[m].sum())
            out[f"{p.name}_clip_fraction"] = float(p.terms.clipped[m].sum())
            out[f"{p.name}_masked_fraction"] = float((1 - p.terms.kept)[m].sum())
    return out


def finish_metrics(sums: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted means of the micro-batch sums (min/max for the per-sequence extremes)."""
    tokens = max(sum(d["tokens"] for d in sums), 1.0)
    out = {}
    for key in sums[0]:
        if key == "tokens":
            continue
        if key in EXTREMES:
            out[key] = EXTREMES[key](d[key] for d in sums)
        else:
            out[key] = sum(d[key] for d in sums) / tokens
    return out
