"""Weight snapshots: exact round trip in the training dtype, newest chosen, atomic under SIGKILL, mismatches refused."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from tests.conftest import free_port
from weight_sync import WeightBroadcaster, WeightReceiver, make_store
from weight_sync.elastic import ElasticBroadcaster, ElasticReceiver
from weight_sync.snapshot import SnapshotMismatch, SnapshotStore, load_snapshot, read_header
from weight_sync.verify import weights_digest

SECRET = "a test secret of the run, 32 chars"


def _model(seed: int, dtype=torch.float32, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 8)).to(
        dtype
    )


def _named(m):
    return list(m.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical_in_the_training_dtype(tmp_path, dtype):
    store = SnapshotStore(tmp_path)
    src, dst = _model(0, dtype), _model(1, dtype)
    assert weights_digest(_named(src)) != weights_digest(_named(dst))
    path = store.write(7, _named(src))
    assert path.name == "v00000007.safetensors"
    version, spec = read_header(path)
    assert version == 7 and spec == [[n, list(t.shape), str(dtype)] for n, t in _named(src)]
    assert load_snapshot(path, _named(dst)) == 7
    assert weights_digest(_named(dst)) == weights_digest(_named(src))
    for a, b in zip(src.parameters(), dst.parameters(), strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def test_newest_is_chosen_old_ones_pruned_and_partial_files_ignored(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    m = _model(0)
    for v in (3, 10, 6):
        store.write(v, _named(m))
    (tmp_path / ".v00000099.safetensors.tmp").write_bytes(b"half a file")  # a writer died mid-write
    # keep=2: v3 pruned; v6 was written last but is older than v10
    assert [v for v, _ in store.versions()] == [6, 10]
    assert store.latest()[0] == 10
    assert store.latest(max_version=9)[0] == 6
    assert store.latest(max_version=5) is None
    assert [p.name for p in store.drop_newer_than(6)] == ["v00000010.safetensors"]
    assert store.latest()[0] == 6


def test_mismatched_snapshot_is_refused_and_leaves_the_model_untouched(tmp_path):
    store = SnapshotStore(tmp_path)
    path = store.write(1, _named(_model(0, width=32)))
    other = _model(1, width=33)
    before = weights_digest(_named(other))
    with pytest.raises(
        SnapshotMismatch, match="does not match this actor's model.*start the actor from the same"
    ):
        load_snapshot(path, _named(other))
    bf16 = _model(1, torch.bfloat16)
    with pytest.raises(SnapshotMismatch, match="torch.bfloat16"):
        load_snapshot(path, _named(bf16))
    assert weights_digest(_named(other)) == before
    from safetensors.torch import save_file

    foreign = tmp_path / "v00000002.safetensors"
    save_file({n: t.detach() for n, t in _named(_model(0))}, str(foreign))
    with pytest.raises(SnapshotMismatch, match="not an opd weight snapshot"):
        load_snapshot(foreign, _named(other))


def _write_forever(root: str) -> None:
    big = [("w", torch.randn(4096, 4096))]  # 64 MB: long enough to be killed mid-write
    store = SnapshotStore(root, keep=100)
    v = 0
    while True:
        v += 1
        store.write(v, big)


def test_a_writer_killed_mid_write_leaves_only_whole_snapshots(tmp_path):
    proc = mp.get_context("spawn").Process(target=_write_forever, args=(str(tmp_path),))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert list(tmp_path.glob(".*.tmp")), "the writer never started a snapshot"
        os.kill(proc.pid, signal.SIGKILL)  # mid-write: the temporary file is there
    finally:
        proc.join(30)
    assert list(tmp_path.glob(".*.tmp")), "killed between writes; the test did not exercise a partial file"
    target = [("w", torch.empty(4096, 4096))]
    for v, path in SnapshotStore(tmp_path).versions():  # whatever is listed loads whole
        assert load_snapshot(path, target) == v


def test_async_write_copies_first_and_skips_while_busy(tmp_path):
    store = SnapshotStore(tmp_path)
    m = _model(0)
    expected = weights_digest(_named(m))
    assert store.write_async(4, _named(m)) is not None
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # the learner trains on while the snapshot is written
    store.wait()
    fresh = _model(5)
    load_snapshot(store.latest()[1], _named(fresh))
    assert weights_digest(_named(fresh)) == expected
    store._writer = _Busy()
    assert store.write_async(8, _named(m)) is None and store.skipped == 1


class _Busy:
    def is_alive(self) -> bool:
        return True


def test_joining_actor_bootstraps_from_the_newest_snapshot_not_newer_than_the_learner(tmp_path):
    """Before registering, an actor loads the newest snapshot at or below the learner's published version and
    stamps that version; a receive that fails after overwriting buckets falls back to a snapshot."""
    port = free_port()
    learner_model = _model(0)
    snaps = SnapshotStore(tmp_path)
    snaps.write(4, _named(learner_model))
    v4 = weights_digest(_named(learner_model))
    with torch.no_grad():
        for p in learner_model.parameters():
            p.mul_(2)
    snaps.write(8, _named(learner_model))  # newer than the learner below: must not be taken
    store = make_store("127.0.0.1", port, 0, None, 30)
    tx = WeightBroadcaster(None, _named(learner_model), 1.0)
    ElasticBroadcaster(store, "t/w", "gloo", tx, lambda *a: None, 1.0, 5.0, SECRET, version=6)
    actor_model = _model(1)
    seen = []
    follower = ElasticReceiver(
        "127.0.0.1",
        port,
        "actor-0",
        "t/w",
        "gloo",
        WeightReceiver(None, _named(actor_model), 1.0),
        timeout_s=10,
        join_timeout_s=5,
        heartbeat_s=0.2,
        secret=SECRET,
        snapshots=snaps,
        on_weights=lambda v, source: seen.append((v, source)),
    )
    try:
        assert (follower.version, follower.source) == (4, "snapshot") and seen == [(4, "snapshot")]
        assert weights_digest(_named(actor_model)) == v4
        with torch.no_grad():
            for p in actor_model.parameters():
                p.zero_()  # as if a broadcast had overwritten some buckets and then failed
        follower.rx.dirty = True
        follower._recover()
        assert follower.version == 4 and weights_digest(_named(actor_model)) == v4
        empty = ElasticReceiver(
            "127.0.0.1",
            port,
            "actor-1",
            "t/w",
            "gloo",
            WeightReceiver(None, _named(_model(2)), 1.0),
            timeout_s=10,
            join_timeout_s=5,
            heartbeat_s=0.2,
            secret=SECRET,
            snapshots=SnapshotStore(tmp_path / "none"),
        )
        assert empty.version == 0 and empty.source == "initial"
        empty.rx.dirty = True
        empty._recover()
        assert empty.version == -1  # unknown weights: the actor samples nothing until a whole broadcast
        empty.close()
    finally:
        follower.close()
