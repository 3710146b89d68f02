"""The engine contract and the update loop every learner engine shares.

One consumed batch is one learner step: it may be split into `minibatches` optimiser steps, and each of those into
micro-batches packed by length under a token budget, whose gradients accumulate before the step. A non-finite
loss or gradient skips that optimiser step (counted), so a NaN never reaches the weights.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from learner.batching import Batch, pack_by_length, split_minibatches
from learner.objective import Objective, finish_metrics
from opd.config import Config, LearnerConfig


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warmup, then constant or cosine."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    total = cfg.max_steps * cfg.minibatches
    progress = min(step, total) / total
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def response_rows(model, mb: Batch) -> torch.Tensor:
    """The logit rows that predict each response token: (B, T, V), differentiable."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    return logits.gather(1, mb.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


class Engine:
    """Subclasses provide the forward module, backward, the optimiser step and parameter gathering."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.cfg, self.lc = cfg, cfg.learner
        self.hf_model = model
        self.objective = Objective(cfg)
        self.skipped_steps = 0
        self.optimizer_steps = 0
        if self.lc.gradient_checkpointing:
            enable = (
                getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            )
            enable()
        model.train()

    # --- what engines differ in
    def forward_module(self):
        return self.hf_model

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, finite: bool) -> float:
        """Finish the optimiser step (or discard the gradients when not finite); return the grad norm."""
        raise NotImplementedError

    def current_lr(self) -> float:
        raise NotImplementedError

    def gathered(self):
        """Context in which every parameter holds its full value (ZeRO-3 shards them otherwise)."""
        return contextlib.nullcontext()

    def save_state(self, path: Path) -> None:
        """Optimiser, lr schedule and counters (the weights are saved in HF format by the learner)."""
        raise NotImplementedError

    def load_state(self, path: Path) -> None:
        raise NotImplementedError

    def _counters(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "optimizer_steps": self.optimizer_steps}

    def _set_counters(self, c: dict) -> None:
        self.skipped_steps, self.optimizer_steps = int(c["skipped_steps"]), int(c["optimizer_steps"])

    # --- shared loop
    def micro_batches(self, rows: Batch) -> list[Batch]:
        groups = pack_by_length(rows.lengths.tolist(), self.lc.micro_batch_size, self.lc.micro_batch_tokens)
        return [rows.select(g) for g in groups]

    @torch.no_grad()
    def proximal_logprobs(self, batch: Batch) -> torch.Tensor:
        """log pi_prox: the parameters at the start of the update, recomputed without gradient."""
        out = None
        groups = pack_by_length(batch.lengths.tolist(), self.lc.micro_batch_size, self.lc.micro_batch_tokens)
        for g in groups:
            mb = batch.select(g)
            s = self.objective.token_logprobs(response_rows(self.forward_module(), mb), mb)
            if out is None:  # in the learner's precision (fp32 or wider), not the wire's
                out = torch.zeros(batch.behaviour.shape, dtype=s.dtype, device=s.device)
            out[torch.tensor(g), : s.shape[1]] = s
        return out

    def step(self, batch: Batch) -> dict[str, float]:
        batch = self.objective.prepare(batch)
        if self.objective.needs_proximal:
            batch.proximal = self.proximal_logprobs(batch)
        sums, losses, norms = [], [], []
        for rows in split_minibatches(batch.size, self.lc.minibatches):
            step_rows = batch.select(rows)
            norm = self.objective.normaliser(step_rows)
            finite, total = True, 0.0
            for mb in self.micro_batches(step_rows):
                loss, metric_sums = self.objective.micro_loss(
                    response_rows(self.forward_module(), mb), mb, norm
                )
                if not torch.isfinite(loss):
                    finite = False  # the rest of this step is not computed; its gradients are discarded
                    break
                self.backward(loss)
                total += float(loss.detach())
                sums.append(metric_sums)
            grad_norm = self.apply(finite)
            self.optimizer_steps += 1
            if not finite or not math.isfinite(grad_norm):
                self.skipped_steps += 1
            losses.append(total if finite else float("nan"))
            norms.append(grad_norm)
        metrics = finish_metrics(sums) if sums else {}
        return {
            **metrics,
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            "lr": self.current_lr(),
            "skipped_steps": self.skipped_steps,
            "micro_batches": len(sums),
        }
