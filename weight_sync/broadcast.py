"""Bucketed parameter broadcast from the learner (rank 0) to actors.

Parameters are flattened into buckets of about `bucket_mb` per dtype, so a model of thousands of tensors costs a
few collectives rather than one per tensor, and the receiver copies straight into its own parameters. Both
sides check a manifest (names, shapes, dtypes) first: a mismatch would otherwise scramble weights silently.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

MANIFEST_KEY = "weight_manifest"


def manifest(named: list[tuple[str, torch.Tensor]]) -> list[list]:
    return [[name, list(t.shape), str(t.dtype)] for name, t in named]


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[int]]:
    """Indices of tensors per bucket: consecutive, one dtype per bucket, each at most bucket_bytes unless a
    single tensor is larger."""
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, (_, t) in enumerate(named):
        nbytes = t.numel() * t.element_size()
        if not buckets or t.dtype != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size, dtype = 0, t.dtype
        buckets[-1].append(i)
        size += nbytes
    return buckets


@dataclass
class SyncStats:
    version: int
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class _Bucketed:
    def __init__(self, group, named: list[tuple[str, torch.Tensor]], bucket_mb: float):
        self.group = group
        self.named = named
        self.buckets = plan_buckets(named, int(bucket_mb * (1 << 20)))
        self.total_bytes = sum(t.numel() * t.element_size() for _, t in named)
        # Taken now: a sharding engine (ZeRO-3) later leaves empty placeholders in the live parameters.
        self.manifest = manifest(named)

    def _broadcast(self, flat: torch.Tensor) -> None:
        self.group.broadcast([flat], _opts(root=0)).wait()


def _opts(root: int):
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    return opts


class WeightBroadcaster(_Bucketed):
    """Learner side. `named` are the live parameters (read, never written)."""

    def publish_manifest(self, store) -> None:
        store.set(MANIFEST_KEY, json.dumps(self.manifest))

    @torch.no_grad()
    def broadcast(self, version: int) -> SyncStats:
        t0 = time.perf_counter()
        for idx in self.buckets:
            flat = torch.cat([self.named[i][1].detach().reshape(-1) for i in idx])
            self._broadcast(flat)
        return SyncStats(version, self.total_bytes, time.perf_counter() - t0)


class WeightReceiver(_Bucketed):
    """Actor side. Writes received values into `named` in place."""

    def check_manifest(self, store) -> None:
        theirs = json.loads(store.get(MANIFEST_KEY))
        ours = self.manifest
        if theirs != ours:
            diff = next(((a, b) for a, b in zip(theirs, ours, strict=False) if a != b), None)
            raise RuntimeError(
                f"actor model does not match the learner's ({len(theirs)} vs {len(ours)} tensors; first difference "
                f"learner {diff[0] if diff else '-'} vs actor {diff[1] if diff else '-'}): start both from the same student"
            )

    @torch.no_grad()
    def receive(self, version: int) -> SyncStats:
        t0 = time.perf_counter()
        for idx in self.buckets:
            tensors = [self.named[i][1] for i in idx]
            flat = torch.empty(
                sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device
            )
            self._broadcast(flat)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        return SyncStats(version, self.total_bytes, time.perf_counter() - t0)
