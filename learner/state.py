"""The learner's state and the files that hold it: checkpoints, the replay log, the trained-ids ledger, the final
student and the learner's summary.

`Progress` is everything a resume must restore besides the model and the optimiser (step, weight version, the
trained ids in order, histories, counters); `RunFiles` writes and reads it under the run directory. The formats
are the ones `learner/checkpoint.py` documents, plus `trained_ids.txt` (one id a line, in training order: the
run's exactly-once record that the chaos tests count) and `learner_summary.json` (the launcher merges it into
summary.json).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.checkpoint import CheckpointStore, read_state, watched_write, write_state
from opd.config import LearnerConfig

KL_WINDOW = 5  # reverse_kl_first/last are means over this many steps, so one noisy batch does not decide
# Reporter counters a checkpoint keeps, so a resumed run's totals continue rather than restart at zero.
COUNTERS_KEPT = (
    "dropped_stale",
    "duplicates_skipped",
    "dead_lettered",
    "temperature_mismatch",
    "trajectories_trained",
    "tokens_trained",
    "joined_copies",  # a mixture's scored copies beyond the first (learner/join.py)
    "partial_joins",  # mixtures trained after their join timed out, on the teachers present
)
# per-teacher counters: trained (learner/learner.py teacher_shares) and join timeouts (learner/intake.py)
PER_TEACHER = ("trajectories_trained:", "join_timeouts:")


@dataclass
class Student:
    """The model being trained, its tokenizer and the engine that owns its parameters and optimiser.
    `vocab_size` is read before the engine may shard the embedding (ZeRO-3)."""

    model: torch.nn.Module
    tokenizer: Any
    engine: Any  # learner.engines.base.Engine
    vocab_size: int
    # a vision-language student's processor (opd.models.vision.Vision): its images' pixel values; None: text
    vision: Any = None


def _save_processing(student: Student, where: Path) -> None:
    """The tokenizer, or a vision-language student's whole processor (tokenizer, image processor and its
    placeholder settings): the saved student then loads with AutoProcessor as the built one did."""
    (student.vision.processor if student.vision is not None else student.tokenizer).save_pretrained(where)


class TrainedLedger:
    """Every trajectory id trained, in training order (the exactly-once record) and as a set (for dedupe)."""

    def __init__(self, ordered: Iterable[str] = ()):
        self.ordered: list[str] = list(ordered)
        self._ids = set(self.ordered)

    def __contains__(self, trajectory_id: object) -> bool:
        return trajectory_id in self._ids

    def __len__(self) -> int:
        return len(self.ordered)

    def extend(self, ids: Iterable[str]) -> None:
        for i in ids:
            self.ordered.append(i)
            self._ids.add(i)


@dataclass
class Progress:
    """What the loop advances and a checkpoint keeps. `version` is the weight version the actors were (or are
    being) sent; lag is measured against it."""

    max_staleness: int
    step: int = 0
    version: int = 0
    trained: TrainedLedger = field(default_factory=TrainedLedger)
    kl_history: list[float] = field(default_factory=list)
    lag_histogram: list[int] = field(default_factory=list)  # response tokens trained per lag 0, 1, ...
    max_policy_version: int = -1
    counters: dict[str, float] = field(
        default_factory=dict
    )  # restored ones only; the Reporter owns live ones
    resumed_from: str | None = None

    def __post_init__(self) -> None:
        if not self.lag_histogram:
            self.lag_histogram = [0] * (self.max_staleness + 1)

    def record(
        self, ids: list[str], lag_counts: list[int], policy_versions: list[int], reverse_kl: float
    ) -> None:
        """Account for one trained batch; `lag_counts`: its response tokens per lag 0, 1, ... (the step record's
        lag_histogram), summed over the run for summary.json."""
        if len(lag_counts) > len(self.lag_histogram):  # resumed with a larger max_staleness
            self.lag_histogram.extend([0] * (len(lag_counts) - len(self.lag_histogram)))
        for i, n in enumerate(lag_counts):
            self.lag_histogram[i] += n
        self.max_policy_version = max(self.max_policy_version, *policy_versions)
        self.trained.extend(ids)
        self.kl_history.append(reverse_kl)

    def to_json(self, counters: dict[str, float]) -> dict:
        return {
            "step": self.step,
            "version": self.version,
            "trained_log": self.trained.ordered,
            "kl_history": self.kl_history,
            "lag_histogram": self.lag_histogram,
            "max_policy_version": self.max_policy_version,
            "counters": {
                k: v for k, v in counters.items() if k in COUNTERS_KEPT or k.startswith(PER_TEACHER)
            },
        }

    @classmethod
    def from_json(cls, st: dict, max_staleness: int, resumed_from: str) -> Progress:
        """A state.json's progress. One written before lag was counted per token holds trajectories per lag in
        lag_histogram; it loads the same (a list per lag), and the steps after the resume add tokens to it."""
        return cls(
            max_staleness=max_staleness,
            step=st["step"],
            version=st["version"],
            trained=TrainedLedger(st["trained_log"]),
            kl_history=st["kl_history"],
            lag_histogram=st["lag_histogram"],
            max_policy_version=st["max_policy_version"],
            counters=dict(st["counters"]),
            resumed_from=resumed_from,
        )


class RunFiles:
    """The learner's files under the run directory: checkpoints, replay log, ledger, final student, summary."""

    def __init__(self, out_dir: Path, cfg: LearnerConfig):
        self.out_dir, self.device, self.num_ranks = out_dir, cfg.device, cfg.num_ranks
        self.checkpoints = CheckpointStore(out_dir, cfg.keep_checkpoints)
        self.ledger = out_dir / "ledger"
        self.ledger.mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------------------- checkpoints
    def latest(self) -> Path | None:
        return self.checkpoints.latest()

    def load_weights(self, model: torch.nn.Module, checkpoint: Path) -> None:
        """The checkpoint's student weights into `model`, before an engine takes over its parameters."""
        from safetensors.torch import load_file

        path, state = checkpoint / "model", {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(f, device=str(self.device)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied lm_head is saved once
            raise RuntimeError(
                f"checkpoint {path} does not fit the student: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    def restore(self, checkpoint: Path, engine, max_staleness: int) -> Progress:
        """The optimiser into `engine`, the torch RNG into this process, and the progress to continue from.
        Every learner rank calls it (DeepSpeed reads each rank's shards together)."""
        self.check_ranks(checkpoint, engine)
        engine.load_state(checkpoint / "engine")
        return Progress.from_json(read_state(checkpoint), max_staleness, checkpoint.name)

    @staticmethod
    def saved_ranks(checkpoint: Path) -> int:
        """How many learner ranks wrote `checkpoint` (state.json; 1 before there were several)."""
        return int(json.loads((checkpoint / "state.json").read_text()).get("num_ranks", 1))

    def check_ranks(self, checkpoint: Path, engine) -> None:
        """Refuse a checkpoint whose engine state was sharded over another number of ranks than this run's when
        the engine cannot reshard it: its shards would not fit. A replicated state (the torch engine's) fits any
        number; DeepSpeed's ZeRO shards are converted first (`reshard`)."""
        saved = self.saved_ranks(checkpoint)
        if saved != self.num_ranks and engine.per_rank_state and not engine.reshards:
            raise RuntimeError(
                f"checkpoint {checkpoint} was written by {saved} learner rank(s), but learner.num_ranks is "
                f"{self.num_ranks}: its engine state is sharded per rank and cannot be loaded by another number "
                f"of ranks; resume with learner.num_ranks={saved}"
            )

    def reshard(self, checkpoint: Path, engine_cls) -> None:
        """Before any rank loads `checkpoint` (rank 0 alone): make a sharded engine state written by another number
        of ranks loadable by this run's (`Engine.reshard_state`), or refuse it."""
        self.check_ranks(checkpoint, engine_cls)
        saved = self.saved_ranks(checkpoint)
        if saved != self.num_ranks and engine_cls.per_rank_state:
            t0 = time.monotonic()
            engine_cls.reshard_state(checkpoint / "engine", saved, self.num_ranks)
            self.checkpoints.log(
                f"resharded {checkpoint.name}'s engine state from {saved} to {self.num_ranks} learner rank(s) "
                f"in {time.monotonic() - t0:.1f}s"
            )

    def save_checkpoint(self, progress: Progress, counters: dict[str, float], student: Student) -> Path:
        state = {**progress.to_json(counters), "num_ranks": self.num_ranks}

        def write(tmp: Path) -> None:
            with student.engine.gathered():
                student.model.save_pretrained(tmp / "model", safe_serialization=True)
            _save_processing(student, tmp / "model")
            student.engine.save_state(tmp / "engine")
            write_state(tmp, state)

        return self.checkpoints.save(progress.step, write)

    # ---------------------------------------------------------------------------- replay log
    def log_step(self, step: int, payloads: list[bytes]) -> None:
        self.checkpoints.log_step(step, payloads)

    def replay_after(self, step: int) -> list[tuple[int, list[bytes]]]:
        return self.checkpoints.replay_after(step)

    # ---------------------------------------------------------------------------- the end
    def save_final(self, progress: Progress, student: Student) -> Path:
        """trained_ids.txt and the final student (HF format), which replaces an earlier incarnation's."""
        (self.out_dir / "trained_ids.txt").write_text("".join(i + "\n" for i in progress.trained.ordered))
        final = self.out_dir / "student"
        tmp = self.out_dir / ".student.tmp"
        weight_bytes = sum(p.numel() * p.element_size() for p in student.model.parameters())
        with watched_write(tmp, "the final student", weight_bytes or None, self.checkpoints.log):
            with student.engine.gathered():
                student.model.save_pretrained(tmp, safe_serialization=True)
            _save_processing(student, tmp)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run replaces the earlier final student
        tmp.rename(final)
        return final

    def write_summary(self, summary: dict) -> None:
        (self.out_dir / "learner_summary.json").write_text(json.dumps(summary, indent=2))


def summary(
    progress: Progress, engine, cfg: LearnerConfig, counters: dict[str, float], stopped_by: str
) -> dict:
    """learner_summary.json: the launcher spreads these fields into the run's summary.json."""
    kl = progress.kl_history
    w = min(KL_WINDOW, max(1, len(kl) // 2))
    return {
        "learner_steps": progress.step,
        "weight_version": progress.version,
        "trajectories_trained": len(progress.trained),
        "resumed_from": progress.resumed_from,
        "max_policy_version_trained": progress.max_policy_version,
        "reverse_kl_first": sum(kl[:w]) / w if kl else None,
        "reverse_kl_last": sum(kl[-w:]) / w if kl else None,
        "skipped_steps": engine.skipped_steps,
        "optimizer_steps": engine.optimizer_steps,
        "dropped_stale": int(counters.get("dropped_stale", 0)),
        "lag_histogram": progress.lag_histogram,
        "loss": cfg.loss,
        "correction": cfg.correction.mode,
        "engine": cfg.engine,
        "learner_ranks": cfg.num_ranks,
        "dead_lettered": int(counters.get("dead_lettered", 0)),
        "temperature_mismatch": int(counters.get("temperature_mismatch", 0)),
        "duplicates_skipped": int(counters.get("duplicates_skipped", 0)),
        "joined_copies": int(counters.get("joined_copies", 0)),
        "partial_joins": int(counters.get("partial_joins", 0)),
        "stopped_by": stopped_by,
    }
