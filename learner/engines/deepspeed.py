"""DeepSpeed engine: ZeRO 0-3 for the same update loop, on GPU (NCCL, bf16) or CPU (gloo; fp32, or bf16 where
the CPU has native bf16: DeepSpeed's CPU accelerator runs its bf16 mode, fp32 master weights in the optimiser).

The learner is one DeepSpeed rank. Gradient accumulation is caller-owned (`managed_gradient_accumulation:
false`): the number of micro-batches per step varies with the token budget, so DeepSpeed must not count them.
The default process group is created in-process from a HashStore, so no port or launcher is needed; the weight
broadcast group to the actors stays separate (weight_sync/).

DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, which runs whatever a pickle names: a
resume swaps in a checkpoint engine whose loads go through `safe_load` (weights only, plus the few DeepSpeed record
classes its optimizer state holds), so a tampered file is refused instead of executed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from learner.checkpoint import safe_load
from learner.engines.base import Engine, lr_factor
from opd.config import Config


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError(
            f"learner.engine: deepspeed needs the deepspeed package ({exc}); pip install deepspeed, "
            "or set learner.engine: torch"
        ) from None
    return deepspeed


def _ensure_default_group(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if "cuda" in device else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def checkpoint_classes() -> list[type]:
    """The DeepSpeed classes its checkpoints hold besides tensors and plain data (ZeRO stage, loss scaler, bf16/ZeRO
    fragment addresses): plain records whose unpickling sets attributes and calls nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with `load` replaced by `safe_load`; everything else is the wrapped engine's."""

    def __init__(self, inner):
        self._inner, self._allowed = inner, checkpoint_classes()

    def load(self, path, map_location=None):
        return safe_load(path, allowed=self._allowed, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def ds_config(cfg: Config) -> dict:
    lc = cfg.learner
    bf16 = lc.deepspeed.dtype == "bf16" or (lc.deepspeed.dtype == "auto" and "cuda" in lc.device)
    return {
        "train_micro_batch_size_per_gpu": 1,  # nominal: micro-batches are packed by tokens, see module doc
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config):
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            model.float()  # fp32 master weights, as the torch engine; DeepSpeed's bf16 mode casts its own copy
        super().__init__(model, cfg)
        deepspeed = _import_deepspeed()
        self._zero = deepspeed.zero
        _ensure_default_group(self.lc.device)
        lc = self.lc
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, lc))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg)
        )
        self.stage = lc.deepspeed.zero_stage

    def forward_module(self):
        return self.ds

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def apply(self, finite: bool) -> float:
        if not finite:
            self._discard_gradients()
            self.scheduler.step()  # the schedule counts optimiser steps, taken or skipped, like the torch engine
            return float("nan")
        if self.stage == 0:  # gradients live on the parameters: check them before DeepSpeed steps
            grads = [p.grad for p in self.hf_model.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if not math.isfinite(norm):
                self._discard_gradients()
                self.scheduler.step()
                return norm
        self.ds.step()
        if self.stage:
            norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _discard_gradients(self) -> None:
        """Drop what the skipped step accumulated, wherever this ZeRO stage keeps it."""
        self.ds.zero_grad()
        opt = self.ds.optimizer
        if hasattr(opt, "zero_grad"):
            opt.zero_grad(set_to_none=True)
        if getattr(opt, "averaged_gradients", None) is not None:
            for key in list(opt.averaged_gradients):
                opt.averaged_gradients[key] = None
        if hasattr(self.ds, "_unmanaged_backward_count"):
            self.ds._unmanaged_backward_count = 0

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag="ds", client_state={"counters": self._counters()})

    def load_state(self, path: Path) -> None:
        inner = self.ds.checkpoint_engine
        self.ds.checkpoint_engine = _WeightsOnlyLoads(inner)  # every file DeepSpeed reads goes through it
        try:
            loaded, client = self.ds.load_checkpoint(str(path), tag="ds")
        finally:
            self.ds.checkpoint_engine = inner
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}; resume needs the engine/ directory")
        self._set_counters(client["counters"])

    def gathered(self):
        params = list(self.hf_model.parameters())
        return self._zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3)
