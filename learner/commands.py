"""How learner rank 0 leads the other ranks: one command at a time, each a msgpack map broadcast over the group.

Rank 0 alone reads the broker, validates, deduplicates and judges lag (learner/intake.py), so every decision
about which entries make a global batch is made once. It then sends the batch's raw scored messages to every rank
(`step`); each rank decodes and collates them exactly as rank 0 did, and the engine trains this rank's share
(learner/engines/base.py). Whatever else needs every rank is a command too: a ZeRO-3 parameter gather (weights
out, evaluation copies, checkpoints: `gather`), a checkpoint's engine state (`save_state`), a keep-alive while rank
0 waits for data (`noop`), and the end (`stop`).

The whole global batch goes to every rank, not only its share: `prepare` computes batch-wide quantities
(whitening, GRPO group means, the normalisers of every optimiser step) that each rank then recomputes from the
same bytes, exactly and deterministically, where shipping them would need a second wire format for tensors; and
scored messages are small next to a weight version.

After each step every rank reports (`step_report`, an all-gather over the group): whether its step succeeded, its
seconds, tokens and communication time. Rank 0 acknowledges the batch's entries only once all succeeded: a rank
that failed or died makes the exchange fail, and the entries stay pending in the broker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack

from learner.batching import Batch
from learner.ranks import RankGroup, RankLost
from opd.protocol import Trajectory, decode
from opd.runtime.lifecycle import log

KEEPALIVE_SHARE = 0.25  # rank 0 sends a no-op after this share of collective_timeout_s without a command


def pack(op: str, **fields) -> bytes:
    return msgpack.packb({"op": op, **fields}, use_bin_type=True)


def unpack(data: bytes) -> dict:
    cmd = msgpack.unpackb(data, raw=False)
    if not isinstance(cmd, dict) or not isinstance(cmd.get("op"), str):
        raise RankLost(f"learner rank 0 sent a malformed command ({len(data)} bytes)")
    return cmd


def step_report(group: RankGroup, ok: bool, step_s: float, engine) -> dict:
    """Every rank's report of the step just taken, exchanged over the group; on rank 0 the step record's
    per-rank fields. Raises RankLost naming the ranks whose step failed.

    rank_comm_seconds is the time in reductions this code runs itself (the torch engine's gradient all-reduce,
    DeepSpeed ZeRO-0's); ZeRO-1/2/3 reduce inside DeepSpeed (in backward hooks or its step), so for them
    rank_apply_seconds (the optimiser step with whatever reduction and gather DeepSpeed runs there) is the
    measure."""
    comm = group.take_comm_seconds()
    mine = [bool(ok), float(step_s), int(engine.rank_tokens), float(comm), float(engine.apply_seconds)]
    reports = group.all_gather_obj(mine)
    failed = [r for r, rep in enumerate(reports) if not rep[0]]
    if failed:
        raise RankLost(f"learner rank(s) {failed} failed the step; it is not acknowledged")
    tokens_per_rank = [rep[2] for rep in reports]
    mean = sum(tokens_per_rank) / len(tokens_per_rank)
    return {
        "learner_ranks": group.size,
        "rank_step_seconds": [rep[1] for rep in reports],
        "rank_tokens": tokens_per_rank,
        "rank_token_imbalance": max(tokens_per_rank) / mean if mean else 1.0,
        "rank_comm_seconds": [rep[3] for rep in reports],
        "rank_apply_seconds": [rep[4] for rep in reports],
    }


class LeaderEngine:
    """Rank 0's engine: the engine itself, except that what every rank must do together first tells the other
    ranks to do it (`gathered`, `save_state`). Everything else is the engine's (`__getattr__`)."""

    def __init__(self, engine, group: RankGroup, timeout_s: float):
        self._engine, self.group = engine, group
        self._keepalive_s = KEEPALIVE_SHARE * timeout_s
        self._last_sent = time.monotonic()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def send(self, op: str, **fields) -> None:
        self.group.broadcast_bytes(pack(op, **fields))
        self._last_sent = time.monotonic()

    def keepalive(self) -> None:
        """While rank 0 waits for data: a no-op command now and then, so the others' wait never times out."""
        if time.monotonic() - self._last_sent >= self._keepalive_s:
            self.send("noop")

    def train(self, payloads: list[bytes], batch: Batch) -> dict[str, float]:
        """`step` on every rank: the others get the raw messages of `batch`; this rank trains the collated one."""
        self.send("step", payloads=payloads)
        return self._engine.step(batch)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        if self._engine.gathers:
            self.send("gather")
        with self._engine.gathered():
            yield

    def save_state(self, path: Path) -> None:
        """The engine state into `path`: DeepSpeed's ZeRO shards by every rank, a replicated state by rank 0;
        returns once every rank has written its part."""
        self.send("save_state", path=str(path))
        self._engine.save_state(path)
        if not self.group.all_true(True):
            raise RankLost(f"a learner rank could not write its engine state into {path}")

    def stop(self) -> None:
        """The end: the others return once every rank has heard it (so none is left reading a closed group)."""
        self.send("stop")
        self.group.all_true(True)


class Follower:
    """A learner rank other than 0: does what rank 0 says until it says stop. It never touches the broker; its
    one way out besides `stop` is an error (RankLost when rank 0 is gone), so the launcher sees it exit
    non-zero."""

    def __init__(
        self, group: RankGroup, engine, collate: Callable[[list[Trajectory]], Batch], vocab_size: int
    ):
        self.group, self.engine, self.collate, self.vocab_size = group, engine, collate, vocab_size

    def run(self) -> None:
        while True:
            cmd = unpack(self.group.broadcast_bytes(None))
            op = cmd["op"]
            if op == "step":
                self._step(cmd["payloads"])
            elif op == "gather":
                with self.engine.gathered():
                    pass  # rank 0 uses the full parameters; this rank only lends its shards
            elif op == "save_state":
                ok = True
                if self.engine.per_rank_state:
                    try:
                        self.engine.save_state(Path(cmd["path"]))
                    except OSError as exc:
                        log.error("could not write this rank's engine state: %s", exc)
                        ok = False
                self.group.all_true(ok)
            elif op == "stop":
                self.group.all_true(True)
                return
            elif op != "noop":
                raise RankLost(f"learner rank 0 sent an unknown command {op!r}")

    def _step(self, payloads: list[bytes]) -> None:
        t0 = time.perf_counter()
        batch = [decode(p, vocab_size=self.vocab_size, require_scored=True) for p in payloads]
        self.engine.step(self.collate(batch))
        step_report(self.group, True, time.perf_counter() - t0, self.engine)
