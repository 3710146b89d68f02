"""Throughput of our bucketed weight broadcast against a raw gloo broadcast and against memcpy.

    python benchmarks/weight_sync.py                       # 10MB, 100MB, 1GB; one receiver
    python benchmarks/weight_sync.py --sizes 10MB,100MB --receivers 2 --bucket-mb 32 --dtype bfloat16

What it measures, per model size (decimal units: 1 MB = 1e6 bytes, GB/s = 1e9 bytes/s):
- ours: `WeightBroadcaster.broadcast` on the learner (rank 0) and `WeightReceiver.receive` on each receiver process,
  over a ProcessGroupGloo built like the run builds it (TCPStore + PrefixStore, no init_process_group), on a
  model made of 4 MB matrices plus small bias vectors (so buckets have to be packed and unpacked);
- raw gloo: one broadcast of a single flat tensor of the same number of bytes, into a preallocated tensor;
- memcpy: `dst.copy_(src)` of a flat tensor of that size in one process (the ceiling for any local transfer).
Each timing runs from a barrier to a barrier (a one-element allreduce), so it covers every receiver having the
bytes, and is the median of `--repeats` after one warm-up. Every process uses one torch thread, as the run's
components do (`run.torch_threads`).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weight_sync import Signer, WeightBroadcaster, WeightReceiver, make_group, make_store  # noqa: E402
from weight_sync.broadcast import _opts  # noqa: E402

MATRIX = (1024, 1024)  # 4 MB in float32: about one projection of a small transformer layer
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, scale in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def fake_model(nbytes: int, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Matrices of MATRIX, each with a bias, and one last matrix holding the remainder: nbytes in all."""
    esize = torch.empty((), dtype=dtype).element_size()
    per_layer = (MATRIX[0] * MATRIX[1] + MATRIX[0]) * esize
    named = []
    for i in range(nbytes // per_layer):
        named.append((f"layer{i}.weight", torch.randn(MATRIX).to(dtype)))
        named.append((f"layer{i}.bias", torch.randn(MATRIX[0]).to(dtype)))
    rest = (nbytes - len(named) // 2 * per_layer) // esize
    if rest:
        named.append(("tail.weight", torch.randn(rest).to(dtype)))
    return named


def _barrier(group) -> None:
    group.allreduce([torch.zeros(1)]).wait()


def _timed(group, fn, repeats: int) -> list[float]:
    """Barrier to barrier; group None: a local operation, timed alone."""
    fn()  # warm-up: connections, allocator
    out = []
    for _ in range(repeats):
        if group is not None:
            _barrier(group)
        t0 = time.perf_counter()
        fn()
        if group is not None:
            _barrier(group)
        out.append(time.perf_counter() - t0)
    return out


def run_rank(rank: int, world: int, port: int, sizes: list[int], args, results=None) -> None:
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    store = make_store("127.0.0.1", port, rank, world, 120)
    signer = Signer("the benchmark's weight-sync secret")  # every rank runs this code: one shared secret
    group = make_group(store, "bench/weights", rank, world, "gloo", 600, signer, "127.0.0.1")
    for nbytes in sizes:
        repeats = args.repeats or (
            20 if nbytes < 50 * UNITS["MB"] else 5 if nbytes < 500 * UNITS["MB"] else 3
        )
        named = fake_model(nbytes, dtype)
        total = sum(t.numel() * t.element_size() for _, t in named)
        flat = torch.empty(total // named[0][1].element_size(), dtype=dtype)
        if rank == 0:
            tx = WeightBroadcaster(group, named, args.bucket_mb)
            ours = _timed(group, lambda tx=tx: tx.broadcast(0), repeats)
        else:
            rx = WeightReceiver(group, named, args.bucket_mb)
            ours = _timed(group, lambda rx=rx: rx.receive(0), repeats)
        raw = _timed(group, lambda f=flat: group.broadcast([f], _opts(root=0)).wait(), repeats)
        if rank == 0:
            src = torch.randn(flat.numel()).to(dtype)
            mem = _timed(None, lambda s=src, d=flat: d.copy_(s), repeats)
            results.append((total, statistics.median(ours), statistics.median(raw), statistics.median(mem)))
        del named, flat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def table(
    results: list[tuple[int, float, float, float]], receivers: int, bucket_mb: float, dtype: str
) -> str:
    lines = [
        f"bucketed broadcast vs raw gloo vs memcpy ({receivers} receiver(s), bucket_mb {bucket_mb}, {dtype})",
        "| size | ours GB/s | raw gloo GB/s | memcpy GB/s | ours / raw gloo | ours / memcpy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for total, ours, raw, mem in results:
        g = [total / s / 1e9 for s in (ours, raw, mem)]
        lines.append(
            f"| {_fmt_bytes(total)} | {g[0]:.2f} | {g[1]:.2f} | {g[2]:.2f} | {g[0] / g[1]:.2f} | {g[0] / g[2]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default="10MB,100MB,1GB", help="comma-separated model sizes (KB/MB/GB, decimal)"
    )
    p.add_argument("--receivers", type=int, default=1, help="receiver processes (actors)")
    p.add_argument("--bucket-mb", type=float, default=32.0, help="weight_sync.bucket_mb of our broadcast")
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed repetitions per measurement (median); 0 = 20 below 50MB, 5 below 500MB, else 3",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    world, port = 1 + args.receivers, _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_rank, args=(r, world, port, sizes, args)) for r in range(1, world)]
    for proc in procs:
        proc.start()
    results: list[tuple[int, float, float, float]] = []
    t0 = time.perf_counter()
    try:
        run_rank(0, world, port, sizes, args, results)
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    print(table(results, args.receivers, args.bucket_mb, args.dtype))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if all(proc.exitcode == 0 for proc in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
