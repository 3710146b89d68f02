"""DeepSpeed engine: ZeRO 0-3 for the same update loop, on GPU (NCCL, bf16) or CPU (gloo; fp32, or bf16 where
the CPU has native bf16: DeepSpeed's CPU accelerator runs its bf16 mode, fp32 master weights in the optimiser).

Gradient accumulation is caller-owned (`managed_gradient_accumulation: false`): the number of micro-batches per
step varies with the token budget, so DeepSpeed must not count them. One learner rank creates its default process
group in-process from a HashStore (no port or launcher needed); several (`learner.num_ranks`) share the group
learner/ranks.py made, and ZeRO shards across it. Either way the weight broadcast group to the actors stays
separate (weight_sync/).

Several ranks, one update: DeepSpeed averages gradients over the data-parallel ranks, while each rank's loss is
already its part of the global batch's loss (normalisers over the global batch), so the loss is multiplied by the
number of ranks before backward and the average becomes the sum. ZeRO stage 0 is the exception: its all-reduce is
ours (a sum, timed), so its gradient-norm check sees the reduced gradients, the same on every rank.

DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, which runs whatever a pickle names: a
resume swaps in a checkpoint engine whose loads go through `safe_load` (weights only, plus the few DeepSpeed record
classes its optimizer state holds), so a tampered file is refused instead of executed.

Another number of ranks: ZeRO-1/2/3 shards are cut for the number of ranks that wrote them, so a resume with
another `learner.num_ranks` goes through DeepSpeed's universal checkpoint. Rank 0 converts the checkpoint's
`engine/ds` once into `engine/universal` (DeepSpeed's `ds_to_universal`: every parameter's fp32 value and Adam
moments whole, plus the step counters), and every rank loads that with DeepSpeed's `load_universal`, taking its own
new shard. The converter and the universal loader call `torch.load` themselves, so both run under torch's own
weights-only switch (TORCH_FORCE_WEIGHTS_ONLY_LOAD) with the same allowed classes. ZeRO-0 keeps one replicated copy
(rank 0 writes it), which any number of ranks loads as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from pickle import UnpicklingError

import torch

from learner.checkpoint import UnsafeCheckpoint, safe_load
from learner.engines.base import Engine, lr_factor
from learner.ranks import RankGroup
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


UNIVERSAL = "universal"  # engine/universal: the checkpoint's ZeRO state converted for any number of ranks
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's switch: every torch.load reads weights only


def shard_count(path: Path) -> int:
    """How many ranks wrote the ZeRO state under `path` (a checkpoint's engine/): one optimizer shard file each;
    0 for ZeRO-0, whose one replicated copy rank 0 writes."""
    return len(list((path / "ds").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


@contextlib.contextmanager
def _weights_only_torch_loads(where: Path) -> Iterator[None]:
    """Every `torch.load` inside reads tensors and plain data only (plus the DeepSpeed records of
    `checkpoint_classes`), even where DeepSpeed passes weights_only=False itself: its universal-checkpoint
    converter and loader read files directly, not through the checkpoint engine that `_WeightsOnlyLoads` wraps.
    The switch is process-wide while it is on; nothing else in the learner loads torch files meanwhile."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(checkpoint_classes()):
            yield
    except UnpicklingError as exc:
        # name what it wanted (torch's message goes on to advise allowlisting it, which is not the fix here)
        named = re.search(r"GLOBAL [\w.]+", str(exc))
        raise UnsafeCheckpoint(
            f"a file under {where} holds objects other than tensors and plain data "
            f"({named.group(0) if named else 'not a weights-only pickle'}); refusing "
            "to load it, since unpickling it could run code. Restore the checkpoint from a trusted copy, or "
            "resume from another checkpoint (move this one away)."
        ) from None
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


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


def _partition_float64(deepspeed, model: torch.nn.Module, cfg: Config) -> None:
    """Partition a float64 model for ZeRO-3 here, naming float32 as the dtype, as DeepSpeed would have done itself.

    ZeRO-3 turns the model's parameters into partitioned ones with `deepspeed.zero.Init(module=...)`, handing it
    the dtype of the model's first parameter, and Init refuses any but half, bfloat16 and float32. Whether float64
    passed depended on the CPU: DeepSpeed (0.19.8) honours the dtype given to Init only where its accelerator
    reports float16 support (on CPU, oneDNN float16: AVX512-FP16 or AMX-FP16); elsewhere it silently takes
    bfloat16. With a module that dtype casts nothing (it applies to tensors created inside `with Init()`), so
    where the assertion did not stop it the model trained as float64 weights over ZeRO's float32 master weights.
    Named float32, Init accepts it on every CPU and GPU, and DeepSpeed's own call then finds the parameters
    already partitioned. Only float64 models (the rank-equivalence tests) take this path: their forward stays
    float64, so one rank and two agree to float64 precision before the first update."""
    if not any(p.dtype == torch.float64 for p in model.parameters()):
        return
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config(cfg), dtype=torch.float32)


class DeepSpeedEngine(Engine):
    per_rank_state = True  # each rank writes and reads its own ZeRO shards
    reshards = True  # through DeepSpeed's universal checkpoint (module docstring)

    def __init__(self, model: torch.nn.Module, cfg: Config, group: RankGroup | None = None):
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            model.float()  # fp32 master weights, as the torch engine; DeepSpeed's bf16 mode casts its own copy
        super().__init__(model, cfg, group)
        self.aligned_passes = self.group.size > 1
        deepspeed = _import_deepspeed()
        self._zero = deepspeed.zero
        _ensure_default_group(self.lc.device)
        lc = self.lc
        if lc.deepspeed.zero_stage == 3:
            _partition_float64(deepspeed, model, cfg)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, lc))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg)
        )
        self.stage = lc.deepspeed.zero_stage
        self.gathers = self.stage == 3 and self.group.size > 1
        self._own_reduction = self.stage == 0 and self.group.size > 1
        if self._own_reduction:
            self.ds.enable_backward_allreduce = False  # reduced in `apply` (a sum), not in DeepSpeed's step
        # DeepSpeed's reductions average over the ranks; our per-rank losses are parts of one sum (module doc)
        self._loss_scale = 1.0 if self._own_reduction else float(self.group.size)

    def forward_module(self):
        return self.ds

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self._loss_scale if self._loss_scale != 1.0 else loss, scale_wrt_gas=False)

    def apply(self, finite: bool) -> float:
        if not finite:
            self._discard_gradients()
            self.scheduler.step()  # the schedule counts optimiser steps, taken or skipped, like the torch engine
            return float("nan")
        if self._own_reduction:
            self.group.sum_gradients(list(self.hf_model.parameters()))
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
            # as DeepSpeed's own overflow skip does: with several ranks, ZeRO-2 has already reduced this step's
            # gradients into its partition buffers (in each backward), which must not carry into the next step
            if hasattr(opt, "_release_preflattened_grad_buffers"):
                opt._release_preflattened_grad_buffers()
            for key in list(opt.averaged_gradients):
                opt.averaged_gradients[key] = None
                if getattr(opt, "all_grad_tensors", None) is not None:
                    opt.all_grad_tensors[key] = None
        if hasattr(self.ds, "_unmanaged_backward_count"):
            self.ds._unmanaged_backward_count = 0

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag="ds", client_state={"counters": self._counters()})

    def load_state(self, path: Path) -> None:
        """The ZeRO state at `path` (engine/): this rank's own shards when as many ranks wrote them, else its new
        shard of the universal copy that rank 0 made (`reshard_state`)."""
        saved = shard_count(path)
        universal = bool(saved) and saved != self.group.size
        if universal and not (path / UNIVERSAL).is_dir():
            raise RuntimeError(
                f"{path} holds ZeRO shards of {saved} ranks and no universal copy for {self.group.size}: rank 0 "
                "converts it before the ranks load it (DeepSpeedEngine.reshard_state)"
            )
        inner = self.ds.checkpoint_engine
        # every file DeepSpeed reads goes through a weights-only load: the universal loader reads some directly,
        # so there torch's own switch does it (one mechanism at a time: their allow-lists do not nest)
        if not universal:
            self.ds.checkpoint_engine = _WeightsOnlyLoads(inner)
        # load_universal is read by load_checkpoint alone (ZeRO prepares universal loading at initialisation)
        self.ds._config.load_universal_checkpoint = universal
        try:
            with _weights_only_torch_loads(path) if universal else contextlib.nullcontext():
                loaded, client = self.ds.load_checkpoint(str(path), tag=UNIVERSAL if universal else "ds")
        finally:
            self.ds.checkpoint_engine = inner
            self.ds._config.load_universal_checkpoint = False
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}; resume needs the engine/ directory")
        self._set_counters(client["counters"])

    @classmethod
    def reshard_state(cls, path: Path, saved_ranks: int, ranks: int) -> None:
        """Convert the ZeRO shards at `path` into DeepSpeed's universal checkpoint (`path`/universal), once: a
        later resume with yet another number of ranks reuses it. Written to a temporary folder and renamed, so an
        interrupted conversion leaves nothing half-made. One process does it (the converter's workers would be
        forked from a learner with threads and process groups), in time and memory about one read and one write
        of the engine state."""
        if shard_count(path) in (0, ranks) or (path / UNIVERSAL).is_dir():
            return  # ZeRO-0's replicated copy, shards that fit, or converted before
        _import_deepspeed()
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = path / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(path / "ds"),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our checkpoints carry no universal_checkpoint_info of their own
        )
        printed = io.StringIO()
        try:
            with _weights_only_torch_loads(path), contextlib.redirect_stdout(printed):
                ds_to_universal(args)
        except Exception as exc:
            raise RuntimeError(
                f"could not convert the ZeRO state of {saved_ranks} ranks in {path} for {ranks} ranks "
                f"(DeepSpeed's ds_to_universal: {type(exc).__name__}: {exc}); resume with "
                f"learner.num_ranks={saved_ranks}. Its output:\n{printed.getvalue()[-2000:]}"
            ) from exc
        tmp.rename(path / UNIVERSAL)
        # the converter's pointer to what it wrote, which names the temporary folder: the tag is ours to pass
        (path / "latest_universal").unlink(missing_ok=True)

    def gathered(self):
        params = list(self.hf_model.parameters())
        return self._zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3)
