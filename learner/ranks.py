"""The learner's ranks: where they meet, how a global batch is split among them, and the collectives they share.

N learner processes form the default `torch.distributed` process group (gloo on CPU, NCCL on CUDA). It is not
the weight-sync group: that one is made per version between rank 0 and the actors (weight_sync/), without a
global `init_process_group`, so the two never mix. One learner rank (`num_ranks: 1`, the default) creates no
group here at all: it trains exactly as before (DeepSpeed makes its own one-rank group).

Rank 0 alone talks to the broker and tells the other ranks what to do, one command at a time, as msgpack bytes in
a uint8 tensor broadcast over the group (`RankGroup.broadcast_bytes`): never pickle, so a rank runs nothing but
our own decoders on what it receives. Every collective has the group's timeout (`learner.collective_timeout_s`,
given to `init_process_group`), so a rank that died makes the others fail with `RankLost` (and exit non-zero)
instead of hanging.
"""

from __future__ import annotations

import datetime
import heapq
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgpack
import torch

from opd.config import LearnerConfig

LOCALHOST = "127.0.0.1"


class RankLost(RuntimeError):
    """A collective of the learner group failed or timed out: another rank died, hangs, or disagrees."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom this process joins the learner group."""

    addr: str
    port: int
    rank: int
    world: int
    local_rank: int


def rendezvous(lc: LearnerConfig, rank: int | None, env: Mapping[str, str] = os.environ) -> Rendezvous:
    """This process's place in the learner group. The config names the group (`learner.num_ranks`, and
    `master_addr`/`master_port` when set); what it leaves open comes from the environment a scheduler sets
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK: torchrun's and Slurm scripts' names). `rank` is
    `opd learner --rank` (the launcher's choice); without it, RANK. A WORLD_SIZE that disagrees with
    num_ranks is refused: ranks that disagree on the group's size would wait for each other for ever."""
    world = lc.num_ranks
    local = rank  # `--rank` comes from a launcher of one node (opd run); a scheduler's says LOCAL_RANK
    if rank is None:
        env_world = env.get("WORLD_SIZE")
        if env_world is not None and int(env_world) != world:
            raise ValueError(
                f"the environment says WORLD_SIZE={env_world} but learner.num_ranks is {world}; set "
                f"learner.num_ranks={env_world} (or unset WORLD_SIZE)"
            )
        rank = int(env.get("RANK", "0")) if world > 1 else 0
    if not 0 <= rank < world:
        raise ValueError(f"learner rank {rank} is outside learner.num_ranks={world} (ranks 0..{world - 1})")
    addr = lc.master_addr or env.get("MASTER_ADDR") or LOCALHOST
    port = lc.master_port or int(env.get("MASTER_PORT", "0"))
    if world > 1 and not port:
        raise ValueError(
            f"learner.num_ranks={world} needs a rendezvous port: set learner.master_port (opd run picks one) or "
            "MASTER_PORT in the environment"
        )
    if local is None:
        local = int(env.get("LOCAL_RANK", rank)) if world > 1 else 0
    return Rendezvous(addr, port, rank, world, local)


def balance_by_tokens(tokens: Sequence[int], ranks: int) -> list[list[int]]:
    """Row indices per rank, balanced by token count (not by row count): longest first, each onto the rank
    with the fewest tokens so far (ties: the lower rank), rows listed in ascending order per rank.

    Deterministic (a pure function of `tokens`), so every rank computes the same split from the same batch. The
    greedy longest-processing-time rule keeps the heaviest rank within 4/3 of the optimum, and within one row
    of the mean: max load <= total / ranks + max(tokens). When there are fewer rows than ranks, the last ranks
    get none (they still join the step's collectives: see learner/engines/base.py)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1 (got {ranks})")
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    loads = [(0, r) for r in range(ranks)]  # (tokens so far, rank): a heap
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for i in order:
        load, r = heapq.heappop(loads)
        shares[r].append(i)
        heapq.heappush(loads, (load + int(tokens[i]), r))
    return [sorted(s) for s in shares]


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (an exited child not yet reaped, a zombie, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _as_tensor(data: bytes) -> torch.Tensor:
    """`data` as a uint8 tensor (a copy: the tensor is written to by collectives)."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class RankGroup:
    """The learner's ranks as one group; with one rank every method is the identity and nothing is created.

    Collectives run on `device` tensors (CPU for gloo, this rank's GPU for NCCL). Each one names itself in the
    RankLost it raises, so the log of a surviving rank says which collective lost its peer."""

    def __init__(self, rank: int = 0, size: int = 1, device: str = "cpu", timeout_s: float = 0.0):
        self.rank, self.size, self.device, self.timeout_s = rank, size, torch.device(device), timeout_s
        self.comm_seconds = 0.0  # time in this group's gradient reductions since the last `take_comm_seconds`
        self.members: list[tuple[str, int]] = []  # (host, pid) per rank, exchanged on joining

    @classmethod
    def join(cls, rv: Rendezvous, device: str, timeout_s: float) -> RankGroup:
        """Create the default process group of `rv.world` ranks (one rank: none is created)."""
        if rv.world == 1:
            return cls()
        import torch.distributed as dist

        cuda = "cuda" in device
        if cuda:  # one GPU per rank on a node
            torch.cuda.set_device(rv.local_rank)
            device = f"cuda:{rv.local_rank}"
        # DeepSpeed and other libraries read these; they must describe the group just made
        os.environ.update(
            RANK=str(rv.rank),
            WORLD_SIZE=str(rv.world),
            LOCAL_RANK=str(rv.local_rank),
            MASTER_ADDR=rv.addr,
            MASTER_PORT=str(rv.port),
        )
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{rv.addr}:{rv.port}",
            rank=rv.rank,
            world_size=rv.world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        group = cls(rv.rank, rv.world, device, timeout_s)
        group.members = [tuple(m) for m in group.all_gather_obj([socket.gethostname(), os.getpid()])]
        return group

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, op):
        try:
            return op()
        except Exception as exc:  # gloo/NCCL raise several types for a lost peer or a timeout
            gone = self.gone()
            who = f"learner rank(s) {gone} exited" if gone else "another learner rank died or stalled"
            raise RankLost(
                f"learner rank {self.rank} of {self.size}: {what} failed ({type(exc).__name__}: {exc}); {who} "
                f"(learner.collective_timeout_s={self.timeout_s:g})"
            ) from exc

    def gone(self) -> list[int]:
        """The ranks on this host whose process has ended (a rank on another host cannot be seen from here)."""
        host = socket.gethostname()
        return [
            r for r, (h, pid) in enumerate(self.members) if h == host and r != self.rank and not _alive(pid)
        ]

    # ------------------------------------------------------------------------------------ bytes
    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (others pass None): a length, then a uint8 tensor of that length."""
        if self.size == 1:
            return data or b""
        import torch.distributed as dist

        def op() -> bytes:
            n = torch.tensor([len(data) if self.leader else 0], dtype=torch.int64, device=self.device)
            dist.broadcast(n, 0)
            if self.leader:
                buf = _as_tensor(data).to(self.device)
            else:
                buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
            if buf.numel():
                dist.broadcast(buf, 0)
            return data if self.leader else buf.cpu().numpy().tobytes()

        return self._run("receiving rank 0's command" if not self.leader else "sending a command", op)

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank."""
        if self.size == 1:
            return [data]
        import torch.distributed as dist

        def op() -> list[bytes]:
            n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
            sizes = [torch.zeros_like(n) for _ in range(self.size)]
            dist.all_gather(sizes, n)
            width = max(int(s.item()) for s in sizes)
            buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
            buf[: len(data)] = _as_tensor(data)
            parts = [torch.empty_like(buf) for _ in range(self.size)]
            dist.all_gather(parts, buf)
            return [p[: int(s.item())].cpu().numpy().tobytes() for p, s in zip(parts, sizes, strict=True)]

        return self._run("exchanging step results", op)

    def all_gather_obj(self, value) -> list:
        """`all_gather_bytes` of a msgpack-able value (plain data only)."""
        parts = self.all_gather_bytes(msgpack.packb(value, use_bin_type=True))
        return [msgpack.unpackb(p, raw=False) for p in parts]

    # ---------------------------------------------------------------------------------- numbers
    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a NaN on one rank skips the step on all of them)."""
        if self.size == 1:
            return bool(flag)
        import torch.distributed as dist

        def op() -> bool:
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return bool(t.item())

        return self._run("agreeing on a step", op)

    def max_int(self, value: int) -> int:
        """The largest `value` over the ranks."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        def op() -> int:
            t = torch.tensor([value], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return int(t.item())

        return self._run("agreeing on the micro-batch count", op)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter], bucket_bytes: int = 32 << 20) -> None:
        """Sum every parameter's gradient over the ranks in place, in flat buckets of about `bucket_bytes`; the
        time goes to `comm_seconds`. A parameter without a gradient here counts as zeros, and keeps none only if
        no rank has one: as on one rank, where AdamW skips a parameter the batch never reached (a zero gradient
        would still move it by its momentum)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        t0 = time.perf_counter()
        anywhere = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        self._run("reducing gradients", lambda: dist.all_reduce(anywhere, op=dist.ReduceOp.MAX))
        params = [p for p, some in zip(params, anywhere.tolist(), strict=True) if some]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0

        def flush() -> None:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self._run("reducing gradients", lambda: dist.all_reduce(flat))
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket.clear()

        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= bucket_bytes:
                flush()
                size = 0
        if bucket:
            flush()
        self.comm_seconds += time.perf_counter() - t0

    def broadcast_parameters(self, params) -> None:
        """Rank 0's values of `params` on every rank."""
        if self.size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                self._run("receiving rank 0's weights", lambda p=p: dist.broadcast(p.data, 0))

    def take_comm_seconds(self) -> float:
        seconds, self.comm_seconds = self.comm_seconds, 0.0
        return seconds

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
