"""Plain torch training engine: collate scored trajectories, recompute s_t, one AdamW step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from learner.losses import reverse_kl_pg
from opd.config import LearnerConfig
from opd.protocol import Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B, T) index of the logit row that predicts each response token
    targets: torch.Tensor  # (B, T) response token ids
    mask: torch.Tensor  # (B, T) 1 on real response tokens
    behaviour: torch.Tensor  # (B, T) b_t
    teacher: torch.Tensor  # (B, T) q_t
    num_tokens: int


def collate(trajs: list[Trajectory], pad_id: int, device: str) -> Batch:
    width = max(len(t.prompt_token_ids) + len(t.response_token_ids) for t in trajs)
    resp = max(len(t.response_token_ids) for t in trajs)
    B = len(trajs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    pos = torch.zeros((B, resp), dtype=torch.long)
    tgt = torch.zeros((B, resp), dtype=torch.long)
    mask = torch.zeros((B, resp), dtype=torch.float32)
    b = torch.zeros((B, resp), dtype=torch.float32)
    q = torch.zeros((B, resp), dtype=torch.float32)
    for i, t in enumerate(trajs):
        P, T = len(t.prompt_token_ids), len(t.response_token_ids)
        ids[i, :P] = torch.tensor(t.prompt_token_ids, dtype=torch.long)
        ids[i, P : P + T] = torch.tensor(t.response_token_ids, dtype=torch.long)
        attn[i, : P + T] = 1
        pos[i, :T] = torch.arange(P - 1, P - 1 + T)
        tgt[i, :T] = ids[i, P : P + T]
        mask[i, :T] = 1
        b[i, :T] = torch.tensor(t.behaviour_logprobs)  # copies: wire arrays are read-only views
        q[i, :T] = torch.tensor(t.teacher_logprobs)
    to = lambda x: x.to(device)  # noqa: E731
    return Batch(to(ids), to(attn), to(pos), to(tgt), to(mask), to(b), to(q), int(mask.sum()))


def token_logprobs(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """s_t for every response token, differentiable: (B, T)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L, V)
    rows = logits.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, T, V)
    logp = torch.log_softmax(rows.float() / temperature, dim=-1)
    return logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warmup, then constant or cosine."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    progress = min(step, cfg.max_steps) / cfg.max_steps
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


class TorchEngine:
    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, temperature: float):
        self.model, self.cfg, self.temperature = model, cfg, temperature
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, cfg))
        self.skipped_steps = 0

    def step(self, batch: Batch) -> dict[str, float]:
        s = token_logprobs(self.model, batch, self.temperature)
        out = reverse_kl_pg(s, batch.behaviour, batch.teacher, batch.mask, self.cfg.is_cap)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not torch.isfinite(out.loss) or not torch.isfinite(grad_norm):
            self.skipped_steps += 1  # a NaN/inf never reaches the optimiser
        else:
            self.optimizer.step()
        self.scheduler.step()
        return {
            "lr": self.scheduler.get_last_lr()[0],
            "loss": float(out.loss.detach()),
            "reverse_kl": float(out.reverse_kl),
            "importance_weight": float(out.importance_weight),
            "clip_fraction": float(out.clip_fraction),
            "grad_norm": float(grad_norm),
            "skipped_steps": self.skipped_steps,
        }
