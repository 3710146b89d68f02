"""The learner's held-out evaluation: between steps (inline), or in a thread on a copy of the weights (background).

Why a thread and not a process of its own: an evaluator process would load the student again, join the weight-sync
group as one more authenticated member and take its own share of the broadcast every version, and need a role in
the launcher, the supervisor and the port layout; a thread costs one copy of the weights in the learner's memory
(a plain tensor copy per evaluation, no network) and nothing else. Both compete for the same cores on one machine;
on a machine with cores to spare, or with the learner on a GPU, a thread's generation overlaps training just as
well. Only one evaluation runs at a time: one that falls due while another is still running is skipped and counted
(`eval_skipped`), so evaluation never takes more than one core's worth of the learner's time, and `eval_budget_s`
bounds each one.

Every evaluation reports the same fields, in the learner's step record (metrics.jsonl, the metrics stream,
Prometheus `opd_eval_accuracy`, wandb/TensorBoard): the first record after it ends, in background mode (which may
be a later step's), or the step's own record inline:
  eval_accuracy          correct / eval_problems
  eval_step              the learner step whose weights were evaluated
  eval_weight_version    their weight version
  eval_problems          held-out problems evaluated (fewer than the total when the budget ran out)
  eval_problems_total    problems in the held-out set
  eval_seconds           how long the evaluation took
  eval_finished_time     when it ended (unix time)
  eval_mode              inline | background
and, with a task mixture (task.kind: mixture), per task of it:
  eval_accuracy/<task>   correct / that task's problems evaluated
  eval_problems/<task>   that task's held-out problems evaluated
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from opd import tasks
from opd.config import Config
from opd.models.builds import EvalResult, evaluate_within
from opd.models.vision import vision_of
from opd.runtime.lifecycle import log

JOIN_ON_STOP_S = 5.0  # a stopping learner waits this long for a background evaluation's current batch


class Evaluator:
    """Evaluates the student every `learner.eval_every` steps, in the way `learner.eval_mode` says."""

    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        tokenizer,
        gathered: Callable[[], AbstractContextManager],
        problems: list[tasks.Problem],
    ):
        """`model`: the student the engine trains; `gathered`: the engine's context in which its full parameters
        are in place (ZeRO-3 shards them otherwise)."""
        self.lc, self.model, self.tokenizer, self.gathered = cfg.learner, model, tokenizer, gathered
        self.problems = problems
        self.vision = vision_of(model)  # a vision-language student's processor (None: text)
        self.max_new_tokens = cfg.sampling.max_new_tokens
        self.mode = tasks.verifier_mode(cfg.task)
        self._copy: torch.nn.Module | None = None  # background: what the thread evaluates
        self._thread: threading.Thread | None = None
        self._outcome: dict | BaseException | None = None
        self._cancel = threading.Event()
        self._warned_skip = False

    def due(self, step: int) -> bool:
        return bool(self.lc.eval_every and step % self.lc.eval_every == 0 and self.problems)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, step: int, version: int) -> dict:
        """Evaluate the weights of `step` (`version`): inline, its fields; background, the fields of starting it
        (the result comes from `collect` or `drain`)."""
        if self.lc.eval_mode == "inline":
            return self._fields(self._evaluate(self.model), step, version, "inline")
        if self._thread is not None:
            if not self._warned_skip:
                log.warning(
                    "evaluation due at step %d skipped: the one of an earlier step is still running (raise "
                    "learner.eval_every or lower learner.eval_budget_s / task.eval_size)",
                    step,
                )
                self._warned_skip = True
            return {"eval_skipped": 1}
        t0 = time.perf_counter()
        self._snapshot()
        self._thread = threading.Thread(
            target=self._background,
            args=(step, version, torch.get_num_threads()),
            name="evaluation",
            daemon=True,
        )
        self._thread.start()
        return {"eval_snapshot_seconds": time.perf_counter() - t0}

    def collect(self) -> dict:
        """A finished background evaluation's fields (once), else nothing; never waits."""
        thread = self._thread
        if thread is None or thread.is_alive():
            return {}
        return self._take()

    def drain(self) -> dict:
        """Wait for the running background evaluation (bounded by its budget) and return its fields."""
        if self._thread is None:
            return {}
        self._thread.join()
        return self._take()

    def close(self) -> None:
        """Stop a running evaluation after its current batch (the learner is stopping)."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(JOIN_ON_STOP_S)

    # ------------------------------------------------------------------------------ internals
    def _evaluate(self, model: torch.nn.Module) -> EvalResult:
        budget = self.lc.eval_budget_s or None
        return evaluate_within(
            model,
            self.tokenizer,
            self.problems,
            self.max_new_tokens,
            self.mode,
            self.lc.eval_batch_size,
            budget_s=budget,
            cancel=self._cancel.is_set,
            what="the student",
            vision=self.vision,  # the background copy is a fresh module: it keeps no Vision of its own
        )

    @staticmethod
    def _fields(result: EvalResult, step: int, version: int, mode: str) -> dict:
        per_task = {f"eval_accuracy/{name}": acc for name, acc in result.by_task.items()}
        per_task.update({f"eval_problems/{name}": n for name, n in result.problems_by_task.items()})
        return {
            **per_task,
            "eval_accuracy": result.accuracy,
            "eval_step": step,
            "eval_weight_version": version,
            "eval_problems": result.problems,
            "eval_problems_total": result.total,
            "eval_seconds": result.seconds,
            "eval_finished_time": time.time(),
            "eval_mode": mode,
        }

    @torch.no_grad()
    def _snapshot(self) -> None:
        """Copy the student's current weights into the evaluation copy (made the first time, same class, dtype
        and device), in the learner's thread, so training can change the student as soon as this returns."""
        with self.gathered():
            if self._copy is None:
                first = next(self.model.parameters())
                self._copy = type(self.model)(self.model.config).to(device=first.device, dtype=first.dtype)
                self._copy.requires_grad_(False)
            params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
            for name, p in self._copy.named_parameters():
                p.copy_(params[name])
            for name, b in self._copy.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])

    def _background(self, step: int, version: int, threads: int) -> None:
        torch.set_num_threads(
            threads
        )  # OpenMP's count is per thread: this one gets the learner's pinned count
        try:
            self._outcome = self._fields(self._evaluate(self._copy), step, version, "background")
        except BaseException as exc:  # re-raised in the learner's thread by _take
            self._outcome = exc

    def _take(self) -> dict:
        self._thread, outcome, self._outcome = None, self._outcome, None
        if isinstance(outcome, BaseException):
            raise RuntimeError(f"the background evaluation failed: {outcome}") from outcome
        return outcome or {}
