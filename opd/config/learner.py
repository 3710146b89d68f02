"""The learner section: loss, staleness correction, optimiser, engine, checkpoints.

Loss names are not listed here: `learner.loss` and `learner.hybrid.distill` are names of the loss registry
(learner/losses.py), which checks them and the inputs each loss needs when `load_config` runs its checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opd.config.base import Strict
from opd.config.precision import check_cpu_bf16


class CorrectionConfig(Strict):
    """How the learner reweights tokens sampled by an older policy (staleness correction); see README."""

    mode: Literal["none", "tis", "ppo_clip", "decoupled", "mask"] = Field(
        "tis",
        description="none | tis (min(exp(s-b), C)) | ppo_clip vs behaviour | decoupled (behaviour->proximal "
        "weight x clipped proximal->current ratio) | mask (drop tokens whose ratio leaves [1/C, C]).",
    )
    level: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token, or per sequence (geometric mean of its token ratios)."
    )
    cap: float = Field(2.0, ge=1.0, description="C of tis, decoupled and mask.")
    clip_eps: float = Field(
        0.2, gt=0, lt=1, description="PPO clip range 1-eps (and 1+eps unless clip_eps_high)."
    )
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip 1+eps_high (DAPO clip-higher); null = clip_eps."
    )
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="Dual-clip c: the loss of a negative-advantage token is at most c|A|; null = off.",
    )
    proximal: Literal["recompute", "none"] = Field(
        "recompute",
        description="decoupled needs proximal logprobs: one no-grad learner forward at the start of each update.",
    )


class HybridConfig(Strict):
    """loss: hybrid = rl_weight * RL loss (task_estimator on the verifier reward) + distill_weight * distill."""

    # A name of the loss registry (learner/losses.py), checked there at load time: the config knows no loss names.
    distill: str = Field("reverse_kl_pg", description="The distillation term.")
    rl_weight: float = Field(1.0, ge=0, description="lambda_rl.")
    distill_weight: float = Field(1.0, ge=0, description="lambda_distill.")


class DeepSpeedConfig(Strict):
    """Used when learner.engine: deepspeed (one learner rank; ZeRO shards optimiser state, gradients, weights)."""

    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage 0-3.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="DeepSpeed's precision: bf16 = bf16 weights and compute, fp32 master weights in the optimiser "
        "(on CPU too, where the CPU has native bf16). auto = bf16 on CUDA, fp32 on CPU.",
    )


class LearnerConfig(Strict):
    engine: Literal["torch", "deepspeed"] = Field(
        "torch", description="Training engine: plain torch, or DeepSpeed (ZeRO; pip install deepspeed)."
    )
    loss: str = Field(
        "reverse_kl_pg",
        description="Training loss: one of the losses registered in learner/losses.py (LOSSES; README: the loss "
        "family); the name and the inputs it needs are checked when the config is loaded.",
    )
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum"] = Field(
        "token_mean",
        description="Per-token losses to a scalar: token-mean, mean of sequence token-means, or sum/constant.",
    )
    aggregation_constant: float | None = Field(
        None, gt=0, description="Divisor of seq_sum per sequence; null = sampling.max_new_tokens."
    )
    gamma: float = Field(
        0.0, ge=0, le=1, description="Discount of future tokens' -(b-q) in the PG advantage."
    )
    whiten: bool = Field(False, description="Whiten PG advantages over the batch (mean 0, std 1).")
    task_estimator: Literal["grpo", "reinforce_pp"] = Field(
        "grpo",
        description="Task advantage of opd_penalty/hybrid: grpo (per prompt group) or reinforce_pp (batch).",
    )
    opd_lambda: float = Field(1.0, ge=0, description="lambda of opd_penalty: A = A_task - lambda (b - q).")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="beta of gkd_jsd (0 = forward KL, 1 = reverse KL).")
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)
    max_staleness: int = Field(
        4,
        ge=0,
        description="Drop (and count) samples more than this many weight versions old; actors pause ahead.",
    )
    max_steps: int = Field(
        200,
        ge=1,
        description="Learner steps (consumed batches); then the student is saved and the run stops.",
    )
    batch_size: int = Field(32, ge=1, description="Scored trajectories consumed per update.")
    minibatches: int = Field(
        1,
        ge=1,
        description="Optimiser steps per consumed batch (the batch is split; >1 makes ppo_clip/decoupled bite).",
    )
    micro_batch_size: int = Field(0, ge=0, description="Most sequences per forward/backward (0 = no limit).")
    micro_batch_tokens: int = Field(
        0, ge=0, description="Most padded tokens per forward/backward, packed by length (0 = no limit)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="After warmup: constant, or cosine to 0 at max_steps."
    )
    warmup_steps: int = Field(
        10, ge=0, description="Linear warmup from 0; a fresh Adam's first steps are otherwise too large."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="Save a resumable checkpoint every this many learner steps (0 = only when stopping).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep this many newest checkpoints.")
    replay_log: bool = Field(
        True,
        description="Write each step's scored messages to replay/ until the next checkpoint, so a resume re-trains "
        "them (exactly once); off saves that disk but loses the steps after the last checkpoint on a crash.",
    )
    eval_every: int = Field(
        20,
        ge=0,
        description="Learner steps between held-out evaluations (0 = none during training; `opd run` still "
        "evaluates the saved student at the end).",
    )
    eval_mode: Literal["inline", "background"] = Field(
        "inline",
        description="inline: the learner evaluates between steps (training waits; fastest for the tiny demo, "
        "whose evaluation takes a fraction of a second); background: a thread evaluates a copy of the weights "
        "while training goes on (one more copy of the weights in memory; it shares the learner's cores), and "
        "the result lands in the first step record after it ends, with the step and weight version it evaluated.",
    )
    eval_budget_s: float = Field(
        300.0,
        ge=0,
        description="An evaluation starts a batch only if it should end within this many seconds (judged by "
        "its slowest batch so far; the first batch always runs); the record says how many held-out problems the "
        "accuracy covers (eval_problems of eval_problems_total). 0 = no limit.",
    )
    eval_batch_size: int = Field(
        256,
        ge=1,
        description="Held-out problems generated together in one evaluation batch (the budget is checked "
        "between batches, so a smaller one stops closer to it).",
    )
    device: str = Field("cpu", description="torch device of the learner.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision of the torch engine: fp32, or bf16 autocast over fp32 master weights (loss "
        "math in fp32; on CPU needs native bf16: avx512_bf16/AMX). auto = fp32 on CPU; on CUDA bf16 when "
        "student.dtype is bfloat16, else fp32. DeepSpeed's is learner.deepspeed.dtype.",
    )
    batch_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Give up (an error naming what arrived) if no usable scored trajectory arrives for this long; "
        "messages dropped as too stale, duplicates and dead letters do not count as usable.",
    )

    @model_validator(mode="after")
    def _own_combinations(self) -> LearnerConfig:
        """Settings of this section that contradict each other. Which loss needs which inputs is the loss registry's
        check (learner.losses.config_errors, passed to load_config), since only the registry knows the losses."""
        c = self.correction
        if c.mode == "decoupled" and c.proximal == "none":
            raise ValueError(
                "correction.mode: decoupled needs the proximal policy; set learner.correction.proximal: recompute "
                "or pick mode tis/ppo_clip"
            )
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError("micro_batch_size is larger than batch_size; lower it or use 0 (no limit)")
        if self.minibatches > self.batch_size:
            raise ValueError("minibatches is larger than batch_size; each optimiser step needs a sequence")
        self._precision_fits()
        return self

    def _precision_fits(self) -> None:
        """bf16 on a CPU only where the CPU computes it natively; one precision field per engine."""
        on_cpu = "cuda" not in self.device
        if self.engine == "deepspeed" and self.dtype != "auto":
            raise ValueError(
                f"learner.dtype: {self.dtype} sets the torch engine's precision; with engine: deepspeed set "
                "learner.deepspeed.dtype instead (and leave learner.dtype: auto)"
            )
        if on_cpu and self.engine == "deepspeed" and self.deepspeed.dtype == "bf16":
            check_cpu_bf16("learner.deepspeed.dtype", "use dtype: fp32 (or auto) on this CPU")
        if on_cpu and self.engine == "torch" and self.dtype == "bf16":
            check_cpu_bf16("learner.dtype", "use learner.dtype: fp32 (or auto) on this CPU")
