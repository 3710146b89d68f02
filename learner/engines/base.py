"""The engine contract and the update loop every learner engine shares.

One consumed batch is one learner step: it may be split into `minibatches` optimiser steps, and each of those into
micro-batches packed by length under a token budget, whose gradients accumulate before the step. A non-finite
loss or gradient skips that optimiser step (counted), so a NaN never reaches the weights.

With several learner ranks (learner/ranks.py) every rank holds the same global batch; each optimiser step's rows
are split among the ranks by tokens (`balance_by_tokens`), and each rank runs only its share. The update still
equals one rank's update of the whole batch, because everything batch-wide is computed over the global batch on
every rank (advantages, whitening and group rewards in `prepare`; the loss normalisers of each optimiser step,
the same trick micro-batching uses), so each rank's loss is its part of one sum and the engine's reduction sums
the ranks' gradients. A non-finite loss on one rank skips the step on all (`RankGroup.all_true`), and the step's
metrics are summed over the ranks before they are reported.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from learner.batching import Batch, pack_by_length, split_minibatches
from learner.objective import EXTREMES, Objective, finish_metrics
from learner.ranks import RankGroup, balance_by_tokens
from opd.config import Config, LearnerConfig
from opd.models.vocab import real_logits, real_vocab


def lr_factor(step: int, cfg: LearnerConfig) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warmup, then constant or cosine."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    total = cfg.max_steps * cfg.minibatches
    progress = min(step, total) / total
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def response_rows(model, mb: Batch, vocab: int | None = None) -> torch.Tensor:
    """The logit rows that predict each response token: (B, T, V), differentiable. With `vocab`, only the first
    `vocab` columns (the tokenizer's real ids: opd.models.vocab), so every log-softmax downstream is over the real
    vocabulary, as the actor's behaviour logprobs and the teacher's are."""
    images = {} if mb.pixel_values is None else {"pixel_values": mb.pixel_values}
    logits = real_logits(
        model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, **images).logits, vocab
    )
    return logits.gather(1, mb.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _merge_sums(sums: list[dict[str, float]]) -> dict[str, float] | None:
    """Micro-batch metric sums as one (sums; min/max for the per-sequence extremes); None when there are none."""
    if not sums:
        return None
    out = {}
    for key in sums[0]:
        values = [d[key] for d in sums]
        out[key] = EXTREMES[key](values) if key in EXTREMES else sum(values)
    return out


class Engine:
    """Subclasses provide the forward module, backward, the optimiser step and parameter gathering.

    `aligned_passes`: whether every rank must run as many forward/backward passes per optimiser step as the
    others (DeepSpeed: ZeRO-2/3 reduce gradients in each backward, ZeRO-3 gathers parameters in each forward, so
    a pass one rank skips leaves the others waiting in a collective). A rank with fewer micro-batches then runs
    stand-in passes whose loss is 0 x the logits: zero gradient, the same collectives.
    `per_rank_state`: whether each rank saves and loads its own part of the engine state (DeepSpeed's ZeRO
    shards) rather than one copy that rank 0 writes; `reshards`: whether such a state written by another number of
    ranks can be made loadable (`reshard_state`). `gathers`: whether `gathered()` is a collective."""

    aligned_passes = False
    per_rank_state = False
    reshards = False
    gathers = False  # whether `gathered()` is a collective of every rank (ZeRO-3's parameter gather)

    def __init__(self, model: torch.nn.Module, cfg: Config, group: RankGroup | None = None):
        self.cfg, self.lc = cfg, cfg.learner
        self.group = group or RankGroup()
        self.rank_tokens = 0  # prompt + response tokens this rank ran in the last step
        self.apply_seconds = 0.0  # time in `apply` (reductions DeepSpeed runs there, the optimiser) last step
        self.hf_model = model
        self.vocab = real_vocab(model)  # read before an engine may shard the embedding (ZeRO-3)
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

    @classmethod
    def reshard_state(cls, path: Path, saved_ranks: int, ranks: int) -> None:
        """Make the engine state at `path`, written by `saved_ranks` ranks, loadable by `ranks` ranks (only called
        for engines that `reshards`). Rank 0 alone runs it, before any rank loads `path`."""
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
    def proximal_logprobs(self, batch: Batch, rows: list[int] | None = None) -> torch.Tensor:
        """log pi_prox: the parameters at the start of the update, recomputed without gradient, for `rows` (this
        rank's share; default all) of `batch`; the other rows stay 0 (another rank trains them)."""
        rows = list(range(batch.size)) if rows is None else rows
        lengths = batch.lengths.tolist()
        groups = pack_by_length(
            [lengths[r] for r in rows], self.lc.micro_batch_size, self.lc.micro_batch_tokens
        )
        groups = [[rows[i] for i in g] for g in groups]
        passes = self.group.max_int(len(groups)) if self.aligned_passes else len(groups)
        out = torch.zeros(batch.behaviour.shape, dtype=torch.float32, device=batch.behaviour.device)
        for k in range(passes):
            g = groups[k] if k < len(groups) else [0]  # a stand-in pass: its result is not kept
            mb = batch.select(g)
            s = self.objective.token_logprobs(response_rows(self.forward_module(), mb, self.vocab), mb)
            if k < len(groups):
                out = out.to(s.dtype)  # in the learner's precision (fp32 or wider), not the wire's
                out[torch.tensor(g), : s.shape[1]] = s
        return out

    def _shares(self, batch: Batch) -> list[tuple[list[int], list[int]]]:
        """Per optimiser step: its rows of `batch`, and the positions among them this rank trains."""
        plan = []
        lengths = batch.lengths.tolist()
        for rows in split_minibatches(batch.size, self.lc.minibatches):
            if self.group.size == 1:
                plan.append((rows, list(range(len(rows)))))
                continue
            shares = balance_by_tokens([lengths[r] for r in rows], self.group.size)
            plan.append((rows, shares[self.group.rank]))
        return plan

    def _accumulate(self, step_rows: Batch, mine: list[int], norm) -> tuple[bool, float, list[dict]]:
        """Forward and backward of this rank's rows (`mine`, positions in `step_rows`) of one optimiser step,
        with the step's normaliser `norm`: (all losses finite here, this rank's loss sum, metric sums)."""
        if self.group.size == 1:
            mbs = self.micro_batches(step_rows)
        else:
            mbs = self.micro_batches(step_rows.select(mine)) if mine else []
        passes = self.group.max_int(len(mbs)) if self.aligned_passes else len(mbs)
        finite, total, sums = True, 0.0, []
        for k in range(passes):
            real = k < len(mbs) and finite
            mb = mbs[k] if k < len(mbs) else step_rows.select([0])
            rows = response_rows(self.forward_module(), mb, self.vocab)
            if real:
                loss, metric_sums = self.objective.micro_loss(rows, mb, norm)
                if torch.isfinite(loss):
                    self.backward(loss)
                    total += float(loss.detach())
                    sums.append(metric_sums)
                    continue
                finite = False  # the rest of this step is not computed; its gradients are discarded
                if not self.aligned_passes:
                    break
            self.backward(rows.sum() * 0.0)  # a stand-in pass (see the class docstring)
        return finite, total, sums

    def step(self, batch: Batch) -> dict[str, float]:
        batch = self.objective.prepare(batch)  # over the global batch, on every rank alike
        plan = self._shares(batch)
        if self.objective.needs_proximal:
            mine = None if self.group.size == 1 else [rows[i] for rows, share in plan for i in share]
            batch.proximal = self.proximal_logprobs(batch, mine)
        lengths = batch.lengths.tolist()
        self.rank_tokens = sum(lengths[rows[i]] for rows, share in plan for i in share)
        sums, totals, finites, norms = [], [], [], []
        self.apply_seconds = 0.0
        for rows, mine in plan:
            step_rows = batch.select(rows)
            norm = self.objective.normaliser(step_rows)  # the optimiser step's counts, over every rank's rows
            finite, total, step_sums = self._accumulate(step_rows, mine, norm)
            sums += step_sums
            finite = self.group.all_true(finite)  # one rank's NaN skips the step on every rank
            t0 = time.perf_counter()
            grad_norm = self.apply(finite)
            self.apply_seconds += time.perf_counter() - t0
            self.optimizer_steps += 1
            if not finite or not math.isfinite(grad_norm):
                self.skipped_steps += 1
            totals.append(total)
            finites.append(finite)
            norms.append(grad_norm)
        metrics, totals, micro = self._over_ranks(sums, totals)
        losses = [t if f else float("nan") for t, f in zip(totals, finites, strict=True)]
        return {
            **metrics,
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(norms) / len(norms),
            "lr": self.current_lr(),
            "skipped_steps": self.skipped_steps,
            "micro_batches": micro,
        }

    def _over_ranks(self, sums: list[dict], totals: list[float]) -> tuple[dict[str, float], list[float], int]:
        """The step's metrics, loss sums per optimiser step and micro-batch count, over every rank's share."""
        if self.group.size == 1:
            return (finish_metrics(sums) if sums else {}), totals, len(sums)
        parts = self.group.all_gather_obj([_merge_sums(sums), totals, len(sums)])
        merged = [p[0] for p in parts if p[0] is not None]
        metrics = finish_metrics([_merge_sums(merged)]) if merged else {}
        totals = [sum(p[1][i] for p in parts) for i in range(len(totals))]
        return metrics, totals, sum(p[2] for p in parts)
