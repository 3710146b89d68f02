"""Random faults, seeded, on one `opd run` over a durable Redis (AOF, appendfsync everysec), then the books by id.

Two streaming actors (`actor.generation: stream`: kills land mid-sequence and mid-group) and two scorers train while a seeded random schedule (random order, random gaps) SIGKILLs or SIGTERMs
a worker and starts it again as a user would (`opd actor|scorer --index i`, unless the launcher replaced it
itself), SIGSTOPs a worker for a few seconds, SIGKILLs the learner and resumes the run (`opd run ... --resume`),
SIGKILLs Redis and restarts it on the same port and data directory, and SIGSTOPs Redis for a few seconds. After
each fault the learner must log two new steps within a bound, with the launcher still running; after the last,
the run is stopped with ^C (SIGINT) and must end cleanly (exit 130). The books must balance by trajectory id
(tests/books.py `violations`), and no weight announcement may be lost at a Redis kill (`lost_announcements`).

OPD_CHAOS_SEED picks the schedule (default below); the seed and the schedule are in the failure message and in
the accounting line printed at the end of the session, so a failure is replayed with the same seed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.books import accounting, component_pid, run_id_of, violations
from tests.conftest import REPO, TINY, RedisServer

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SEED = int(os.environ.get("OPD_CHAOS_SEED", "14"))
WORKER_FAULTS = ("kill_worker", "term_worker", "pause_worker")
REDIS_FAULTS = ("kill_redis", "pause_redis")
STEP_BOUND_S = (
    120.0  # after any fault, the learner logs PROGRESS_STEPS steps within this long (a resume: load + replay)
)
PROGRESS_STEPS = 2
RESPAWN_WAIT_S = 4.0  # how long a killed worker's slot is watched for a replacement by the launcher
AOF_LOSS_S = 2.5  # appendfsync everysec: what a Redis crash may lose, before the kill
LEDGER_DELAY_S = 0.15  # an actor records what it published right after the publish returns
STOP_BOUND_S = 120.0  # ^C to exit: the learner saves and announces stop, the launcher stops the rest


@dataclass(frozen=True)
class Fault:
    kind: str
    gap_s: float  # wait before it, after the previous fault's recovery step
    role: str | None = None  # actor | scorer, for worker faults
    index: int | None = None
    hold_s: float = 0.0  # how long a process stays stopped, or Redis stays down

    def __str__(self) -> str:
        who = f" {self.role}-{self.index}" if self.role else ""
        hold = f" for {self.hold_s:.1f}s" if self.hold_s else ""
        return f"+{self.gap_s:.1f}s {self.kind}{who}{hold}"


def schedule(seed: int) -> list[Fault]:
    """Every kind of fault once, plus two more worker or Redis faults, in a random order with random gaps; the
    learner is killed once (a resume costs a model load and a replay)."""
    rng = random.Random(seed)
    kinds = [*WORKER_FAULTS, *REDIS_FAULTS, "kill_learner", *rng.choices(WORKER_FAULTS + REDIS_FAULTS, k=2)]
    rng.shuffle(kinds)
    faults = []
    for kind in kinds:
        gap = round(rng.uniform(0.0, 6.0), 1)
        if kind in WORKER_FAULTS:
            role, index = rng.choice(("actor", "scorer")), rng.randrange(2)
            hold = round(rng.uniform(2.0, 8.0), 1) if kind == "pause_worker" else 0.0
            faults.append(Fault(kind, gap, role, index, hold))
        else:  # Redis down or paused for less than broker.request_timeout_s, so every client waits it out
            hold = round(rng.uniform(0.5, 3.0) if kind == "kill_redis" else rng.uniform(2.0, 8.0), 1)
            faults.append(Fault(kind, gap, hold_s=hold if kind in REDIS_FAULTS else 0.0))
    return faults


@dataclass
class Run:
    """One `opd run` (and its --resume incarnations), the workers started by hand, and what happened when."""

    server: RedisServer
    out_dir: Path
    logs: Path
    overrides: list[str]
    launcher: subprocess.Popen | None = None
    launches: int = 0
    by_hand: dict[tuple[str, int], subprocess.Popen] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    redis_kills: list[float] = field(default_factory=list)  # wall-clock times, to compare with the ledgers
    started: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        wall = time.strftime("%H:%M:%S", time.gmtime())
        self.events.append(f"{time.monotonic() - self.started:6.1f}s ({wall}) {what}")

    # ------------------------------------------------------------------------------------ processes
    def launch(self, resume: bool = False) -> None:
        self.launches += 1
        argv = ["run", TINY, *self.overrides, *(["--resume"] if resume else [])]
        self.launcher = self._spawn(argv, self.logs / f"launcher-{self.launches}.log")
        self.note(f"opd run{' --resume' if resume else ''} (pid {self.launcher.pid})")

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as fh:  # a file, not a pipe: nobody reads a long-running worker's output
            return subprocess.Popen(
                [sys.executable, "-m", "opd", *argv], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT
            )

    def launcher_log(self, tail: int = 40) -> str:
        text = (self.logs / f"launcher-{self.launches}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-tail:])

    def worker_pid(self, role: str, index: int) -> int | None:
        """The live process of worker `role-index`: the one started by hand, else the launcher's."""
        mine = self.by_hand.get((role, index))
        if mine is not None and mine.poll() is None:
            return mine.pid
        try:
            return component_pid(self.launcher.pid, role, index)
        except AssertionError:
            return None

    def start_by_hand(self, role: str, index: int) -> None:
        argv = [role, "--config", str(self.out_dir / "config.yaml"), "--index", str(index)]
        log = self.logs / f"{role}-{index}-by-hand-{len(self.events)}.log"
        self.by_hand[(role, index)] = self._spawn(argv, log)
        self.note(f"started {role}-{index} by hand (pid {self.by_hand[(role, index)].pid})")

    def stop_by_hand(self) -> None:
        """SIGTERM what the test started (they stop by themselves on the learner's stop; this is for an abort)."""
        for proc in self.by_hand.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.by_hand.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------------------------------ progress
    def steps_since(self, since: float) -> int:
        """Learner steps logged (in metrics.jsonl) after wall-clock time `since`, replayed ones left out."""
        path = self.out_dir / "metrics.jsonl"
        n = 0
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rec = json.loads(line)
            except ValueError:  # the line the learner is writing now
                continue
            n += rec.get("time", 0) > since and not rec.get("replayed")
        return n

    def wait_steps(self, since: float, what: str, steps: int = PROGRESS_STEPS) -> None:
        """Until the learner logs `steps` new steps after `since`; AssertionError after STEP_BOUND_S or when the
        launcher exits. Two steps, not one: a launcher that is ending the run stops the learner at once, but the
        step it is in may still be logged while the launcher stops the rest."""
        deadline = time.monotonic() + STEP_BOUND_S
        while True:
            if self.launcher.poll() is not None:
                raise AssertionError(f"the launcher exited with {self.launcher.returncode} {what}")
            if self.steps_since(since) >= steps:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {steps} learner steps within {STEP_BOUND_S:.0f}s {what}")
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------- the faults
def _worker_fault(run: Run, f: Fault) -> None:
    pid = run.worker_pid(f.role, f.index)
    if pid is None:
        run.note(f"{f.role}-{f.index} not running: skipped {f.kind}")
        return
    try:
        if f.kind == "pause_worker":
            os.kill(pid, signal.SIGSTOP)
            time.sleep(f.hold_s)
            os.kill(pid, signal.SIGCONT)
            return
        os.kill(pid, signal.SIGKILL if f.kind == "kill_worker" else signal.SIGTERM)
    except ProcessLookupError:  # it ended between the lookup and the signal (the launcher stopping it)
        run.note(f"{f.role}-{f.index} (pid {pid}) ended before {f.kind}")
        return
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:  # a SIGTERMed worker finishes the batch in hand
        time.sleep(0.1)
    deadline = time.monotonic() + RESPAWN_WAIT_S
    while time.monotonic() < deadline:
        replacement = run.worker_pid(f.role, f.index)
        if replacement not in (None, pid):
            run.note(f"the launcher replaced {f.role}-{f.index} (pid {replacement})")
            return
        time.sleep(0.2)
    run.start_by_hand(f.role, f.index)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_learner(run: Run) -> None:
    """SIGKILL the learner: the launcher ends the run (exit 1, naming it); stop what was started by hand (the
    resumed run starts every worker again) and resume."""
    os.kill(component_pid(run.launcher.pid, "learner"), signal.SIGKILL)
    try:
        code = run.launcher.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError("the launcher did not exit within 120s of the learner's SIGKILL") from None
    log = run.launcher_log()
    assert code == 1 and "learner exited with code -9" in log, (
        f"launcher exit {code} after the learner's kill:\n{log}"
    )
    run.stop_by_hand()
    run.by_hand.clear()
    run.launch(resume=True)


def _redis_fault(run: Run, f: Fault) -> None:
    if f.kind == "kill_redis":
        run.redis_kills.append(time.time())
        run.server.kill()
        time.sleep(f.hold_s)
        run.server.start()  # same port, same directory: the AOF is replayed
    else:
        os.kill(run.server.proc.pid, signal.SIGSTOP)
        time.sleep(f.hold_s)
        os.kill(run.server.proc.pid, signal.SIGCONT)


def inflict(run: Run, f: Fault) -> None:
    run.note(str(f))
    if f.kind in WORKER_FAULTS:
        _worker_fault(run, f)
    elif f.kind == "kill_learner":
        _kill_learner(run)
    else:
        _redis_fault(run, f)
    run.wait_steps(time.time(), f"after {f}")


# ---------------------------------------------------------------------------------------- the test
def aof_window(books: dict, kills: list[float], redis_dir: Path) -> tuple[set[str], str]:
    """Unaccounted ids the AOF (appendfsync everysec) may have lost to a Redis SIGKILL, and a line on each.

    Redis writes the AOF before it replies, so a process kill loses nothing acknowledged, except while a slow fsync
    makes it postpone writes (up to 2 s). An id is excused only if Redis never persisted it (it is nowhere in the
    AOF) and its actor recorded it in the 2.5 s before a kill. One that is in the AOF reached Redis durably and was
    lost later (a scored copy never written, then its rollout acknowledged); one recorded after a kill was
    published while Redis was down or after it came back (publishes block while it is down): neither is the
    AOF's loss."""
    if not books["unaccounted"]:
        return set(), ""
    aof = b"".join(f.read_bytes() for f in sorted(redis_dir.rglob("*.aof*")))
    excused, shown = set(), []
    for i in books["unaccounted"]:
        dt = min((books["generated_at"][i] - k for k in kills), key=abs, default=float("inf"))
        persisted = i.encode() in aof
        if not persisted and -AOF_LOSS_S <= dt <= LEDGER_DELAY_S:
            excused.add(i)
        shown.append(f"{i} recorded {dt:+.3f}s from a Redis kill, {'in' if persisted else 'not in'} the AOF")
    return excused, "unaccounted: " + "; ".join(shown[:10]) + "\n"


def _overrides(quick_models: list[str], out_dir: Path, url: str) -> list[str]:
    return [
        *quick_models,
        f"run.output_dir={out_dir}",
        "run.progress=false",
        "run.seed=0",
        "actor.num_actors=2",
        "scorer.num_scorers=2",
        "actor.prompts_per_batch=4",
        # streaming actors (actors/streaming.py): kills land mid-sequence and mid-group; the books hold by id
        "actor.generation=stream",
        "scorer.batch_size=16",
        "learner.batch_size=16",
        "learner.max_steps=100000",  # ended by ^C once the schedule is done
        "learner.eval_every=0",
        "learner.checkpoint_every=5",
        "learner.batch_timeout_s=90",  # a stuck pipeline ends the run with a clear error instead of 10 minutes
        "weight_sync.join_timeout_s=30",
        "broker.type=redis",
        f"broker.url={url}",
        "broker.claim_idle_s=2",
        "broker.max_deliveries=3",
        "broker.request_timeout_s=20",  # longer than any Redis outage the schedule makes
    ]


def lost_announcements(url: str, run_id: str, redis_kills: list[float]) -> list[str]:
    """Weight versions missing from `control` where a Redis kill falls between the announcements around them.

    The learner announces every version it sends (`weights` records; stream ids are Redis's clock in ms), so
    versions go up one by one; a gap is legitimate only when no actor was alive (nothing announced) or across a
    learner restart. A gap at a Redis kill is an announcement whose publish returned without reaching Redis: no
    actor joins that sync, and the learner waits weight_sync.join_timeout_s for them."""
    import redis

    from opd.protocol import unpack_control

    client = redis.Redis.from_url(url)
    announced = []
    for eid, fields in client.xrange(f"{run_id}:control"):
        rec = unpack_control(fields[b"d"])
        if rec.get("kind") == "weights":
            announced.append((int(eid.split(b"-")[0]) / 1000, rec["version"]))
    found = []
    for (t0, v0), (t1, v1) in itertools.pairwise(announced):
        if v1 > v0 + 1 and any(t0 <= k <= t1 for k in redis_kills):
            found.append(f"weight versions {v0 + 1}..{v1 - 1} never announced (Redis killed between them)")
    return found


def test_random_faults_keep_the_books(quick_models, tmp_path):
    faults = schedule(SEED)
    label = f"OPD_CHAOS_SEED={SEED}: " + "; ".join(map(str, faults))
    (tmp_path / "redis").mkdir()
    (tmp_path / "logs").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=True)  # appendfsync everysec
    out_dir = tmp_path / "run"
    run = Run(server, out_dir, tmp_path / "logs", _overrides(quick_models, out_dir, server.url))
    problems: list[str] = []
    try:
        run.launch()
        try:
            run.wait_steps(0.0, "before the first fault", steps=1)
            for f in faults:
                time.sleep(f.gap_s)
                inflict(run, f)
            run.wait_steps(time.time(), "after the last fault")
        except AssertionError as exc:
            problems.append(str(exc))
        if run.launcher.poll() is None:
            run.note("^C")
            run.launcher.send_signal(signal.SIGINT)
            try:
                run.launcher.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                run.launcher.kill()
                problems.append(f"the launcher did not stop within {STOP_BOUND_S:.0f}s of ^C")
            if run.launcher.returncode != 130:
                problems.append(f"the launcher exited with {run.launcher.returncode} after ^C, not 130")
        run.stop_by_hand()
        books = accounting(out_dir, server.url, label=label)
        excused, near = aof_window(books, run.redis_kills, tmp_path / "redis")
        problems += violations(books, excused)
        problems += lost_announcements(server.url, run_id_of(out_dir), run.redis_kills)
        assert not problems, (
            f"{label}\n"
            + "\n".join(problems)
            + f"\n{books['line']}\n{near}events:\n"
            + "\n".join(run.events)
            + f"\nlauncher log:\n{run.launcher_log()}"
        )
    finally:
        (tmp_path / "events.txt").write_text(label + "\n" + "\n".join(run.events) + "\n")  # for a post-mortem
        run.stop_by_hand()
        if run.launcher is not None and run.launcher.poll() is None:
            run.launcher.kill()
        server.stop()
