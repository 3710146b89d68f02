"""Learner process: consume scored trajectories, train, broadcast weights, evaluate, save the final student.

The parts, each built from what it needs, in the order their arguments force:
  state (learner/state.py)            the run directory's files and the progress a checkpoint restores
  student                             model (with checkpointed weights), broadcast layout, then the engine
  publisher (learner/publishing.py)   the weight-sync store, announcements, snapshots (needs the restored version)
  intake (learner/intake.py)          scored messages into batches (needs the trained-ids ledger)
and the loop below: take a batch, train, log the step, acknowledge, publish weights, evaluate, checkpoint.

With `learner.num_ranks` > 1 this process is one rank of the learner group (learner/ranks.py). Rank 0 is the
`Learner` below, the only one that touches the broker, the weight-sync group and the run's records; it leads the
others through learner/commands.py (`LeaderEngine`), and they run `Follower`: train their share of each global
batch and lend their shards to gathers and checkpoints, nothing else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from broker import BrokerUnavailable
from learner.batching import Batch, collate
from learner.commands import Follower, LeaderEngine, step_report
from learner.engines import build_engine, engine_class
from learner.evaluation import Evaluator
from learner.intake import Contract, Intake, token_lags
from learner.join import joined_copies
from learner.publishing import WeightPublisher, record_layout
from learner.ranks import RankGroup, rendezvous
from learner.state import Progress, RunFiles, Student, summary
from opd import tasks
from opd.config import Config
from opd.models.builds import Assets, ensure_assets, load_asset
from opd.models.vision import freeze_vision, image_checker, load_vision, pixel_reader
from opd.models.vocab import real_vocab
from opd.protocol import DEFAULT_TEACHER, Streams, Trajectory, decode, stop_record
from opd.runtime.broker import open_broker
from opd.runtime.lifecycle import (
    Reporter,
    StopFlag,
    log,
    process_ending,
    run_component,
    setup_process,
    wait_for_models,
)
from opd.runtime.service_time import pad_to_service_time
from opd.runtime.tracking import StepTracker
from weight_sync import WeightBroadcaster


def teacher_shares(batch: list[Trajectory]) -> dict[str, float]:
    """`trajectories_trained:<teacher>` increments for a trained batch: each trajectory counts for the teachers of
    its route by their weights (a joined mixture's, renormalised over the teachers present), else for the pool
    that scored it, so the counters sum to `trajectories_trained` and each over the sum is that teacher's share
    (opd top, the report, Prometheus' opd_teacher_trajectories_trained)."""
    out: dict[str, float] = {}
    for t in batch:
        route = t.teacher_weights or {t.teacher_name or DEFAULT_TEACHER: 1.0}
        total = sum(route.values()) or 1.0
        for name, w in route.items():
            key = f"trajectories_trained:{name}"
            out[key] = out.get(key, 0.0) + w / total
    return out


def alignment_figures(batch: list[Trajectory]) -> dict[str, float]:
    """A teacher of another tokenizer's figures for a step record, over the batch's trajectories it scored
    (`teacher_chunks` set): chunks per response, student tokens per chunk, and the mean share of the teacher's
    top-k mass matched to student ids. Empty when no trajectory of the batch carries them."""
    aligned = [t for t in batch if t.teacher_chunks is not None]
    if not aligned:
        return {}
    chunks = sum(t.teacher_chunks for t in aligned)
    out = {
        "alignment_chunks_per_response": chunks / len(aligned),
        "alignment_tokens_per_chunk": sum(len(t.response_token_ids) for t in aligned) / chunks,
    }
    matched = [t.teacher_topk_matched for t in aligned if t.teacher_topk_matched is not None]
    if matched:
        out["topk_matched_mass"] = sum(matched) / len(matched)
    return out


def staleness_figures(
    batch: list[Trajectory], version: int, max_staleness: int
) -> dict[str, float | list[int]]:
    """A step record's lag figures, counted in response tokens: a streaming actor's trajectory may mix weight
    versions, so one trajectory's tokens can sit at several lags (learner/intake.py `token_lags`).

    staleness_mean/_max: the mean and largest token lag; lag_histogram: tokens per lag 0, 1, ... (a negative lag,
    weights newer than the learner's after a resume, counts as 0); versions_per_trajectory: the mean number of
    distinct versions among a trajectory's tokens; mixed_version_trajectories: trajectories with more than one."""
    lags = [token_lags(t, version) for t in batch]  # (T_i,) each
    flat = np.concatenate(lags)
    distinct = [len(np.unique(x)) for x in lags]
    return {
        "staleness_mean": float(flat.mean()),
        "staleness_max": int(flat.max()),
        "lag_histogram": np.bincount(np.maximum(flat, 0), minlength=max_staleness + 1).tolist(),
        "versions_per_trajectory": sum(distinct) / len(distinct),
        "mixed_version_trajectories": sum(n > 1 for n in distinct),
    }


def student_assets(cfg: Config) -> Assets:
    """The run's models as its first teacher pool sees them (`Config.for_teacher`). The learner uses the student
    only, but `ensure_assets` finds or builds a teacher too: with `teachers:` the teacher section is unused, and
    its default recipe (shipped nowhere) would be built for nothing, for minutes, before the first step. Without
    `teachers:` the one pool is the teacher section itself, so nothing changes."""
    first = next(iter(cfg.teacher_pools()))
    return ensure_assets(cfg.for_teacher(first), log=log.info)


def load_student(
    cfg: Config, files: RunFiles, checkpoint: Path | None, group: RankGroup | None = None
) -> tuple[Student, WeightBroadcaster]:
    """The student and its broadcast layout, in the one order that works: the layout first, in the student's
    dtype (what the actors hold); then the checkpointed weights, into fp32 parameters when the student is bf16 or
    fp16 (the checkpoint holds the fp32 master weights: loaded into bf16 they would be rounded once per resume);
    then the engine (which upcasts to fp32 masters anyway, and may shard them: ZeRO-3)."""
    assets = student_assets(cfg)
    model, tokenizer = load_asset(assets.student, cfg.learner.device)
    frozen = getattr(cfg.student, "freeze_vision", False)
    layout = record_layout(model, cfg.weight_sync, frozen)
    if frozen:
        count = freeze_vision(model)
        log.info(
            "student.freeze_vision: %d image-side parameters frozen; the weight manifest lists the language "
            "model's %d tensors only", count, len(layout.manifest),
        )  # fmt: skip
    if checkpoint is not None:
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
            model.float()  # in place: the layout keeps the same parameters and its recorded dtypes
        files.load_weights(model, checkpoint)
    vocab_size = real_vocab(model)  # the tokenizer's ids, not padded embedding rows (opd.models.vocab)
    vision = load_vision(assets.student.path)
    return Student(model, tokenizer, build_engine(model, cfg, group), vocab_size, vision), layout


def agreed_checkpoint(cfg: Config, files: RunFiles, group: RankGroup, resume: bool) -> Path | None:
    """The checkpoint every rank resumes from: rank 0's choice, once it has the models (a rank started by hand
    must not build them beside it) and has made its engine state loadable by this many ranks (a checkpoint of
    another number of ranks: `RunFiles.reshard`), sent to the others."""
    if group.size > 1 and not group.leader:
        name = group.broadcast_bytes(None).decode()
        return files.checkpoints.root / name if name else None
    if group.size > 1:
        student_assets(cfg)
    checkpoint = files.latest() if resume else None
    if checkpoint is not None:
        files.reshard(checkpoint, engine_class(cfg))
    if group.size > 1:
        group.broadcast_bytes((checkpoint.name if checkpoint else "").encode())
    return checkpoint


class Learner:
    def __init__(self, cfg: Config, stop: StopFlag, resume: bool = False, group: RankGroup | None = None):
        self.cfg, self.stop = cfg, stop
        self.group = group or RankGroup()
        torch.manual_seed(cfg.run.seed)
        self.files = RunFiles(Path(cfg.run.output_dir), cfg.learner)
        checkpoint = agreed_checkpoint(cfg, self.files, self.group, resume)
        self.student, layout = load_student(cfg, self.files, checkpoint, self.group)
        self.leader = None  # rank 0's lead of the other ranks (several ranks only)
        if self.group.size > 1:
            self.leader = LeaderEngine(self.student.engine, self.group, cfg.learner.collective_timeout_s)
            self.student.engine = self.leader  # gathers and checkpoints now bring the other ranks along
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
            Contract.of(
                cfg,
                self.student.vocab_size,
                objective.needs_rewards,
                objective.logit_loss,
                image_check=image_checker(self.student.vision, cfg.images),
            ),
            cfg.learner,
            trained=self.progress.trained,
            stale_ledger=self.files.ledger / "learner.dropped_stale",
            stop=stop,
            routing=cfg.routing,
            teachers=list(cfg.teacher_pools()),
        )
        s = self.student
        self.evaluator = Evaluator(
            cfg, s.model, s.tokenizer, s.engine.gathered, tasks.eval_set(cfg.task, cfg.images)
        )
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
            decoded = [
                (decode(x, vocab_size=self.student.vocab_size, require_scored=True), x) for x in payloads
            ]
            kept = [(t, x) for t, x in decoded if t.id not in p.trained]
            batch, payloads = [t for t, _ in kept], [x for _, x in kept]
            record = (
                {**self._train_step(batch, payloads, 0.0), "replayed": True} if batch else {"replayed": True}
            )
            # the books, as Intake.ack counted them the first time (a partial join's partial_joins is not
            # recounted: the joined message does not say how many teachers its route had)
            if copies := sum(joined_copies(t) for t in batch):
                self.reporter.add(joined_copies=copies)
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
            taken = self.intake.next_batch(p.version, while_waiting=lambda: self._while_waiting(p.version))
            if self.stop():
                break  # a partial batch stays pending (unacknowledged) rather than making an odd-sized step
            collated = self.intake.collate(taken, self._collate)
            if collated is None:
                continue  # every message of the batch was dead-lettered: no step
            # returns once every rank's optimiser step succeeded; only then are the entries acknowledged
            record = self._train_step(taken.trajectories, taken.payloads, time.perf_counter() - t0, collated)
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
            # Logged before the checkpoint: a crash while it is written (or after) then resumes from the previous
            # checkpoint and replays this step, or from this one, whose step is already in metrics.jsonl.
            self._log(record)
            if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        self.finish()

    def _while_waiting(self, version: int) -> None:
        self.publisher.catch_up(version)
        if self.leader is not None:
            self.leader.keepalive()

    def _collate(self, batch: list[Trajectory]) -> Batch:
        pixels = pixel_reader(self.student.vision, self.cfg.images.max_pixels)
        return collate(batch, self.student.tokenizer.pad_token_id, self.cfg.learner.device, pixels)

    def _train_step(
        self, batch: list[Trajectory], payloads: list[bytes], wait_s: float, collated: Batch | None = None
    ) -> dict[str, float]:
        """One update on `batch` (`payloads`: its raw messages; `collated`: its tensors, when already made), by
        every rank; the step record's training fields."""
        t0 = time.perf_counter()
        lc = self.cfg.learner
        collated = collated if collated is not None else self._collate(batch)
        if self.leader is None:
            metrics = self.student.engine.step(collated)
        else:
            metrics = self.leader.train(payloads, collated)
            metrics.update(step_report(self.group, True, time.perf_counter() - t0, self.leader))
        tokens = sum(len(t.response_token_ids) for t in batch)
        service_ms = self.cfg.pipeline.service_time.learner_ms_per_token
        pad_s = pad_to_service_time(t0, tokens, service_ms, self.stop.wait)
        step_s = time.perf_counter() - t0  # the update's whole duration, emulated service time included
        staleness = staleness_figures(batch, self.progress.version, lc.max_staleness)
        self.progress.record(
            [t.id for t in batch],
            staleness["lag_histogram"],
            [t.policy_version for t in batch],
            metrics["reverse_kl"],
        )
        self.reporter.add(trajectories_trained=len(batch), tokens_trained=tokens, **teacher_shares(batch))
        return {
            **metrics,
            **staleness,
            "dropped_stale": int(self.reporter.counters.get("dropped_stale", 0)),
            "trajectories": len(batch),
            "tokens": tokens,
            "step_seconds": step_s,
            "service_pad_seconds": pad_s,
            "wait_seconds": wait_s,
            "trained_tokens_per_s": tokens / max(step_s + wait_s, 1e-9),
            **alignment_figures(batch),
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
        if self.leader is not None:
            self.leader.stop()  # the other ranks have done their part of the checkpoint and the final student
        try:  # last, so a dead broker cannot cost the checkpoint or the summary
            self.broker.publish(self.publisher.control, [stop_record(stopped_by)])
            self.reporter.maybe_send(force=True, final=True)
        except BrokerUnavailable as exc:
            log.warning("could not announce the stop: %s", exc)


def follow(cfg: Config, group: RankGroup, resume: bool) -> None:
    """A rank other than 0: the same student and engine (resumed from rank 0's checkpoint), then its commands."""
    torch.manual_seed(cfg.run.seed)
    files = RunFiles(Path(cfg.run.output_dir), cfg.learner)
    checkpoint = agreed_checkpoint(cfg, files, group, resume)
    student, _ = load_student(cfg, files, checkpoint, group)
    if checkpoint is not None:
        files.restore(checkpoint, student.engine, cfg.learner.max_staleness)
    pad, device = student.tokenizer.pad_token_id, cfg.learner.device
    pixels = pixel_reader(student.vision, cfg.images.max_pixels)
    Follower(group, student.engine, lambda b: collate(b, pad, device, pixels), student.vocab_size).run()


def main(cfg: Config, resume: bool = False, rank: int | None = None) -> int:
    """One learner process: rank `rank` (`opd learner --rank`; default RANK from the environment, else 0) of
    learner.num_ranks. Rank 0 is the component the run sees ("learner" on the metrics stream)."""
    rv = rendezvous(cfg.learner, rank)
    if rv.world == 1:
        return run_component(cfg, "learner", lambda stop: Learner(cfg, stop, resume))
    if rv.rank == 0:

        def build(stop: StopFlag) -> Learner:
            return Learner(
                cfg, stop, resume, RankGroup.join(rv, cfg.learner.device, cfg.learner.collective_timeout_s)
            )

        return run_component(cfg, "learner", build)
    stop = setup_process(cfg, f"learner-{rv.rank}")
    # a SIGTERM does not stop a follower by itself: rank 0 (stopped the same way) ends the group with `stop`,
    # and a rank 0 that is gone ends it by the collective timeout
    if not wait_for_models(stop):
        return 0
    group = RankGroup.join(rv, cfg.learner.device, cfg.learner.collective_timeout_s)
    try:
        follow(cfg, group, resume)
    finally:
        group.close()
    process_ending()
    return 0
