"""Distillation losses as pure tensor functions (notation of DESIGN.md).

Per response token t: s_t = log pi_theta (learner, differentiable), b_t = behaviour logprob (actor at sampling
time), q_t = teacher logprob, m_t = mask. All inputs are (B, T) and padded positions carry m_t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    reverse_kl: (
        torch.Tensor
    )  # scalar, detached: token-mean of b_t - q_t, a sample estimate of KL(student || teacher)
    importance_weight: torch.Tensor  # scalar, detached: token-mean of the truncated weight
    clip_fraction: torch.Tensor  # scalar, detached: share of tokens whose weight hit the cap


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean over the mask; 0 (not NaN) when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def truncated_importance_weight(s: torch.Tensor, b: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(s - b), C), detached: corrects for the actor sampling with older weights (TIS)."""
    return torch.exp(s.detach() - b).clamp(max=cap)


def reverse_kl_pg(
    s: torch.Tensor, b: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, is_cap: float
) -> LossOutput:
    """Sampled-token reverse KL used as a per-token advantage: A_t = q_t - b_t (= -(b_t - q_t)).

    loss = -mean_t [ w_t * A_t * s_t ] with w_t = min(exp(s_t - b_t), C). Its gradient, -w_t A_t grad s_t, is the
    policy gradient of -KL(pi || teacher) evaluated on the actor's samples.
    """
    mask = mask.to(s.dtype)
    advantage = (q - b).detach()  # (B, T)
    weight = truncated_importance_weight(s, b, is_cap)  # (B, T)
    loss = -masked_mean(weight * advantage * s, mask)
    clipped = (torch.exp(s.detach() - b) > is_cap).to(s.dtype)
    return LossOutput(
        loss=loss,
        reverse_kl=masked_mean(b - q, mask).detach(),
        importance_weight=masked_mean(weight, mask),
        clip_fraction=masked_mean(clipped, mask),
    )
