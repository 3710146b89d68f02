"""Weight publishing against the actor's own follower: versions announced on `control` through a real broker arrive
bit-identical, snapshots and digests are written, and an actor that joins late is caught up without a new step."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from broker.zmq import ZmqBroker
from learner.publishing import WeightPublisher, record_layout
from opd.config import load_config
from opd.protocol import Streams, stop_record, unpack_control
from tests.conftest import free_port, wait_for
from weight_sync.verify import read_digests

RUN_ID = "publishing-test"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def _config(port: int, run_dir: Path):
    return load_config(
        None,
        [
            f"run.run_id={RUN_ID}",
            f"run.output_dir={run_dir}",
            f"weight_sync.port={port}",
            "weight_sync.liveness_s=1",
            "weight_sync.join_timeout_s=20",
            "weight_sync.timeout_s=30",
            "weight_sync.snapshot_every=1",
            "weight_sync.verify_digests=true",
            "weight_sync.bucket_mb=0.01",  # several buckets per version
        ],
    )


def _actor(address: str, port: int, run_dir: str, name: str, seed: int) -> None:
    """What actors/actor.py does with weights: its follower, driven by `control` records from the broker; at
    `stop`, the weights it holds are written (safetensors) for the test to compare."""
    from safetensors.torch import save_file

    from actors.actor import weight_follower

    torch.set_num_threads(1)
    cfg = _config(port, Path(run_dir))
    model = _model(seed)  # another init: only the sync can make it equal to the learner's
    broker = ZmqBroker(address, 10.0)
    control = Streams(RUN_ID).control
    broker.skip_to_end(control, name)
    follower = weight_follower(cfg, name, model)
    while True:
        for msg in broker.consume(control, name, name, 16, 0.2):
            record = unpack_control(msg.data)
            broker.ack(control, name, [msg.id])
            if record["kind"] == "weights":
                follower.apply(
                    record["version"], record.get("epoch", 0), record.get("members", []), record.get("auth")
                )
            elif record["kind"] == "stop":
                state = {k: v.contiguous() for k, v in model.state_dict().items()}
                save_file(state, f"{run_dir}/{name}.v{follower.version}.safetensors")
                follower.close()
                broker.close()
                return


def _spawn(*args):
    proc = mp.get_context("spawn").Process(target=_actor, args=args)
    proc.start()
    return proc


@pytest.fixture
def client(zmq_broker):
    broker = ZmqBroker(zmq_broker, request_timeout_s=10.0)
    yield broker
    broker.close()


def test_published_versions_reach_the_actors_follower_and_a_late_joiner_is_caught_up(
    zmq_broker, client, tmp_path
):
    from safetensors.torch import load_file

    port = free_port()
    cfg = _config(port, tmp_path)
    model = _model(0)
    publisher = WeightPublisher(
        cfg.weight_sync,
        record_layout(model, cfg.weight_sync),
        contextlib.nullcontext,
        client,
        Streams(RUN_ID).control,
        RUN_ID,
        tmp_path,
        ("cpu", "cpu"),
        version=0,
    )
    procs = [_spawn(zmq_broker, port, str(tmp_path), "actor-0", 1)]
    try:
        wait_for(lambda: publisher.sync.membership.alive() == ["actor-0"], 120, "actor-0 registered")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # "a training step"
        record = publisher.send(1)
        assert record["weight_sync_members"] == 1 and record["weight_sync_bytes"] > 0
        assert "weight_snapshot_copy_seconds" in record  # snapshot_every 1

        procs.append(_spawn(zmq_broker, port, str(tmp_path), "actor-1", 2))
        wait_for(lambda: "actor-1" in publisher.sync.membership.alive(), 120, "actor-1 registered")
        time.sleep(1.1)  # catch-up looks at most once a second
        publisher.catch_up(1)  # no new version: the joiner is sent the current one
        assert publisher.sync.members == ["actor-0", "actor-1"]
        publisher.finish()
        client.publish(Streams(RUN_ID).control, [stop_record("test")])
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()

    want = {k: v for k, v in model.state_dict().items()}
    for name in ("actor-0", "actor-1"):
        got = load_file(tmp_path / f"{name}.v1.safetensors")  # our own file, written above
        for k, v in want.items():
            assert torch.equal(got[k], v), (name, k)
    digests = tmp_path / "weight_digests"
    learner = read_digests(digests / "learner.jsonl")
    assert [r["version"] for r in learner] == [1, 1]  # the step's version, then the same one for the joiner
    truth = learner[0]["sha256"]
    for name in ("actor-0", "actor-1"):  # each took version 1 by broadcast (actor-1 by the catch-up)
        taken = [(r["version"], r["sha256"], r["source"]) for r in read_digests(digests / f"{name}.jsonl")]
        assert (1, truth, "broadcast") in taken, (name, taken)
    assert (tmp_path / "weights" / "v00000001.safetensors").exists()
