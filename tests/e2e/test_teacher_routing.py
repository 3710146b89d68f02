"""Routing to several teachers through real processes on a real broker (Redis and zmq): two tiny teachers, the
built-in addition task routed by its answer (one third to each teacher, one third to a 1:3 mixture of both), an
`opd actor` and one scorer per teacher started by hand (`teacher_scorers.scorer.main(cfg, 0, teacher=NAME)` in
`python -c`; the `opd scorer --teacher` flag belongs to the CLI). This test plays the learner: it hosts the weight
store the actor joins (learner/publishing.py's WeightPublisher, never sending a version) and reads `scored` as the
learner's group would. Every scored copy must come from a teacher of its trajectory's route, a mixture must have
exactly one copy per teacher, a rollout routed elsewhere is dead-lettered by the pool it reached, and the books
balance by trajectory id against the actor's ledger and its counters."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, TINY, free_port

pytestmark = pytest.mark.slow

MIXTURE = {"adder": 0.25, "speller": 0.75}
WANT = 24  # trajectories fully scored before the actor is stopped


def _routes() -> dict[str, dict[str, float]]:
    """answer % 3: 0 -> the default (adder), 1 -> speller, 2 -> a 1:3 mixture (2-digit sums are 0..198)."""
    routes = {}
    for v in range(199):
        if v % 3 == 1:
            routes[str(v)] = {"speller": 1.0}
        elif v % 3 == 2:
            routes[str(v)] = {"adder": 1.0, "speller": 3.0}
    return routes


def _config(tmp_path: Path, cache: Path, broker: dict) -> Path:
    """tiny.yaml with its teacher split into two quick (untrained) teachers of different seeds."""
    raw = yaml.safe_load(Path(TINY).read_text())
    teacher = {**raw.pop("teacher"), "sft_steps": 0}
    raw["student"]["sft_steps"] = 0
    raw["teachers"] = {"adder": {"model": teacher}, "speller": {"model": {**teacher, "seed": 1}}}
    raw["routing"] = {"field": "answer", "routes": _routes(), "default": "adder"}
    raw["run"] = {
        **raw["run"],
        "run_id": "route-e2e",
        "cache_dir": str(cache),
        "output_dir": str(tmp_path / "run"),
    }
    raw["actor"] = {"num_actors": 1, "prompts_per_batch": 4}
    raw["sampling"]["n"] = 2
    raw["scorer"]["batch_size"] = 16
    raw["learner"] = {
        **raw.get("learner", {}),
        "batch_size": 16,
    }  # the brokers' depth 32 holds 16 mixtures' copies
    raw["weight_sync"] = {"every": 1, "port": free_port(), "host": "127.0.0.1"}
    raw["supervision"] = {"learner_silence_s": 0}  # no learner process: this test plays its part
    raw["broker"] = broker
    path = tmp_path / "two_teachers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _scorer(config: Path, teacher: str, log: Path) -> subprocess.Popen:
    code = (
        "import sys; from opd.launch.checks import load_run_config; from teacher_scorers.scorer import main; "
        f"sys.exit(main(load_run_config({str(config)!r}), 0, teacher={teacher!r}))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def _publisher(cfg, broker):
    """The learner's weight publisher (its store is what an actor joins), holding the initial student."""
    from contextlib import nullcontext

    from learner.publishing import WeightPublisher, record_layout
    from opd.models.builds import ensure_assets
    from opd.models.loading import load_causal_lm
    from opd.protocol import Streams

    model = load_causal_lm(ensure_assets(cfg.for_teacher("adder")).student.path)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return WeightPublisher(
        cfg.weight_sync, record_layout(model, cfg.weight_sync), nullcontext, broker,
        Streams(cfg.run.run_id).control, cfg.run.run_id, run_dir, ("cpu", "cpu"), 0,
    )  # fmt: skip


def _foreign_rollout(cfg):
    """A rollout routed to adder only, put on speller's stream: speller's pool must dead-letter it."""
    from opd.protocol import Trajectory, encode

    return encode(
        Trajectory(
            run_id=cfg.run.run_id, prompt_id="foreign", group_id="foreign-0", sample_index=0,
            prompt_token_ids=np.array([1, 2, 3], np.int32), response_token_ids=np.array([4, 5], np.int32),
            behaviour_logprobs=np.array([-1.0, -1.0], np.float32), policy_version=0, behaviour_temperature=1.0,
            task={"answer": "1", "task": "addition"}, teacher_weights={"adder": 1.0},
        )
    )  # fmt: skip


def _ledger(run_dir: Path) -> list[tuple[str, str]]:
    path = run_dir / "ledger" / "actor-0.generated"
    if not path.exists():
        return []
    return [tuple(line.split("\t")[:2]) for line in path.read_text().splitlines() if line]


def _stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


@pytest.fixture(params=["redis", "zmq"])
def broker_section(request):
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return {"type": "redis", "url": server.url, "max_depth": 32}
    address = request.getfixturevalue("zmq_broker")  # a real broker process, max_depth 32
    return {"type": "zmq", "host": "127.0.0.1", "port": int(address.rsplit(":", 1)[1])}


class _Learner:
    """The learner's side of the run, as this test plays it: the weight store, and the `scored` stream read
    under the learner's group, each trajectory's copies kept by id."""

    def __init__(self, cfg):
        from opd.protocol import Streams
        from opd.runtime.broker import open_broker

        self.broker = open_broker(cfg.broker)
        self.streams = Streams(cfg.run.run_id)
        self.scored = self.streams.for_teachers("scored", cfg.teacher_pools())  # one per teacher
        self.publisher = _publisher(cfg, self.broker)
        self.copies: dict[str, list] = defaultdict(list)

    def drain(self) -> None:
        from opd.protocol import Streams, decode

        for stream in self.scored:
            msgs = self.broker.consume(stream, Streams.LEARNER_GROUP, "learner", 64, 0.1)
            for m in msgs:
                t = decode(m.data, require_scored=True)
                assert stream == self.streams.scored_for(t.teacher_name)  # each pool on its own stream
                self.copies[t.id].append(t)
            self.broker.ack(stream, Streams.LEARNER_GROUP, [m.id for m in msgs])
        self.publisher.catch_up(0)  # what the learner's loop does: keeps the store's records repaired

    def complete(self) -> set[str]:
        return {i for i, cs in self.copies.items() if len(cs) == len(cs[0].teacher_weights)}


def _start(tmp_path: Path, config: Path) -> dict[str, subprocess.Popen]:
    procs = {name: _scorer(config, name, tmp_path / f"scorer-{name}.log") for name in ("adder", "speller")}
    procs["actor"] = subprocess.Popen(
        [sys.executable, "-m", "opd", "actor", "--config", str(config)],
        cwd=REPO, stdout=(tmp_path / "actor.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return procs


def _run(tmp_path: Path, config: Path, learner: _Learner, run_dir: Path) -> dict[str, int]:
    """Score until WANT trajectories are complete, stop the actor, drain what it published; exit codes."""
    procs, codes = _start(tmp_path, config), {}
    try:
        deadline = time.monotonic() + 240
        while len(learner.complete()) < WANT:
            assert time.monotonic() < deadline, f"only {len(learner.complete())} complete of {WANT}"
            for name, proc in procs.items():
                log = tmp_path / ("actor.log" if name == "actor" else f"scorer-{name}.log")
                assert proc.poll() is None, (name, log.read_text()[-3000:])
            learner.drain()
        codes["actor"] = _stop(procs["actor"])
        generated = {i for i, _ in _ledger(run_dir)}
        deadline = time.monotonic() + 60
        while not generated <= learner.complete() and time.monotonic() < deadline:
            learner.drain()
        learner.drain()
    finally:
        for name, proc in procs.items():
            codes.setdefault(name, _stop(proc))
    return codes


def test_each_trajectory_is_scored_by_the_teachers_of_its_route(tmp_path, asset_cache, broker_section):
    from opd.launch.checks import load_run_config
    from opd.models.builds import ensure_assets

    config = _config(tmp_path, asset_cache, broker_section)
    cfg = load_run_config(config)
    paths = {  # built here once, not raced by the two scorers; two seeds, two models
        name: ensure_assets(cfg.for_teacher(name), log=lambda *_: None).teacher.path
        for name in cfg.teacher_pools()
    }
    assert paths["adder"] != paths["speller"]
    learner = _Learner(cfg)
    foreign = _foreign_rollout(cfg)
    learner.broker.publish(learner.streams.rollouts_for("speller"), [foreign])
    run_dir = Path(cfg.run.output_dir)
    codes = _run(tmp_path, config, learner, run_dir)
    assert codes == {"adder": 0, "speller": 0, "actor": 0}, codes

    ledger = _ledger(run_dir)
    generated = [i for i, _ in ledger]
    copies, complete = learner.copies, learner.complete()
    assert len(generated) == len(set(generated)) >= WANT
    # books by id: what the actor published was scored, nothing else was; a mixture copy missing can only be one
    # of the final batch's, cut short by the actor's stop (the learner's join timeout resolves it)
    assert set(copies) == set(generated)
    cut = {i for i, when in ledger if when == ledger[-1][1]}
    assert set(generated) - complete <= cut
    _check_routes(cfg, copies, paths)
    for name in ("adder", "speller"):  # a teacher's stream is a work stream: what was scored is gone from it
        assert learner.broker.depth(learner.streams.rollouts_for(name)) == 0
        assert learner.broker.depth(learner.streams.scored_for(name)) == 0
    _check_dead_letter(cfg, foreign)
    final = _final_actor_record(cfg)  # the actor's counters: each trajectory once, each copy once
    assert final["trajectories_generated"] == len(generated)
    assert final["rollout_copies_published"] == sum(len(cs) for cs in copies.values())


def _check_routes(cfg, copies: dict[str, list], paths: dict[str, str]) -> None:
    """Each trajectory's route is the one its answer picks; its copies were scored by teachers of that route,
    once each, each by its own model; all three kinds of route occurred, mixtures with 1:3 weights."""
    names, kinds = list(cfg.teacher_pools()), set()
    for tid, cs in copies.items():
        route = cs[0].teacher_weights
        assert route == cfg.routing.route(cs[0].task, names), (tid, cs[0].task, route)
        assert all(c.teacher_weights == route for c in cs)
        scored_by = [c.teacher_name for c in cs]
        assert len(scored_by) == len(set(scored_by)) and set(scored_by) <= set(route), (tid, scored_by, route)
        assert all(c.teacher_id == paths[c.teacher_name] for c in cs)
        kinds.add(tuple(sorted(route)))
    assert kinds == {("adder",), ("speller",), ("adder", "speller")}, kinds
    mixtures = [cs for cs in copies.values() if len(cs) == 2]
    assert mixtures and all(cs[0].teacher_weights == MIXTURE for cs in mixtures)


def _check_dead_letter(cfg, foreign: bytes) -> None:
    """The rollout routed to adder but put on speller's stream: dead-lettered by speller's pool, with the reason;
    nothing else was."""
    from opd.protocol import Streams, decode

    dead = _read_log(cfg, Streams(cfg.run.run_id).dead_letter)
    assert [(r["source"], r["trajectory_id"]) for r in dead] == [("scorer-speller-0", decode(foreign).id)]
    assert "routed to ['adder'], not to teacher 'speller'" in dead[0]["reason"]


def _final_actor_record(cfg) -> dict:
    from opd.protocol import Streams

    records = _read_log(cfg, Streams(cfg.run.run_id).metrics)
    finals = [r for r in records if r.get("component") == "actor-0" and r.get("final")]
    assert finals, [r.get("component") for r in records]
    return finals[-1]


def _read_log(cfg, stream: str) -> list[dict]:
    """Every record a log stream still holds, read under a group of this test's own (zmq keeps no `entries`)."""
    from opd.protocol import unpack_control
    from opd.runtime.broker import open_broker

    broker, out = open_broker(cfg.broker), []
    while msgs := broker.consume(stream, "route-test", "route-test", 256, 0.2):
        out += [unpack_control(m.data) for m in msgs]
        broker.ack(stream, "route-test", [m.id for m in msgs])
    broker.close()
    return out
