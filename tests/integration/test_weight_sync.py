"""Bucketed broadcast over a real gloo group built without init_process_group, across real processes."""

import multiprocessing as mp
import time

import pytest
import torch

from tests.conftest import free_port
from weight_sync import Signer, WeightBroadcaster, WeightReceiver, make_group, make_store, plan_buckets

SIGNER = Signer("a test secret of the run, 32 chars")


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def _receiver(port, rank, world, queue, versions, bucket_mb):
    torch.set_num_threads(1)
    model = _model(100 + rank)  # different init: only the broadcast can make it equal
    store = make_store("127.0.0.1", port, rank, world, 30)
    rx = WeightReceiver(
        make_group(store, "t/weights", rank, world, "gloo", 30, SIGNER, "127.0.0.1"),
        list(model.named_parameters()),
        bucket_mb,
    )
    rx.check_manifest(store, SIGNER)
    for v in range(1, versions + 1):
        rx.receive(v)
        # numpy arrays travel by value; torch tensors would share an fd that dies with this process
        queue.put((rank, v, [p.detach().numpy().copy() for p in model.parameters()]))


@pytest.mark.parametrize("bucket_mb", [0.0005, 32.0], ids=["many-buckets", "one-bucket"])
def test_actors_receive_bit_identical_weights(bucket_mb):
    ctx = mp.get_context("spawn")
    port, world, versions = free_port(), 3, 3
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, r, world, queue, versions, bucket_mb)) for r in (1, 2)]
    model = _model(0)
    store = make_store("127.0.0.1", port, 0, world, 30)
    for p in procs:
        p.start()
    tx = WeightBroadcaster(None, list(model.named_parameters()), bucket_mb)
    tx.publish_manifest(store, SIGNER)
    tx.group = make_group(store, "t/weights", 0, world, "gloo", 30, SIGNER, "127.0.0.1")
    if bucket_mb < 0.01:
        assert len(tx.buckets) > 1
    sent = {}
    for v in range(1, versions + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        sent[v] = [p.detach().clone() for p in model.parameters()]
        stats = tx.broadcast(v)
        assert stats.bytes == sum(p.numel() * 4 for p in model.parameters())
    got = [queue.get(timeout=60) for _ in range(2 * versions)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for rank, v, params in got:
        for a, b in zip(params, sent[v], strict=True):
            assert torch.equal(torch.from_numpy(a), b), (rank, v)


def _mismatched(port):
    model = torch.nn.Linear(3, 3)
    store = make_store("127.0.0.1", port, 1, 2, 30)
    rx = WeightReceiver(None, list(model.named_parameters()), 1.0)
    rx.check_manifest(store, SIGNER)


def test_manifest_mismatch_is_refused_with_a_clear_error():
    port = free_port()
    store = make_store("127.0.0.1", port, 0, 2, 30)
    WeightBroadcaster(None, list(_model(0).named_parameters()), 1.0).publish_manifest(store, SIGNER)
    with pytest.raises(RuntimeError, match="does not match the learner"):
        _mismatched(port)


def test_bucket_plan_respects_size_and_dtype():
    named = [
        ("a", torch.zeros(10)),
        ("b", torch.zeros(10)),
        ("c", torch.zeros(10, dtype=torch.float64)),
        ("d", torch.zeros(100)),
    ]
    assert plan_buckets(named, bucket_bytes=80) == [[0, 1], [2], [3]]


def test_membership_follows_heartbeats():
    """Registered actors count as alive while their heartbeat counter moves, on the learner's clock only."""
    from weight_sync.elastic import Heartbeat, Membership, register

    port = free_port()
    store = make_store("127.0.0.1", port, 0, None, 30)
    members = Membership(store, SIGNER, liveness_s=0.6, warn=lambda kind, msg: None)
    assert members.alive() == []
    client = make_store("127.0.0.1", port, 1, None, 30)
    beats = []
    for name in ("actor-1", "actor-0"):
        index = register(client, SIGNER, name)
        beats.append(Heartbeat("127.0.0.1", port, index, SIGNER, 0.1, 30))
    time.sleep(0.3)
    assert members.alive() == ["actor-0", "actor-1"]
    beats[0].stop()  # actor-1 dies
    time.sleep(0.3)
    members.alive()  # observed once more while its counter still looks recent
    time.sleep(1.0)
    assert members.alive() == ["actor-0"]
    beats[1].stop()


@pytest.mark.parametrize("bucket_mb", [0.0005, 32.0], ids=["many-buckets", "one-bucket"])
def test_a_learner_recast_to_bf16_still_sends_the_manifest_dtype(bucket_mb):
    """DeepSpeed's bf16 mode recasts the learner's parameters after the manifest was taken: the broadcast sends
    them in the manifest's fp32, so actors receive bf16-rounded fp32 weights, not misread bytes."""
    ctx = mp.get_context("spawn")
    port, world = free_port(), 2
    queue = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port, 1, world, queue, 1, bucket_mb))
    model = _model(0)
    store = make_store("127.0.0.1", port, 0, world, 30)
    proc.start()
    tx = WeightBroadcaster(None, list(model.named_parameters()), bucket_mb)
    tx.publish_manifest(store, SIGNER)
    tx.group = make_group(store, "t/weights", 0, world, "gloo", 30, SIGNER, "127.0.0.1")
    model.to(torch.bfloat16)  # what the engine does after the broadcaster recorded the parameters
    want = [p.detach().float().clone() for p in model.parameters()]
    assert all(t.dtype == torch.float32 for _, t in tx.as_sent())
    assert tx.broadcast(1).bytes == sum(p.numel() * 4 for p in model.parameters())
    _, _, params = queue.get(timeout=60)
    proc.join(30)
    assert proc.exitcode == 0
    for a, b in zip(params, want, strict=True):
        assert torch.equal(torch.from_numpy(a), b)


def test_auto_backend_is_one_answer_from_the_config():
    """Learner and actors resolve the backend independently, so it may depend on the config only; NCCL is picked
    only for separate GPUs (it refuses two ranks on one device) and never with a CPU side."""
    from weight_sync import resolve_backend

    assert resolve_backend("auto", "cpu", "cpu") == "gloo"
    assert resolve_backend("auto", "cuda", "cpu") == "gloo"
    assert resolve_backend("auto", "cpu", "cuda:0") == "gloo"
    assert resolve_backend("auto", "cuda", "cuda:0") == "gloo"
    assert resolve_backend("gloo", "cuda:0", "cuda:1") == "gloo"
    if torch.cuda.is_available():
        assert resolve_backend("auto", "cuda:0", "cuda:1") == "nccl"
    else:
        assert resolve_backend("auto", "cuda:0", "cuda:1") == "gloo"
        with pytest.raises(RuntimeError, match="nccl needs CUDA"):
            resolve_backend("nccl", "cuda:0", "cuda:1")
