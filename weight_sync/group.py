"""A torch.distributed group for weight broadcast, built without `init_process_group`.

A global default group would tie every process to one world for its whole life. Building the store and the
backend object directly keeps the group a plain value, so elastic.py makes one per sync epoch and actors join
and leave between versions.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def _device_key(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def resolve_backend(backend: str, learner_device: str, actor_device: str) -> str:
    """The broadcast backend, decided from the config alone so that the learner and every actor agree.

    `auto` takes NCCL only when the learner and the actors are on different CUDA devices: NCCL refuses two ranks
    on one GPU (a single-GPU machine running everything), and a CPU rank cannot join an NCCL group. Anything else
    gets gloo, which also carries CUDA tensors (staged through host memory). Multi-node runs whose learner and
    actors each use their own node's `cuda:0` should set `backend: nccl` explicitly."""
    both_cuda = learner_device.startswith("cuda") and actor_device.startswith("cuda")
    if backend == "auto":
        apart = _device_key(learner_device) != _device_key(actor_device)
        return "nccl" if both_cuda and apart and torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError(
            "weight_sync.backend: nccl needs CUDA, which this machine lacks; use backend: gloo"
        )
    return backend


def make_store(host: str, port: int, rank: int, world_size: int | None, timeout_s: float) -> dist.Store:
    """Rank 0 (the learner) hosts the TCPStore; the others connect to it. world_size None: any number may come."""
    store = dist.TCPStore(
        host,
        port,
        world_size,
        is_master=(rank == 0),
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    return store


def make_group(store: dist.Store, prefix: str, rank: int, world_size: int, backend: str, timeout_s: float):
    """The backend object itself (ProcessGroupGloo/NCCL); every rank must call this to rendezvous."""
    scoped = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    scoped.set_timeout(timeout)  # a rank that never comes (it died) fails the rendezvous after timeout_s
    if backend == "gloo":
        return dist.ProcessGroupGloo(scoped, rank, world_size, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(scoped, rank, world_size, opts)
    raise ValueError(f"unknown weight_sync backend {backend!r}")
