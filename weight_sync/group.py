"""A torch.distributed group for weight broadcast, built without `init_process_group`.

A global default group would tie every process to one world for its whole life. Building the store and the
backend object directly keeps the group a plain value, so elastic.py makes one per sync epoch and actors join
and leave between versions.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from weight_sync.auth import SealedStore, Signer, fetch, prove_members, put

PRESENCE_POLL_S = 0.05


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


def _listen(host: str, port: int) -> int:
    """A listening socket on `host` only (not every interface, as TCPStore binds its own): its fd."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock.detach()  # the store owns the fd from here


def make_store(host: str, port: int, rank: int, world_size: int | None, timeout_s: float) -> dist.Store:
    """Rank 0 (the learner) hosts the TCPStore, listening on `host` alone; the others connect to it.
    world_size None: any number may come."""
    listen_fd = _listen(host, port) if rank == 0 else None
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=(rank == 0),
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listen_fd,
    )


def local_address(host: str, port: int) -> str:
    """This machine's address on the route to `host`: where a rank's gloo pairs should listen, rather than
    wherever the machine's hostname happens to resolve. `host` itself when no route is known."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)  # UDP: picks the route, sends nothing
            return probe.getsockname()[0]
    except OSError:
        return host


def _gloo_options(timeout: timedelta, bind: str | None):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    if interface:  # the operator named the interface: that wins
        opts._devices = [dist.ProcessGroupGloo.create_device(interface=interface.split(",")[0])]
    elif bind:
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
    else:
        opts._devices = [dist.ProcessGroupGloo.create_device()]
    return opts


class SyncAbandoned(RuntimeError):
    """A group left unformed because this process is stopping."""


def _await_ranks(
    scoped: dist.Store, signer: Signer, prefix: str, rank: int, world_size: int, timeout_s: float, stopping
) -> None:
    """Every rank marks itself present and waits here, in Python, until all are: TimeoutError naming the
    missing ranks after `timeout_s`, SyncAbandoned as soon as `stopping()`.

    The backends' constructors hold the GIL for the whole rendezvous (no other thread of the process runs, and
    a SIGTERM handler waits for it), and gloo retries connects beyond its timeout. Entering them only once
    every rank has arrived keeps the long wait (a member that died or hangs) out of them: here the process's
    other threads (the learner's metrics heartbeat) run on and a stop is seen within PRESENCE_POLL_S."""
    put(scoped, signer, f"here/{rank}", prefix)  # signed with the group's prefix: not replayable elsewhere
    deadline = time.monotonic() + timeout_s
    missing = [r for r in range(world_size) if r != rank]
    while missing:
        missing = [r for r in missing if fetch(scoped, signer, f"here/{r}") != prefix]
        if not missing:
            return
        if stopping():
            raise SyncAbandoned(f"stopping while waiting for rank(s) {missing} of {prefix}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank(s) {missing} of {prefix} did not arrive within {timeout_s:g}s")
        time.sleep(PRESENCE_POLL_S)


def make_group(
    store: dist.Store,
    prefix: str,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
    signer: Signer,
    bind: str | None = None,
    stopping: Callable[[], bool] = lambda: False,
):
    """The backend object itself (ProcessGroupGloo/NCCL); every rank must call this to rendezvous.

    Rendezvous values go through a SealedStore (a stranger can neither read nor replace them), gloo's pairs
    listen on `bind` (this rank's address towards the learner), and the ranks prove the secret to each other
    over the new connections before the group is returned. The ranks first wait for each other in Python
    (`_await_ranks`, where `stopping` abandons the wait)."""
    scoped = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    scoped.set_timeout(timeout)  # a rank that never comes (it died) fails the rendezvous after timeout_s
    _await_ranks(scoped, signer, prefix, rank, world_size, timeout_s, stopping)
    sealed = SealedStore(scoped, signer, prefix)
    if backend == "gloo":
        group, device = dist.ProcessGroupGloo(sealed, rank, world_size, _gloo_options(timeout, bind)), "cpu"
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group, device = dist.ProcessGroupNCCL(sealed, rank, world_size, opts), "cuda"
    else:
        raise ValueError(f"unknown weight_sync backend {backend!r}")
    prove_members(group, rank, world_size, signer, prefix, device)
    return group
