"""The plain torch engine: AdamW on one device, torch's own LR scheduler and state files."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from learner.checkpoint import safe_load
from learner.engines.base import Engine, lr_factor
from opd.config import Config


def compute_dtype(cfg: Config) -> torch.dtype:
    """The torch engine's compute precision: learner.dtype, with auto = fp32 on CPU and, on CUDA, bf16 when the
    student's weights are bf16 (its actors' regime) else fp32."""
    lc = cfg.learner
    if lc.dtype == "auto":
        bf16_student = getattr(cfg.student, "dtype", "float32") == "bfloat16"
        return torch.bfloat16 if "cuda" in lc.device and bf16_student else torch.float32
    return torch.bfloat16 if lc.dtype == "bf16" else torch.float32


class _Autocast:
    """The model's forward under bf16 autocast: matmuls in bf16 from the fp32 master weights, reductions and
    norms in fp32; the objective upcasts the logits before any log-softmax, so the loss math stays fp32."""

    def __init__(self, model: torch.nn.Module, device_type: str):
        self.model, self.device_type = model, device_type

    def __call__(self, **inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(**inputs)


class TorchEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config):
        # fp32 master weights: Adam's updates (~lr x weight) vanish below bf16's 8-bit mantissa, so a student
        # loaded in 16 bits (student.dtype) is trained in fp32; the weight broadcast still sends its own dtype.
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            model.float()
        super().__init__(model, cfg)
        lc = self.lc
        self.dtype = compute_dtype(cfg)
        device_type = torch.device(lc.device).type
        self._forward = _Autocast(model, device_type) if self.dtype == torch.bfloat16 else model
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, lc))
        self.optimizer.zero_grad(set_to_none=True)

    def forward_module(self):
        return self._forward

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
