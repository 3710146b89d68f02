"""Learner process: consume scored trajectories, train, broadcast weights, evaluate, save the final student.

The parts, each built from what it needs, in the order their arguments force:
  state (learner/state.py)            the run directory's files and the progress a checkpoint restores
  student                             model (with checkpointed weights), broadcast layout, then the engine
  publisher (learner/publishing.py)   the weight-sync store, announcements, snapshots (needs the restored version)
  intake (learner/intake.py)          scored messages into batches (needs the trained-ids ledger)
and the loop below: take a batch, train, log the step, acknowledge, publish weights, evaluate, checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from broker import BrokerUnavailable
from learner.batching import Batch, collate
from learner.engines import build_engine
from learner.evaluation import Evaluator
from learner.intake import Contract, Intake, lag
from learner.publishing import WeightPublisher, record_layout
from learner.state import Progress, RunFiles, Student, summary
from opd import tasks
from opd.config import Config
from opd.models.builds import ensure_assets, load_asset
from opd.protocol import Streams, Trajectory, decode, stop_record
from opd.runtime.broker import open_broker
from opd.runtime.lifecycle import Reporter, StopFlag, log, run_component
from opd.runtime.service_time import pad_to_service_time
from opd.runtime.tracking import StepTracker
from weight_sync import WeightBroadcaster


def load_student(cfg: Config, files: RunFiles, checkpoint: Path | None) -> tuple[Student, WeightBroadcaster]:
    """The student and its broadcast layout, in the one order that works: the layout first, in the student's
    dtype (what the actors hold); then the checkpointed weights, into fp32 parameters when the student is bf16 or
    fp16 (the checkpoint holds the fp32 master weights: loaded into bf16 they would be rounded once per resume);
    then the engine (which upcasts to fp32 masters anyway, and may shard them: ZeRO-3)."""
    assets = ensure_assets(cfg, log=log.info)
    model, tokenizer = load_asset(assets.student, cfg.learner.device)
    layout = record_layout(model, cfg.weight_sync)
    if checkpoint is not None:
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            model.float()  # in place: the layout keeps the same parameters and its recorded dtypes
        files.load_weights(model, checkpoint)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    return Student(model, tokenizer, build_engine(model, cfg), vocab_size), layout


class Learner:
    def __init__(self, cfg: Config, stop: StopFlag, resume: bool = False):
        self.cfg, self.stop = cfg, stop
        torch.manual_seed(cfg.run.seed)
        self.files = RunFiles(Path(cfg.run.output_dir), cfg.learner)
        checkpoint = self.files.latest() if resume else None
        self.student, layout = load_student(cfg, self.files, checkpoint)
        self.broker = open_broker(cfg.broker, stopping=stop)
        self.reporter = Reporter(self.broker, cfg, "learner", 0.0)
        self.tracker = StepTracker(cfg)  # wandb / TensorBoard, when metrics.* enables them
        self.progress = self._restore(checkpoint)
        streams = Streams(cfg.run.run_id)
        self.publisher = WeightPublisher(
            cfg.weight_sync,
            layout,
            self.student.engine.gathered,
            self.broker,
            streams.control,
            cfg.run.run_id,
            self.files.out_dir,
            (cfg.learner.device, cfg.actor.device),
            version=self.progress.version,
        )
        objective = self.student.engine.objective
        self.intake = Intake(
            self.broker,
            self.reporter,
            streams,
            Contract.of(cfg, self.student.vocab_size, objective.needs_rewards, objective.logit_loss),
            cfg.learner,
            trained=self.progress.trained,
            stale_ledger=self.files.ledger / "learner.dropped_stale",
            stop=stop,
        )
        s = self.student
        self.evaluator = Evaluator(cfg, s.model, s.tokenizer, s.engine.gathered, tasks.eval_set(cfg.task))
        if resume:
            self._replay()

    # ------------------------------------------------------------------------------------ setup
    def _restore(self, checkpoint: Path | None) -> Progress:
        max_staleness = self.cfg.learner.max_staleness
        if checkpoint is None:
            return Progress(max_staleness)
        progress = self.files.restore(checkpoint, self.student.engine, max_staleness)
        self.reporter.counters.update(progress.counters)
        log.info("resumed from %s: step %d, weight version %d", checkpoint, progress.step, progress.version)
        return progress

    def _replay(self) -> None:
        """Re-train the steps after the checkpoint from the replay log, in order, then give the actors the
        resulting weights (they start from the initial student)."""
        p = self.progress
        for step, payloads in self.files.replay_after(p.step):
            batch = [decode(x, vocab_size=self.student.vocab_size, require_scored=True) for x in payloads]
            batch = [t for t in batch if t.id not in p.trained]
            record = {**self._train_step(batch, 0.0), "replayed": True} if batch else {"replayed": True}
            p.step = step
            if p.step % self.cfg.weight_sync.every == 0:
                p.version += 1  # the same numbering as the first run, so pending samples' lag stays true
            self._log(record)
        log.info("resumed at step %d, weight version %d; sending it to the actors", p.step, p.version)
        self.publisher.send(p.version)

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        cfg, p = self.cfg.learner, self.progress
        while p.step < cfg.max_steps and not self.stop():
            t0 = time.perf_counter()
            taken = self.intake.next_batch(
                p.version, while_waiting=lambda: self.publisher.catch_up(p.version)
            )
            if self.stop():
                break  # a partial batch stays pending (unacknowledged) rather than making an odd-sized step
            collated = self.intake.collate(taken, self._collate)
            if collated is None:
                continue  # every message of the batch was dead-lettered: no step
            record = self._train_step(taken.trajectories, time.perf_counter() - t0, collated)
            p.step += 1
            # Logged before the acknowledgement: a crash after it is re-trained from the log on resume, a crash
            # before it leaves these pending in the broker (then skipped as duplicates if both happen).
            if cfg.replay_log:
                self.files.log_step(p.step, taken.payloads)
            self.intake.ack(taken)
            if p.step % self.cfg.weight_sync.every == 0 and p.step < cfg.max_steps:
                p.version += 1
                record.update(self.publisher.send(p.version))
            self._evaluate(record)
            if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                record["checkpoint"] = self.save_checkpoint().name
            self._log(record)
        self.finish()

    def _collate(self, batch: list[Trajectory]) -> Batch:
        return collate(batch, self.student.tokenizer.pad_token_id, self.cfg.learner.device)

    def _train_step(
        self, batch: list[Trajectory], wait_s: float, collated: Batch | None = None
    ) -> dict[str, float]:
        """One update on `batch` (`collated`: its tensors, when already made); the step record's training fields."""
        t0 = time.perf_counter()
        lc = self.cfg.learner
        metrics = self.student.engine.step(collated if collated is not None else self._collate(batch))
        tokens = sum(len(t.response_token_ids) for t in batch)
        service_ms = self.cfg.pipeline.service_time.learner_ms_per_token
        pad_s = pad_to_service_time(t0, tokens, service_ms, self.stop.wait)
        step_s = time.perf_counter() - t0  # the update's whole duration, emulated service time included
        lags = [lag(t, self.progress.version) for t in batch]
        self.progress.record(
            [t.id for t in batch], lags, [t.policy_version for t in batch], metrics["reverse_kl"]
        )
        self.reporter.add(trajectories_trained=len(batch), tokens_trained=tokens)
        return {
            **metrics,
            "staleness_mean": sum(lags) / len(lags),
            "staleness_max": max(lags),
            "lag_histogram": [sum(max(g, 0) == i for g in lags) for i in range(lc.max_staleness + 1)],
            "dropped_stale": int(self.reporter.counters.get("dropped_stale", 0)),
            "tokens": tokens,
            "step_seconds": step_s,
            "service_pad_seconds": pad_s,
            "wait_seconds": wait_s,
            "trained_tokens_per_s": tokens / max(step_s + wait_s, 1e-9),
        }

    def _log(self, record: dict) -> None:
        p = self.progress
        record = {"step": p.step, "weight_version": p.version, "time": time.time(), **record}
        record.update({f"queue_{kind}": depth for kind, depth in self.reporter.queue_depths().items()})
        with open(self.files.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.reporter.export_step(record)
        self.tracker.log(record)
        self.reporter.maybe_send(
            force=True, **{k: v for k, v in record.items() if isinstance(v, int | float)}
        )

    def _evaluate(self, record: dict) -> None:
        """Into this step's `record`: a background evaluation that has ended since the last step, then this
        step's own when one is due (learner/evaluation.py lists the fields). The last step waits for a running
        one, so it is recorded; the final weights are then not evaluated here (a record holds one evaluation, and
        the launcher evaluates the saved student anyway: summary.json's student_accuracy_after)."""
        p, ev = self.progress, self.evaluator
        last = p.step >= self.cfg.learner.max_steps
        record.update(ev.drain() if last else ev.collect())
        if ev.due(p.step):
            record.update({"eval_skipped": 1} if "eval_accuracy" in record else ev.start(p.step, p.version))
        if last:
            record.update(ev.drain())

    def save_checkpoint(self) -> Path:
        return self.files.save_checkpoint(self.progress, self.reporter.counters, self.student)

    # ---------------------------------------------------------------------------------- cleanup
    def finish(self) -> None:
        """Save a resumable checkpoint and the final student (HF format), write a summary, tell everyone to stop."""
        self.publisher.finish()
        self.evaluator.close()
        self.save_checkpoint()
        final = self.files.save_final(self.progress, self.student)
        stopped_by = self.stop.reason or "max_steps"
        self.files.write_summary(
            summary(self.progress, self.student.engine, self.cfg.learner, self.reporter.counters, stopped_by)
        )
        self.tracker.close()
        log.info(
            "saved the final student to %s after %d steps (weight version %d)",
            final,
            self.progress.step,
            self.progress.version,
        )
        try:  # last, so a dead broker cannot cost the checkpoint or the summary
            self.broker.publish(self.publisher.control, [stop_record(stopped_by)])
            self.reporter.maybe_send(force=True, final=True)
        except BrokerUnavailable as exc:
            log.warning("could not announce the stop: %s", exc)


def main(cfg: Config, resume: bool = False) -> int:
    return run_component(cfg, "learner", lambda stop: Learner(cfg, stop, resume))
