"""Student actor: sample trajectories with behaviour logprobs, publish them, take new weights.

Batch generation (the default) takes new weights between batches; stream generation (actors/streaming.py) between
decode steps."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch

from actors.engines import build_engine
from actors.routing import Outbox, Router
from actors.streaming import StreamLoop
from opd import tasks
from opd.config import Config
from opd.images import ImageBlob
from opd.models.builds import ensure_assets
from opd.models.prompts import prompt_ids as render_prompt
from opd.models.sampler import Sample
from opd.models.vision import PromptImages, load_vision, synced_parameters
from opd.protocol import MAX_POLICY_VERSION, ProtocolError, Streams, Trajectory, encode, unpack_control
from opd.runtime import run_secret
from opd.runtime.broker import open_broker
from opd.runtime.lifecycle import Reporter, StopFlag, log, run_component
from opd.runtime.service_time import pad_to_service_time
from opd.tasks import Problem
from weight_sync import ElasticReceiver, WeightReceiver, resolve_backend
from weight_sync.snapshot import SnapshotStore
from weight_sync.verify import DigestLog

POLL_S = 0.05  # while copies wait for room, or every route names a down teacher
MAX_DRAWS = 8  # prompts drawn per batch, at most, x actor.prompts_per_batch, while a teacher is down


def weight_follower(cfg: Config, name: str, model: torch.nn.Module) -> ElasticReceiver:
    """Register with the learner's store and heartbeat; weights arrive in the sync epochs that name us."""
    ws = cfg.weight_sync
    backend = resolve_backend(ws.backend, cfg.learner.device, cfg.actor.device)
    run_dir = Path(cfg.run.output_dir or ".")
    named = synced_parameters(model, getattr(cfg.student, "freeze_vision", False))  # the learner's manifest
    digests = DigestLog(run_dir / "weight_digests", name) if ws.verify_digests else None
    return ElasticReceiver(
        ws.host,
        ws.port,
        name,
        f"{cfg.run.run_id}/weights",
        backend,
        WeightReceiver(None, named, ws.bucket_mb),
        timeout_s=ws.timeout_s,
        join_timeout_s=ws.join_timeout_s,
        heartbeat_s=ws.liveness_s / 5,
        secret=run_secret.load(ws, run_dir, wait_s=ws.timeout_s),  # the learner may still be writing it
        snapshots=SnapshotStore(ws.snapshot_dir or run_dir / "weights"),
        on_weights=(lambda v, source: digests.record(v, named, source)) if digests else None,
        log=log.warning,
    )


def _weights_fields(record: dict) -> tuple[int, int, list[str]]:
    """(version, epoch, members) of a `weights` record, or ProtocolError naming the field that is off."""
    version, epoch, members = record.get("version"), record.get("epoch", 0), record.get("members", [])
    for name, value in (("version", version), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_POLICY_VERSION:
            raise ProtocolError(f"weights record: {name} {value!r} is not an integer in [0, 2**62)")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ProtocolError("weights record: members must be a list of component names")
    return version, epoch, members


def _weights_auth(record: dict) -> str | None:
    """The learner's signature of a `weights` record; None when absent or not a string (then the follower
    ignores the record as unsigned rather than failing on it)."""
    auth = record.get("auth")
    return auth if isinstance(auth, str) else None


class Actor:
    def __init__(self, cfg: Config, index: int, stop: StopFlag):
        self.cfg, self.index, self.stop = cfg, index, stop
        self.name = f"actor-{index}"
        # the actor needs the student; with a teachers section the teacher section is unused, so ask as one
        # pool sees the run (its teacher is built for its scorers anyway), never building an unused teacher
        assets = ensure_assets(cfg.for_teacher(next(iter(cfg.teacher_pools()))), log=log.info)
        # actor.engine picks the sampler; engine.model is the HF module the weight broadcast writes into
        self.engine = build_engine(cfg, assets)
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        # a vision-language student's processor: prompts' images become its pixel values (None: text only)
        self.vision = load_vision(assets.student.path)
        self.broker = open_broker(cfg.broker, stopping=stop)
        self.reporter = Reporter(self.broker, cfg, self.name, cfg.actor.metrics_every_s)
        streams = Streams(cfg.run.run_id)
        # every pool's scored stream (one per teacher): what waits for the learner
        self.scored = [streams.scored_for(name) for name in cfg.teacher_pools()]
        self.control = streams.control
        # teachers: one rollouts stream per teacher, each trajectory copied to those of its route
        self.router = Router(cfg)
        self.copies_published, self.trajectories_published = 0, 0  # their ratio: the mean fan-out
        # copies not yet appended; a teacher whose stream takes none for liveness_s is down (actors/routing.py)
        self.outbox = Outbox(self.broker, self.router, cfg.supervision.liveness_s)
        self.down: set[str] = set()  # teachers down at the last look (for the log lines)
        self.skipped_while_down = 0
        self.broker.skip_to_end(self.control, self.name)  # before joining: the learner speaks once all joined
        self.follower = weight_follower(cfg, self.name, self.model)
        self.max_draws = MAX_DRAWS  # prompts drawn per prompt wanted, at most, while a teacher is down
        self.problems = tasks.training_stream(cfg.task, seed=cfg.run.seed * 1000 + index, images=cfg.images)
        self.generator = torch.Generator(device=cfg.actor.device).manual_seed(cfg.run.seed * 1000 + index)
        self.batches = itertools.count()
        self.ledger = Path(cfg.run.output_dir or ".") / "ledger" / f"{self.name}.generated"
        self.ledger.parent.mkdir(parents=True, exist_ok=True)

    def service_control(self) -> None:
        """Apply pending weight versions (each is a collective the learner waits on) and honour stop. A record
        this actor cannot read (a field of the wrong type or range) is dead-lettered and skipped, never fatal."""
        for msg in self.broker.consume(self.control, self.name, self.name, 64, 0.0):
            try:
                record = unpack_control(msg.data)
                weights = _weights_fields(record) if record["kind"] == "weights" else None
            # unpack_control raises only ProtocolError; anything else raised here is this record's fault too
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
                self.reporter.dead_letter(self.control, msg.id, msg.data, reason)
                self.broker.ack(self.control, self.name, [msg.id])
                continue
            if weights is not None:
                before = self.follower.version
                stats = self.follower.apply(*weights, auth=_weights_auth(record))
                if stats is not None:
                    self.reporter.add(weight_syncs=1, weight_sync_seconds=stats.seconds)
                    if self.follower.version != before + 1:
                        log.info("took weights version %d (had %d)", self.follower.version, before)
            elif record["kind"] == "stop":
                self.stop.set("stop message from the learner")
            self.broker.ack(self.control, self.name, [msg.id])

    def draw(self, down: set[str]) -> list[Problem]:
        """This batch's prompts: the next actor.prompts_per_batch, or, while a teacher is down, the next ones
        whose route avoids it (others skipped and counted); none when every route names a down teacher."""
        cfg = self.cfg
        if not self.router.reachable(down):
            return []
        n = cfg.actor.prompts_per_batch
        problems, skipped = self.router.pick(self.problems, n, down, MAX_DRAWS * n)
        if skipped:
            self.skipped_while_down += skipped
            self.reporter.add(prompts_skipped=skipped)
        return problems

    def prompt(self, problem: Problem) -> tuple[list[int], PromptImages | None]:
        """The problem's prompt ids as the student reads them, and its images: each image placeholder expanded to
        one image id per image feature (what every later component takes as is), the pixels computed once."""
        ids = render_prompt(self.tokenizer, problem)
        if not problem.images:
            return ids, None
        if self.vision is None:
            raise ValueError(
                f"prompt {problem.prompt_id} has {len(problem.images)} image(s) but the student is a text-only "
                "model: use a vision-language student (student.kind: tiny_vlm, or a pretrained VLM)"
            )
        blobs = [ImageBlob.of(b) for b in problem.images]
        ids, pixels = self.vision.expand(ids, blobs, self.cfg.images.max_pixels)
        return ids, PromptImages(blobs, pixels)

    def generate_batch(self, problems: list[Problem]) -> list[Trajectory]:
        s = self.cfg.sampling
        prompts = [self.prompt(p) for p in problems]
        prompt_ids = [ids for ids, _ in prompts]
        batch_no = next(self.batches)
        self.engine.sync_weights(self.follower.version)  # the version stamped below is what samples
        samples = self.engine.sample(
            [p for p in prompt_ids for _ in range(s.n)],
            self.generator,
            **({"images": [i for _, i in prompts for _ in range(s.n)]} if self.vision else {}),
        )
        return [
            self.trajectory(
                problems[j // s.n],
                f"{self.name}-{batch_no}-{j // s.n}",
                j % s.n,
                *prompts[j // s.n],
                smp,
                self.follower.version,
            )
            for j, smp in enumerate(samples)
        ]

    def trajectory(
        self,
        problem: Problem,
        group_id: str,
        index: int,
        prompt_ids: list[int],
        images: PromptImages | None,
        sample: Sample,
        policy_version: int,
        ended: float | None = None,
    ) -> Trajectory:
        """One sample as the trajectory it enters the run as: rewarded by the task's verifier and stamped with its
        route. A streamed sample carries its token versions (then `policy_version` is its first token's) and the
        time it ended; a batch's, one version for every token."""
        cfg = self.cfg
        text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        mode = tasks.verifier_mode(cfg.task)
        versions = (
            None if sample.token_versions is None else np.asarray(sample.token_versions, dtype=np.int32)
        )
        traj = Trajectory(
            run_id=cfg.run.run_id,
            prompt_id=problem.prompt_id,
            group_id=group_id,
            sample_index=index,
            prompt_token_ids=np.asarray(prompt_ids, dtype=np.int32),
            response_token_ids=np.asarray(sample.response_ids, dtype=np.int32),
            behaviour_logprobs=np.asarray(sample.behaviour_logprobs, dtype=np.float32),
            policy_version=policy_version,
            token_versions=versions,
            finish_reason=sample.finish_reason,
            behaviour_temperature=cfg.sampling.temperature,
            task=self.router.metadata(problem),
            reward=float(tasks.verify(problem.answer, text, mode)) if problem.answer else None,
            images=images.blobs if images else None,
            **({"timestamps": {"generated": ended}} if ended is not None else {}),
        )
        self.router.stamp(traj)
        return traj

    def publish(self, trajs: list[Trajectory]) -> None:
        """Queue one copy of each trajectory for the rollouts stream of every teacher in its route (the one
        `rollouts` stream without teachers) and append what fits now; the rest waits in the outbox."""
        payloads = [encode(t) for t in trajs]
        self.outbox.add(trajs, payloads)
        # bytes per trajectory and images per second: what prompts with images cost the broker (one copy each)
        self.reporter.add(
            rollout_bytes=sum(len(b) for b in payloads),
            images_generated=sum(len(t.images or ()) for t in trajs),
        )
        self.flush()

    def flush(self) -> None:
        """Offer the outbox's copies; ledger and count the trajectories that entered the run by it (their first
        copy appended): the ledger and `trajectories_generated` always agree."""
        entered, copies = self.outbox.flush()
        self.copies_published += copies
        if copies and self.router.enabled:
            self.reporter.add(rollout_copies_published=copies)
        if entered:
            self._record(entered)
            self.trajectories_published += len(entered)
            self.reporter.add(
                trajectories_generated=len(entered),
                tokens_generated=sum(len(t.response_token_ids) for t in entered),
            )

    def wait_for_pools(self) -> set[str]:
        """Offer the waiting copies and wait (serving control) while some wait for a teacher not yet down: the
        actor's backpressure, so a slower pool keeps its share of the prompts. Returns the teachers down now,
        whose prompts the next batch skips (actors/routing.py)."""
        self.flush()
        while not self.stop() and self.outbox.blocking():
            self.service_control()
            time.sleep(POLL_S)
            self.flush()
        return self.track_down()

    def track_down(self) -> set[str]:
        """The teachers down now (their streams took no copy for supervision.liveness_s), saying which went
        down or came back since the last look."""
        down = self.outbox.down()
        for name in sorted(down - self.down):
            log.warning(
                "teacher %s: its rollouts stream has taken no copy for %.0fs (supervision.liveness_s): its pool "
                "is treated as down; generating only prompts routed elsewhere until it takes copies again",
                name,
                self.outbox.stall_s,
            )
        for name in sorted(self.down - down):
            log.info(
                "teacher %s takes copies again (%d prompts skipped meanwhile)", name, self.skipped_while_down
            )
        if not down:
            self.skipped_while_down = 0
        self.down = down
        return down

    def _record(self, trajs: list[Trajectory]) -> None:
        """`id<TAB>unix time<TAB>group id` of what this actor published: the `generated` side of the run's
        accounting (the group id shows a GRPO group entered the run whole)."""
        now = time.time()
        with open(self.ledger, "a") as fh:
            fh.write("".join(f"{t.id}\t{now:.3f}\t{t.group_id}\n" for t in trajs))

    def versions_ahead(self) -> float:
        """How many weight versions old a batch generated now would be when the learner reaches it: the
        trajectories still in flight (rollouts + scored, unacknowledged) over what one version consumes. With
        several teachers a mixture trajectory waits as one copy per teacher: the queued copies are divided by
        this actor's mean fan-out (copies per trajectory published), 1 with one teacher. A down teacher's stream
        is left out: the next batch is not routed there. Copies the learner holds in its join spool are
        acknowledged, so not counted: a mixture waiting there counts by the copies it still waits for (an
        underestimate by at most the spooled share; the learner's lag check is the bound that holds)."""
        lc = self.cfg.learner
        down = self.outbox.down()  # a down pool's full stream holds back nothing a new batch is routed to
        rollouts = [s for name, s in self.router.streams.items() if name not in down]
        copies = sum(self.broker.depth(s) for s in [*rollouts, *self.scored])
        fan_out = self.copies_published / self.trajectories_published if self.trajectories_published else 1.0
        return copies / fan_out / (lc.batch_size * self.cfg.weight_sync.every)

    def wait_while_ahead(self) -> None:
        """Pause generation (still applying weights) while new samples would exceed learner.max_staleness."""
        t0 = time.perf_counter()
        while not self.stop() and self.versions_ahead() >= self.cfg.learner.max_staleness + 1:
            self.service_control()
            time.sleep(0.05)
        self.reporter.add(staleness_pause_seconds=time.perf_counter() - t0)

    def run(self) -> None:
        log.info("ready: %s backend, weight version %d", self.follower.backend, self.follower.version)
        try:
            self._loop()
        finally:
            self.follower.close()
            self.engine.close()

    def wait_for_current_weights(self) -> None:
        """Sample nothing with weights older than the learner's: a restarted actor's first batches at the
        initial student would all be dropped as stale (the learner sends it the current version within ~1 s).
        Weights bootstrapped from a snapshot may be used before that broadcast while their samples would still
        be within learner.max_staleness when trained."""
        while not self.stop() and self.follower.version < self.follower.learner_version():
            if self._snapshot_weights_fresh():
                return
            self.service_control()
            time.sleep(0.05)

    def wait_for_trained_weights(self, sampled_with: int) -> None:
        """pipeline.mode sync: generate nothing until the learner has trained on the batch just published and
        sent the resulting weights, so exactly one batch is in flight and every sample is trained at lag 0.
        Control is still served meanwhile: the sync itself arrives there, and so does stop. A version the learner
        gave up sending (every attempt failed) never comes: then the actor goes on with the weights it has, so its
        next batch is one version stale rather than the run waiting out learner.batch_timeout_s."""
        t0 = time.perf_counter()
        next_check = t0 + 0.5
        while not self.stop() and self.follower.version <= sampled_with:
            self.service_control()
            if time.perf_counter() > next_check:
                if self.follower.given_up_version() > sampled_with:
                    log.warning(
                        "weight version %d was given up; sampling on with %d", sampled_with + 1, sampled_with
                    )
                    break
                next_check = time.perf_counter() + 0.5
            time.sleep(0.005)
        self.reporter.add(sync_wait_seconds=time.perf_counter() - t0)

    def _snapshot_weights_fresh(self) -> bool:
        if self.follower.source != "snapshot":
            return False
        lag = self.follower.learner_version() - self.follower.version
        return lag + self.versions_ahead() < self.cfg.learner.max_staleness

    def _loop(self) -> None:
        if self.cfg.actor.generation == "stream":
            StreamLoop(self).run()
        else:
            self._batch_loop()
        self.flush()
        if self.outbox.held():
            log.info(
                "stopping with %d copies not appended (teachers %s): a trajectory with no copy out never entered "
                "the run; a mixture with one out is the learner's join timeout",
                self.outbox.held(),
                ", ".join(sorted(self.outbox.waiting)),
            )
        self.reporter.maybe_send(force=True, weight_version=self.follower.version, final=True)
        log.info("stopping (%s) at weight version %d", self.stop.reason or "done", self.follower.version)

    def _batch_loop(self) -> None:
        while not self.stop():
            self.service_control()
            down = self.wait_for_pools()  # the last batch's copies out first, as a blocking publish had them
            self.wait_for_current_weights()
            self.wait_while_ahead()
            problems = self.draw(down)
            if self.stop():
                break
            if not problems:  # every route names a down teacher: wait for one to take copies again
                self.service_control()
                self.stop.wait(POLL_S)
                continue
            sampled_with = self.follower.version
            t0 = time.perf_counter()
            trajs = self.generate_batch(problems)
            tokens = sum(len(t.response_token_ids) for t in trajs)
            pad_s = pad_to_service_time(
                t0, tokens, self.cfg.pipeline.service_time.actor_ms_per_token, self.stop.wait
            )
            self.reporter.add(generate_seconds=time.perf_counter() - t0, service_pad_seconds=pad_s)
            self.publish(trajs)
            self.reporter.maybe_send(weight_version=self.follower.version)
            if self.cfg.pipeline.mode == "sync":
                self.wait_for_pools()
                self.wait_for_trained_weights(sampled_with)


def main(cfg: Config, index: int) -> int:
    return run_component(cfg, f"actor-{index}", lambda stop: Actor(cfg, index, stop), watch_learner=True)
