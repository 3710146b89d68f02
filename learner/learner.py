"""Learner process: consume scored trajectories, train, broadcast weights, evaluate, save the final student."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from broker import BrokerUnavailable, connect
from learner.batching import collate
from learner.checkpoint import CheckpointStore, read_state, write_state
from learner.engines import build_engine
from opd import tasks
from opd.config import Config
from opd.models.builds import ensure_assets, evaluate, load_asset
from opd.protocol import ProtocolError, Streams, Trajectory, decode, stop_record, weights_record
from opd.runtime.lifecycle import Reporter, StopFlag, log, run_component
from opd.runtime.service_time import pad_to_service_time
from opd.runtime.tracking import StepTracker
from weight_sync import ElasticBroadcaster, WeightBroadcaster, make_store, resolve_backend
from weight_sync.snapshot import SnapshotStore
from weight_sync.verify import DigestLog

KL_WINDOW = 5  # reverse_kl_first/last are means over this many steps, so one noisy batch does not decide
COUNTERS_KEPT = (
    "dropped_stale",
    "duplicates_skipped",
    "dead_lettered",
    "trajectories_trained",
    "tokens_trained",
)


class Learner:
    def __init__(self, cfg: Config, stop: StopFlag, resume: bool = False):
        self.cfg, self.stop = cfg, stop
        self.out_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed)
        self.checkpoints = CheckpointStore(self.out_dir, cfg.learner.keep_checkpoints)
        (self.out_dir / "ledger").mkdir(parents=True, exist_ok=True)
        latest = self.checkpoints.latest() if resume else None
        assets = ensure_assets(cfg, log=log.info)
        self.model, self.tokenizer = load_asset(assets.student, cfg.learner.device)
        if latest is not None:  # weights first: the engine (ZeRO) takes over the parameters as they are
            self._load_weights(latest / "model")
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.max_bytes = int(cfg.broker.max_message_mb * (1 << 20))
        # The broadcaster records names, shapes and buckets before the engine may shard the parameters (ZeRO-3).
        ws = cfg.weight_sync
        self.broadcaster = WeightBroadcaster(None, list(self.model.named_parameters()), ws.bucket_mb)
        self.engine = build_engine(self.model, cfg)
        self.broker = connect(cfg.broker)
        self.broker.stopping = stop
        self.reporter = Reporter(self.broker, cfg, "learner", 0.0)
        self.tracker = StepTracker(cfg)  # wandb / TensorBoard, when metrics.* enables them
        streams = Streams(cfg.run.run_id)
        self.scored, self.control = streams.scored, streams.control
        self.eval_problems = tasks.eval_set(cfg.task)
        self.trained_ids: set[str] = set()
        self.trained_log: list[str] = []  # in training order: the exactly-once record (trained_ids.txt)
        self.step_no, self.version = 0, 0
        self.kl_history: list[float] = []
        self.max_policy_version = -1
        self.lag_histogram = [0] * (cfg.learner.max_staleness + 1)
        self.resumed_from = None
        self._last_catch_up = 0.0
        if latest is not None:
            self._restore(latest)
        self._connect_actors()
        if resume:
            self._replay()

    # ------------------------------------------------------------------------------ checkpoints
    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = {}
        for f in sorted(path.glob("*.safetensors")):
            state.update(load_file(f, device=str(self.cfg.learner.device)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied lm_head is saved once
            raise RuntimeError(
                f"checkpoint {path} does not fit the student: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    def _restore(self, path: Path) -> None:
        self.engine.load_state(path / "engine")
        st = read_state(path)
        self.step_no, self.version = st["step"], st["version"]
        self.trained_log = st["trained_log"]
        self.trained_ids = set(self.trained_log)
        self.kl_history, self.lag_histogram = st["kl_history"], st["lag_histogram"]
        self.max_policy_version = st["max_policy_version"]
        for k, v in st["counters"].items():
            self.reporter.counters[k] = v
        self.resumed_from = path.name
        log.info("resumed from %s: step %d, weight version %d", path, self.step_no, self.version)

    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step_no,
            "version": self.version,
            "trained_log": self.trained_log,
            "kl_history": self.kl_history,
            "lag_histogram": self.lag_histogram,
            "max_policy_version": self.max_policy_version,
            "counters": {k: v for k, v in self.reporter.counters.items() if k in COUNTERS_KEPT},
        }

        def write(tmp: Path) -> None:
            with self.engine.gathered():
                self.model.save_pretrained(tmp / "model", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "model")
            self.engine.save_state(tmp / "engine")
            write_state(tmp, state)

        return self.checkpoints.save(self.step_no, write)

    def _replay(self) -> None:
        """Re-train the steps after the checkpoint from the replay log, in order, then give the actors the
        resulting weights (they start from the initial student)."""
        for step, payloads in self.checkpoints.replay_after(self.step_no):
            batch = [decode(p, vocab_size=self.vocab_size, require_scored=True) for p in payloads]
            batch = [t for t in batch if t.id not in self.trained_ids]
            if batch:
                record = self._train_step(batch, 0.0)
            self.step_no = step
            if self.step_no % self.cfg.weight_sync.every == 0:
                self.version += 1  # the same numbering as the first run, so pending samples' lag stays true
            self._log({**record, "replayed": True} if batch else {"replayed": True})
        log.info(
            "resumed at step %d, weight version %d; sending it to the actors", self.step_no, self.version
        )
        self._sync_weights(bump=False)

    def _connect_actors(self) -> None:
        """Host the rendezvous store; actors register and heartbeat there and are synced as they come and go."""
        ws = self.cfg.weight_sync
        self.backend = resolve_backend(ws.backend, self.cfg.learner.device, self.cfg.actor.device)
        self.store = make_store(ws.host, ws.port, 0, None, ws.timeout_s)
        self.broadcaster.publish_manifest(self.store)
        self.snapshots = SnapshotStore(ws.snapshot_dir or self.out_dir / "weights")
        for gone in self.snapshots.drop_newer_than(self.version):  # from steps a resume does not restore
            log.info("removed weight snapshot %s: newer than the resumed version %d", gone.name, self.version)
        self.digests = DigestLog(self.out_dir / "weight_digests", "learner") if ws.verify_digests else None
        self.weight_sync = ElasticBroadcaster(
            self.store,
            f"{self.cfg.run.run_id}/weights",
            self.backend,
            self.broadcaster,
            announce=self._announce,
            liveness_s=ws.liveness_s,
            join_timeout_s=ws.join_timeout_s,
            log=log.warning,
            version=self.version,
        )

    def _announce(self, version: int, epoch: int, members: list[str]) -> None:
        self.broker.publish(self.control, [weights_record(version, epoch=epoch, members=members)])

    # ------------------------------------------------------------------------------------- data
    def _collect(self) -> tuple[list[Trajectory], list[str], list[bytes]]:
        """Block until a full batch of valid, fresh, not-yet-trained scored trajectories (or a stop)."""
        want, batch, ids, payloads = self.cfg.learner.batch_size, [], [], []
        last_data = time.monotonic()
        while len(batch) < want and not self.stop():
            self._catch_up_new_actors()
            msgs = self.broker.consume(
                self.scored, Streams.LEARNER_GROUP, Streams.LEARNER_GROUP, want - len(batch), 1.0
            )
            if not msgs and time.monotonic() - last_data > self.cfg.learner.batch_timeout_s:
                raise RuntimeError(
                    f"no scored trajectories for {self.cfg.learner.batch_timeout_s:.0f}s (learner.batch_timeout_s)"
                )
            settled = []  # dead-lettered, duplicate or too stale: accounted for, so acknowledged now
            for m in msgs:
                last_data = time.monotonic()
                try:
                    t = self._admit(
                        decode(
                            m.data, vocab_size=self.vocab_size, require_scored=True, max_bytes=self.max_bytes
                        )
                    )
                except ProtocolError as exc:
                    self.reporter.dead_letter(self.scored, m.id, m.data, str(exc))
                    t = None
                if t is None:
                    settled.append(m.id)
                else:
                    batch.append(t)
                    ids.append(m.id)
                    payloads.append(m.data)
            if settled:  # left pending, they would count as in flight and keep paused actors waiting forever
                self.broker.ack(self.scored, Streams.LEARNER_GROUP, settled)
        return batch, ids, payloads

    def _catch_up_new_actors(self) -> None:
        """An actor that joined since the last sync (a restart, a resume) gets the current weights now: waiting for
        the next step could be forever if everything it generates is too stale to make one."""
        now = time.monotonic()
        if self.version == 0 or now - self._last_catch_up < 1.0:
            return
        self._last_catch_up = now
        if set(self.weight_sync.membership.alive()) - set(self.weight_sync.members):
            log.info("new actor(s): sending them weight version %d", self.version)
            self._sync_weights(bump=False)

    def _admit(self, t: Trajectory) -> Trajectory | None:
        """None for a sample that is accounted for but not trained: a duplicate or too stale."""
        if t.id in self.trained_ids:
            self.reporter.add(duplicates_skipped=1)
            return None
        if self.lag(t) > self.cfg.learner.max_staleness:
            self.reporter.add(dropped_stale=1)
            with open(self.out_dir / "ledger" / "learner.dropped_stale", "a") as fh:
                fh.write(f"{t.id}\n")
            return None
        if self.engine.objective.needs_rewards and t.reward is None:
            raise ProtocolError(
                f"reward missing: learner.loss {self.cfg.learner.loss} needs a verifier reward"
            )
        if self.engine.objective.logit_loss and t.teacher_topk_ids is None:
            raise ProtocolError(
                f"teacher top-k missing: learner.loss {self.cfg.learner.distill_loss} needs scorer.topk > 0"
            )
        return t

    def lag(self, t: Trajectory) -> int:
        """Versions between the learner and the oldest weights that produced any token of t."""
        oldest = (
            int(t.token_versions.min())
            if t.token_versions is not None and len(t.token_versions)
            else t.policy_version
        )
        return self.version - min(oldest, t.policy_version)

    # ------------------------------------------------------------------------------------- loop
    def _sync_weights(self, bump: bool = True) -> dict[str, float]:
        """Send the next version (or, `bump` False, the current one again) to the actors alive now."""
        if bump:
            self.version += 1
        failed_before = self.weight_sync.failed_versions
        with self.engine.gathered():
            stats = self.weight_sync.sync(self.version)
            record = self._snapshot_and_digest()
        if self.weight_sync.failed_versions > failed_before:
            return {**record, "weight_sync_members": 0, "weight_sync_failed": 1}
        if stats is None:
            return {**record, "weight_sync_members": 0}
        return {
            **record,
            "weight_sync_seconds": stats.seconds,
            "weight_sync_gbps": stats.gbps,
            "weight_sync_bytes": stats.bytes,
            "weight_sync_members": len(self.weight_sync.members),
            "weight_sync_epoch": self.weight_sync.epoch,
        }

    def _snapshot_and_digest(self) -> dict[str, float]:
        """Inside `gathered()`: the full parameters of the version just published."""
        every, named, record = self.cfg.weight_sync.snapshot_every, self.broadcaster.as_sent(), {}
        if self.digests is not None:
            self.digests.record(self.version, named, "learner")
        if every and self.version % every == 0 and self.snapshots.last_version != self.version:
            copy_s = self.snapshots.write_async(self.version, named)
            if copy_s is None:
                record["weight_snapshot_skipped"] = 1
            else:
                record["weight_snapshot_copy_seconds"] = copy_s
        if self.snapshots.last_error is not None:
            log.warning("weight snapshot failed: %s", self.snapshots.last_error)
            self.snapshots.last_error = None
        return record

    def _train_step(self, batch: list[Trajectory], wait_s: float) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self.engine.step(collate(batch, self.tokenizer.pad_token_id, self.cfg.learner.device))
        tokens = sum(len(t.response_token_ids) for t in batch)
        service_ms = self.cfg.pipeline.service_time.learner_ms_per_token
        pad_s = pad_to_service_time(t0, tokens, service_ms, self.stop.wait)
        step_s = time.perf_counter() - t0  # the update's whole duration, emulated service time included
        lags = [self.lag(t) for t in batch]
        for lag in lags:
            self.lag_histogram[max(lag, 0)] += 1
        self.max_policy_version = max(self.max_policy_version, *(t.policy_version for t in batch))
        self.trained_ids.update(t.id for t in batch)
        self.trained_log.extend(t.id for t in batch)
        self.kl_history.append(metrics["reverse_kl"])
        self.reporter.add(trajectories_trained=len(batch), tokens_trained=tokens)
        return {
            **metrics,
            "staleness_mean": sum(lags) / len(lags),
            "staleness_max": max(lags),
            "lag_histogram": [
                sum(max(g, 0) == i for g in lags) for i in range(self.cfg.learner.max_staleness + 1)
            ],
            "dropped_stale": int(self.reporter.counters.get("dropped_stale", 0)),
            "tokens": tokens,
            "step_seconds": step_s,
            "service_pad_seconds": pad_s,
            "wait_seconds": wait_s,
            "trained_tokens_per_s": tokens / max(step_s + wait_s, 1e-9),
        }

    def _log(self, record: dict) -> None:
        record = {"step": self.step_no, "weight_version": self.version, "time": time.time(), **record}
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.reporter.export_step(record)
        self.tracker.log(record)
        self.reporter.maybe_send(
            force=True, **{k: v for k, v in record.items() if isinstance(v, int | float)}
        )

    def _evaluate(self) -> float:
        return evaluate(
            self.model,
            self.tokenizer,
            self.eval_problems,
            self.cfg.sampling.max_new_tokens,
            tasks.verifier_mode(self.cfg.task),
        )

    def run(self) -> None:
        cfg = self.cfg.learner
        while self.step_no < cfg.max_steps and not self.stop():
            t0 = time.perf_counter()
            batch, ids, payloads = self._collect()
            if self.stop():
                break  # a partial batch stays pending (unacknowledged) rather than making an odd-sized step
            record = self._train_step(batch, time.perf_counter() - t0)
            self.step_no += 1
            # Logged before the acknowledgement: a crash after it is re-trained from the log on resume, a crash
            # before it leaves these pending in the broker (then skipped as duplicates if both happen).
            if cfg.replay_log:
                self.checkpoints.log_step(self.step_no, payloads)
            self.broker.ack(self.scored, Streams.LEARNER_GROUP, ids)
            if self.step_no % self.cfg.weight_sync.every == 0 and self.step_no < cfg.max_steps:
                record.update(self._sync_weights())
            if cfg.eval_every and self.step_no % cfg.eval_every == 0 and self.eval_problems:
                record["eval_accuracy"] = self._evaluate()
            if cfg.checkpoint_every and self.step_no % cfg.checkpoint_every == 0:
                record["checkpoint"] = self.save_checkpoint().name
            self._log(record)
        self.finish()

    def finish(self) -> None:
        """Save a resumable checkpoint and the final student (HF format), write a summary, tell everyone to stop."""
        self.snapshots.wait()
        self.save_checkpoint()
        (self.out_dir / "trained_ids.txt").write_text("".join(i + "\n" for i in self.trained_log))
        final = self.out_dir / "student"
        tmp = self.out_dir / ".student.tmp"
        with self.engine.gathered():
            self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run replaces the earlier final student
        tmp.rename(final)
        w = min(KL_WINDOW, max(1, len(self.kl_history) // 2))
        summary = {
            "learner_steps": self.step_no,
            "weight_version": self.version,
            "trajectories_trained": len(self.trained_log),
            "resumed_from": self.resumed_from,
            "max_policy_version_trained": self.max_policy_version,
            "reverse_kl_first": sum(self.kl_history[:w]) / w if self.kl_history else None,
            "reverse_kl_last": sum(self.kl_history[-w:]) / w if self.kl_history else None,
            "skipped_steps": self.engine.skipped_steps,
            "optimizer_steps": self.engine.optimizer_steps,
            "dropped_stale": int(self.reporter.counters.get("dropped_stale", 0)),
            "lag_histogram": self.lag_histogram,
            "loss": self.cfg.learner.loss,
            "correction": self.cfg.learner.correction.mode,
            "engine": self.cfg.learner.engine,
            "dead_lettered": int(self.reporter.counters.get("dead_lettered", 0)),
            "stopped_by": self.stop.reason or "max_steps",
        }
        (self.out_dir / "learner_summary.json").write_text(json.dumps(summary, indent=2))
        self.tracker.close()
        log.info(
            "saved the final student to %s after %d steps (weight version %d)",
            final,
            self.step_no,
            self.version,
        )
        try:  # last, so a dead broker cannot cost the checkpoint or the summary
            self.broker.publish(self.control, [stop_record(self.stop.reason or "max_steps")])
            self.reporter.maybe_send(force=True, final=True)
        except BrokerUnavailable as exc:
            log.warning("could not announce the stop: %s", exc)


def main(cfg: Config, resume: bool = False) -> int:
    return run_component(cfg, "learner", lambda stop: Learner(cfg, stop, resume))
