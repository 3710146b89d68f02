"""The plain torch engine: AdamW on one device, torch's own LR scheduler and state files."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from learner.checkpoint import safe_load
from learner.engines.base import Engine, lr_factor
from opd.config import Config


class TorchEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config):
        super().__init__(model, cfg)
        lc = self.lc
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, lc))
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def apply(self, finite: bool) -> float:
        grad_norm = float("nan")
        if finite:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.hf_model.parameters(), self.lc.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save({**state, "counters": self._counters()}, path / "engine.pt")

    def load_state(self, path: Path) -> None:
        state = safe_load(path / "engine.pt", map_location=self.lc.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._set_counters(state["counters"])
