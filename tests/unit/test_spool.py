"""The join spool (learner/spool.py) on a real file: what a resumed learner reads back, a record cut short by a
crash, settled trajectories, and the rewrite that keeps the file near what is held."""

from __future__ import annotations

import learner.spool as spool_module
from learner.spool import JoinSpool, Spooled


def test_copies_not_settled_are_read_back_in_order(tmp_path):
    spool = JoinSpool(tmp_path / "ledger" / "spool")
    spool.add("run:scored:a", "1", "t1", b"one")
    spool.add("run:scored:b", "4", "t2", b"two")
    spool.add("run:scored:b", "5", "t1", b"three")
    spool.sync()
    spool.settle(["t2", "never-held"])
    again = JoinSpool(spool.path)
    assert again.load() == [
        Spooled("run:scored:a", "1", "t1", b"one"),
        Spooled("run:scored:b", "5", "t1", b"three"),
    ]
    assert again.holds("t1") and not again.holds("t2")


def test_a_record_cut_short_by_a_crash_is_dropped_and_the_file_stays_appendable(tmp_path):
    spool = JoinSpool(tmp_path / "spool")
    spool.add("s", "1", "t1", b"kept")
    spool.add("s", "2", "t2", b"x" * 100)
    spool.sync()
    spool.close()
    size = spool.path.stat().st_size
    with open(spool.path, "r+b") as fh:
        fh.truncate(size - 40)  # the second record half written
    again = JoinSpool(spool.path)
    assert [s.trajectory_id for s in again.load()] == ["t1"]
    again.add("s", "3", "t3", b"after")
    again.sync()
    assert [s.trajectory_id for s in JoinSpool(spool.path).load()] == ["t1", "t3"]


def test_the_file_is_rewritten_with_the_live_copies_once_settled_ones_outweigh_them(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "COMPACT_MIN_BYTES", 1000)
    spool = JoinSpool(tmp_path / "spool")
    spool.add("s", "0", "live", b"L" * 100)
    for i in range(1, 20):
        spool.add("s", str(i), f"t{i}", b"x" * 100)
        spool.settle([f"t{i}"])
    assert spool.size_bytes < 1000 + 300  # rewritten as it grew, never far past the threshold
    spool.add("s", "99", "later", b"y")
    spool.sync()
    assert [s.trajectory_id for s in JoinSpool(spool.path).load()] == ["live", "later"]


def test_bytes_that_are_no_spool_record_end_the_read_with_a_warning_and_the_file_stays_appendable(
    tmp_path, caplog
):
    spool = JoinSpool(tmp_path / "spool")
    spool.add("s", "1", "t1", b"kept")
    spool.sync()
    spool.close()
    with open(spool.path, "ab") as fh:
        fh.write(b"\xc1\xc1 not msgpack at all")  # 0xc1 is never used by msgpack
    again = JoinSpool(spool.path)
    with caplog.at_level("WARNING", logger="opd"):
        assert [s.trajectory_id for s in again.load()] == ["t1"]
    assert "unreadable and dropped" in caplog.text and str(spool.path) in caplog.text
    again.add("s", "2", "t2", b"after")
    again.sync()
    assert [s.trajectory_id for s in JoinSpool(spool.path).load()] == ["t1", "t2"]
    import msgpack

    with open(spool.path, "ab") as fh:
        fh.write(msgpack.packb({"copy": {"stream": 1}}))  # msgpack, but not a record this module wrote
    assert [s.trajectory_id for s in JoinSpool(spool.path).load()] == ["t1", "t2"]
