"""In-process, synchronous harness that runs the OPD algorithm with the product's own pieces.

Why in-process: the quality and staleness benchmarks are about the *algorithm* (which loss, which correction,
how much lag), not the pipeline. The real run (`opd run`) puts actor, scorer and learner in separate processes
that talk through a broker, so the lag of each trained batch depends on process timing and the machine's load,
and two runs with one seed differ. Here one process, one torch thread, does sample -> score -> collate -> step in
a loop, so every run is fully deterministic per seed and the lag is exactly what we ask for. The pipeline's
timing-dependent lag is what `benchmarks/staleness.py` replaces by an exact lag s; throughput is benchmarked
elsewhere (BENCHMARKS.md).

What is the product's code here (nothing is re-implemented):
- sampling: `actors.engines.hf.HFEngine.sample` (the HF actor's sampler, behaviour logprobs at the sampling T),
- scoring: `teacher_scorers.backends.hf.HFTeacher.score` (teacher logprob of each sampled token, and top-k),
  behind the scorer's cross-tokenizer wrapper (`build_teacher`) for a teacher declared `tokenizer: different`,
- batching: `learner.batching.collate`,
- update: `learner.engines.torch.build_engine(model, cfg)` then `engine.step(batch)` (the learner's objective,
  correction, AdamW, lr schedule, grad clip),
- reward: `opd.tasks.verify` (the actor's verifier), held-out accuracy: `opd.models.builds.evaluate` (greedy),
- prompts: `opd.models.prompts.prompt_ids` (the chat template where the model has one, else BOS + text, as the
  actor), responses end at the template's end-of-turn token, and with `scorer.context` the teacher sees its own
  prompt (`HFTeacher.prompts`: the scorer's splice) both when scoring and when it samples for off-policy KD.

Exact staleness s: the learner's weights after k updates are version k. A ring keeps state_dict copies of the
last s+1 versions; the batch trained at step k (version k -> k+1) is sampled by version max(0, k - s), i.e.
every batch (after the first s) is exactly s versions old: the worst lag `learner.max_staleness = s` admits.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.engines.hf import HFEngine
from learner.batching import collate
from learner.engines import build_engine
from opd import tasks
from opd.config import Config
from opd.models.builds import Assets, evaluate, load_asset
from opd.models.prompts import prompt_ids, stop_token_id
from opd.models.sampler import sample
from opd.protocol import Trajectory
from teacher_scorers.backends import build_teacher
from teacher_scorers.backends.hf import HFTeacher

# What a method needs from the teacher, and who generates the trained responses.
ON_POLICY = "on_policy"  # student samples, teacher scores every sampled token (OPD, GKD, hybrid)
RL_ONLY = "rl_only"  # student samples, verifier reward only; the teacher is not called (GRPO)
OFF_POLICY_KD = "off_policy_kd"  # teacher samples at T=1, student minimises the token-mean NLL of them


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class StepRecord:
    step: int  # learner steps done after this one (1-based)
    policy_version: int  # version of the weights that sampled the batch
    lag: int  # learner version at the update - policy_version
    student_tokens: int  # cumulative response tokens the student generated
    teacher_tokens: int  # cumulative tokens the teacher scored or generated
    metrics: dict[str, float] = field(default_factory=dict)


class Harness:
    """One student being trained; `step()` runs sample -> score -> collate -> engine.step once."""

    def __init__(
        self,
        cfg: Config,
        assets: Assets,
        *,
        kind: str = ON_POLICY,
        staleness: int = 0,
        seed: int = 0,
        eval_max_new_tokens: int | None = None,
    ):
        if kind not in (ON_POLICY, RL_ONLY, OFF_POLICY_KD):
            raise ValueError(f"unknown method kind {kind!r}")
        torch.set_num_threads(1)
        torch.manual_seed(seed)  # the learner's seed (the engine itself draws nothing random today)
        self.cfg, self.kind, self.staleness = cfg, kind, staleness
        if kind == OFF_POLICY_KD:
            lc = cfg.learner
            if lc.loss != "reverse_kl_pg" or lc.correction.mode != "none" or lc.gamma or lc.whiten:
                raise ValueError(
                    "off-policy KD expresses NLL as reverse_kl_pg, correction none, gamma 0, no whitening"
                )
        self.sampler = HFEngine(
            cfg, assets
        )  # the actor's engine: its module samples with the ring's old weights
        crossed = cfg.scorer.tokenizer == "different"
        if kind == OFF_POLICY_KD and crossed:
            raise ValueError(
                "off-policy KD samples from the teacher in the student's ids: one tokenizer only"
            )
        # a teacher of another tokenizer: the scorer's own wrapper around the HF teacher
        self.teacher = (
            None if kind == RL_ONLY else build_teacher(cfg, assets) if crossed else HFTeacher(cfg, assets)
        )
        self.model, self.tokenizer = load_asset(assets.student, cfg.learner.device)
        self.engine = build_engine(self.model, cfg)
        self.version = 0
        self.ring: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=staleness + 1)
        self.ring.append((0, clone_state(self.model)))
        self.problems = tasks.training_stream(cfg.task, seed=seed)
        self.generator = torch.Generator().manual_seed(seed * 1000 + 7)
        self.mode = tasks.verifier_mode(cfg.task)
        self.eval_problems = tasks.eval_set(cfg.task)
        self.eval_max_new_tokens = eval_max_new_tokens or cfg.sampling.max_new_tokens
        self.stop_id = stop_token_id(self.tokenizer, cfg.task.chat_template == "auto")
        self.student_tokens = 0
        self.teacher_tokens = 0
        self.batch_no = 0

    # ------------------------------------------------------------------------------------- pieces
    def behaviour_version(self) -> int:
        return self.ring[0][0]

    def _prompts(self) -> tuple[list[tasks.Problem], list[list[int]]]:
        problems = [next(self.problems) for _ in range(self.cfg.actor.prompts_per_batch)]
        return problems, [prompt_ids(self.tokenizer, p) for p in problems]

    def rollout(self) -> list[Trajectory]:
        """One batch of prompts_per_batch x n trajectories sampled by version max(0, k - s)."""
        s = self.cfg.sampling
        problems, prompt_ids = self._prompts()
        version, state = self.ring[0]
        if self.kind == OFF_POLICY_KD:
            return self._teacher_samples(problems, prompt_ids)
        self.sampler.model.load_state_dict(state)
        self.sampler.model.eval()
        samples = self.sampler.sample([p for p in prompt_ids for _ in range(s.n)], self.generator)
        out = []
        for j, smp in enumerate(samples):
            p = problems[j // s.n]
            text = self.tokenizer.decode(smp.response_ids, skip_special_tokens=True)
            out.append(
                Trajectory(
                    run_id="harness",
                    prompt_id=p.prompt_id,
                    group_id=f"b{self.batch_no}-{j // s.n}",
                    sample_index=j % s.n,
                    prompt_token_ids=np.asarray(prompt_ids[j // s.n], dtype=np.int32),
                    response_token_ids=np.asarray(smp.response_ids, dtype=np.int32),
                    behaviour_logprobs=np.asarray(smp.behaviour_logprobs, dtype=np.float32),
                    policy_version=version,
                    finish_reason=smp.finish_reason,
                    behaviour_temperature=s.temperature,
                    reward=float(tasks.verify(p.answer, text, self.mode)),
                )
            )
        self.student_tokens += sum(len(t.response_token_ids) for t in out)
        if self.teacher is not None:
            self.teacher.score(out)
            self.teacher_tokens += sum(len(t.response_token_ids) for t in out)
        else:  # GRPO: the distillation term has weight 0; q = b makes it exactly 0 (and finite)
            for t in out:
                t.teacher_logprobs = t.behaviour_logprobs.copy()
        return out

    def _teacher_samples(self, problems, prompt_ids) -> list[Trajectory]:
        """Off-policy KD data: the teacher samples at T=1 from its own prompt (with `scorer.context`, the context's;
        the student trains on the response after its own prompt, as the scorer would score it); b = 0 and q = 1 make
        A_t = q - b = 1, so the engine's reverse_kl_pg with correction none is exactly -token_mean(log pi(y_t)),
        the NLL of the teacher's text."""
        n = self.cfg.sampling.n
        seen = [self.teacher.prompts.teacher_ids(p) for p in prompt_ids]
        samples = sample(
            self.teacher.model,
            [p for p in seen for _ in range(n)],
            eos_id=self.stop_id,
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=self.cfg.sampling.max_new_tokens,
            temperature=1.0,
            generator=self.generator,
        )
        out = []
        for j, smp in enumerate(samples):
            resp = np.asarray(smp.response_ids, dtype=np.int32)
            out.append(
                Trajectory(
                    run_id="harness",
                    prompt_id=problems[j // n].prompt_id,
                    group_id=f"b{self.batch_no}-{j // n}",
                    sample_index=j % n,
                    prompt_token_ids=np.asarray(prompt_ids[j // n], dtype=np.int32),
                    response_token_ids=resp,
                    behaviour_logprobs=np.zeros(len(resp), dtype=np.float32),
                    teacher_logprobs=np.ones(len(resp), dtype=np.float32),
                    policy_version=self.behaviour_version(),
                    reward=0.0,
                )
            )
        self.teacher_tokens += sum(len(t.response_token_ids) for t in out)
        return out

    # ---------------------------------------------------------------------------------------- step
    def step(self) -> StepRecord:
        t_roll = time.perf_counter()
        trajs = self.rollout()
        rollout_seconds = time.perf_counter() - t_roll
        self.batch_no += 1
        policy_version = min(t.policy_version for t in trajs)
        batch = collate(trajs, self.tokenizer.pad_token_id, self.cfg.learner.device)
        t0 = time.perf_counter()
        metrics = self.engine.step(batch)
        metrics["step_seconds"] = time.perf_counter() - t0
        metrics["rollout_seconds"] = rollout_seconds  # sampling + scoring (or the teacher's sampling)
        metrics["reward_mean"] = float(np.mean([t.reward for t in trajs]))
        lag = self.version - policy_version
        self.version += 1
        self.ring.append((self.version, clone_state(self.model)))
        return StepRecord(
            self.version, policy_version, lag, self.student_tokens, self.teacher_tokens, metrics
        )

    def evaluate(self) -> float:
        return evaluate(self.model, self.tokenizer, self.eval_problems, self.eval_max_new_tokens, self.mode)


def run(
    cfg: Config,
    assets: Assets,
    *,
    steps: int,
    eval_every: int,
    kind: str = ON_POLICY,
    staleness: int = 0,
    seed: int = 0,
    keep_metrics: tuple[str, ...] = ("reverse_kl", "loss", "reward_mean", "importance_weight"),
    eval_max_new_tokens: int | None = None,
    initial_accuracy: float | None = None,
) -> dict:
    """Train `steps` learner steps; held-out accuracy at step 0, every `eval_every` steps and at the end
    (greedy, `eval_max_new_tokens`, default the sampling's max_new_tokens). `initial_accuracy`: the step-0
    accuracy measured once by the caller (every run of a benchmark starts from the same student, and a real
    model's evaluation takes tens of seconds). Each evaluation records `wall_seconds` since the start."""
    h = Harness(
        cfg, assets, kind=kind, staleness=staleness, seed=seed, eval_max_new_tokens=eval_max_new_tokens
    )
    t0 = time.perf_counter()
    acc0 = h.evaluate() if initial_accuracy is None else initial_accuracy
    evals = [{"step": 0, "accuracy": acc0, "student_tokens": 0, "teacher_tokens": 0, "wall_seconds": 0.0}]
    records = []
    for k in range(steps):
        rec = h.step()
        records.append(
            {
                "step": rec.step,
                "policy_version": rec.policy_version,
                "lag": rec.lag,
                **{m: float(rec.metrics[m]) for m in keep_metrics if m in rec.metrics},
            }
        )
        if rec.step % eval_every == 0 or k == steps - 1:
            evals.append(
                {
                    "step": rec.step,
                    "accuracy": h.evaluate(),
                    "student_tokens": rec.student_tokens,
                    "teacher_tokens": rec.teacher_tokens,
                    "wall_seconds": time.perf_counter() - t0,
                }
            )
    return {"evals": evals, "steps": records, "wall_seconds": time.perf_counter() - t0}
