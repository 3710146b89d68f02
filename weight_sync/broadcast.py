"""Bucketed parameter broadcast from the learner (rank 0) to actors.

Parameters are flattened into buckets of about `bucket_mb` per dtype, so a model of thousands of tensors costs a
few collectives rather than one per tensor, and the receiver copies straight into its own parameters. Both
sides check a manifest (names, shapes, dtypes) first: a mismatch would otherwise scramble weights silently. The
manifest is signed with the run's secret: a receiver ignores (and logs) one that is not, and waits for the
learner's, which the learner writes again at every sync.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from weight_sync.auth import Signer, fetch, put

MANIFEST_KEY = "weight_manifest"
MANIFEST_POLL_S = 0.2
_log = logging.getLogger(__name__)


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
        # Taken now: a sharding engine (ZeRO-3) later leaves empty placeholders in the live parameters, and a
        # mixed-precision one (DeepSpeed bf16) recasts them; what travels keeps the dtypes recorded here.
        self.manifest = manifest(named)
        self.dtypes = [t.dtype for _, t in named]
        self.bucket_bytes = [
            sum(named[i][1].numel() * named[i][1].element_size() for i in b) for b in self.buckets
        ]
        self._stage: list[
            torch.Tensor
        ] = []  # two byte buffers, reused: fresh ones cost a page fault per 4 KB

    def _staging(self, k: int, idx: list[int]) -> torch.Tensor:
        """Bucket k's packing buffer: buffer k % 2 (the pipeline keeps at most two buckets in flight)."""
        first, dtype = self.named[idx[0]][1], self.dtypes[idx[0]]
        numel = self.bucket_bytes[k] // dtype.itemsize
        if not self._stage:
            packed = [n for n, b in zip(self.bucket_bytes, self.buckets, strict=True) if len(b) > 1]
            size = max(packed, default=0)
            self._stage = [torch.empty(size, dtype=torch.uint8, device=first.device) for _ in range(2)]
        buf = self._stage[k % 2]
        if self.bucket_bytes[k] > buf.numel() or buf.device != first.device:
            return torch.empty(numel, dtype=dtype, device=first.device)
        return buf[: self.bucket_bytes[k]].view(dtype)

    def _broadcast(self, flat: torch.Tensor) -> None:
        self.group.broadcast([flat], _opts(root=0)).wait()

    def _start(self, flat: torch.Tensor):
        """Asynchronous: gloo moves this bucket on its own threads while the caller packs or unpacks another
        (collectives on one group run in the order they are issued, on every rank)."""
        return self.group.broadcast([flat], _opts(root=0))

    def _single(self, idx: list[int]) -> torch.Tensor | None:
        """A bucket of one contiguous tensor travels as that tensor itself: no packing copy on either side."""
        t = self.named[idx[0]][1]
        same = t.dtype == self.dtypes[idx[0]]
        return t.detach().view(-1) if len(idx) == 1 and t.is_contiguous() and same else None

    def as_sent(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters in the dtypes of the manifest: what a receiver ends up holding (digests, snapshots)."""
        return [(n, t.detach().to(d)) for (n, t), d in zip(self.named, self.dtypes, strict=True)]


def _opts(root: int):
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = root
    opts.rootTensor = 0
    return opts


class WeightBroadcaster(_Bucketed):
    """Learner side. `named` are the live parameters (read, never written)."""

    def publish_manifest(self, store, signer: Signer) -> None:
        put(store, signer, MANIFEST_KEY, json.dumps(self.manifest))

    @torch.no_grad()
    def broadcast(self, version: int) -> SyncStats:
        """Packs bucket i+1 while bucket i is on the wire (two buckets of memory at most)."""
        t0 = time.perf_counter()
        in_flight = None  # (work, flat): the flat must live until its work is done
        for k, idx in enumerate(self.buckets):
            flat = self._single(idx)
            if flat is None:
                flat = torch.cat(
                    [self.named[i][1].detach().reshape(-1).to(self.dtypes[i]) for i in idx],
                    out=self._staging(k, idx),
                )
            work = self._start(flat)
            if in_flight is not None:
                in_flight[0].wait()
            in_flight = (work, flat)
        if in_flight is not None:
            in_flight[0].wait()
        return SyncStats(version, self.total_bytes, time.perf_counter() - t0)


class WeightReceiver(_Bucketed):
    """Actor side. Writes received values into `named` in place."""

    def check_manifest(self, store, signer: Signer, timeout_s: float = 300.0) -> None:
        """Wait for the learner's signed manifest and compare it with ours. A value that is not signed with the
        run's secret (anyone can write the store) is logged and waited past, never taken for the learner's."""
        theirs, deadline, refused = None, time.monotonic() + timeout_s, None
        while theirs is None:
            raw = fetch(store, signer, MANIFEST_KEY)
            if raw is not None:
                theirs = json.loads(raw)
                break
            if store.check([MANIFEST_KEY]) and refused is None:
                refused = time.monotonic()
                _log.warning(
                    "ignored a weight manifest not signed with the run's secret; waiting for the learner's"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no signed weight manifest from the learner within {timeout_s:.0f}s")
            time.sleep(MANIFEST_POLL_S)
        ours = self.manifest
        if theirs != ours:
            diff = next(((a, b) for a, b in zip(theirs, ours, strict=False) if a != b), None)
            raise RuntimeError(
                f"actor model does not match the learner's ({len(theirs)} vs {len(ours)} tensors; first difference "
                f"learner {diff[0] if diff else '-'} vs actor {diff[1] if diff else '-'}): start both from the same student"
            )

    dirty = False  # a receive failed after overwriting some buckets: the weights mix two versions

    @torch.no_grad()
    def receive(self, version: int) -> SyncStats:
        """Posts the receive of bucket i+1 before unpacking bucket i, mirroring the sender's pipeline."""
        t0 = time.perf_counter()
        self.dirty = False
        in_flight = None  # (work, flat, bucket indices, flat is the parameter itself)
        for k, idx in enumerate(self.buckets):
            flat = self._single(idx)
            direct = flat is not None
            if direct:
                self.dirty = True  # received straight into the parameter: a failure leaves it half written
            else:
                flat = self._staging(k, idx)
            work = self._start(flat)
            if in_flight is not None:
                self._finish(*in_flight)
            in_flight = (work, flat, idx, direct)
        if in_flight is not None:
            self._finish(*in_flight)
        self.dirty = False
        return SyncStats(version, self.total_bytes, time.perf_counter() - t0)

    def _finish(self, work, flat: torch.Tensor, idx: list[int], direct: bool) -> None:
        work.wait()
        if direct:
            return
        self.dirty = True
        offset = 0
        for i in idx:
            t = self.named[i][1]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
