"""Safetensors snapshots of the learner's weights on shared storage: the bootstrap of a late joiner and the
fallback of an actor whose broadcasts keep failing.

Checkpoints use Hugging Face `save_pretrained`, which may rename tensors, drop tied ones and convert dtypes; a
snapshot must hold exactly what a broadcast carries, so it is the broadcast manifest's tensors under the
manifest's names in the training dtype, and an actor checks it against its own manifest the way it checks a
broadcast. One file per version: `v00000042.safetensors`, with the version and the manifest in the safetensors
header. It is written to a dot-prefixed `.tmp` name, fsynced and renamed, so a reader sees a whole snapshot or
none (rename is atomic on POSIX file systems, NFS included for a rename within one directory).

The learner pays one copy of the weights to CPU memory on its own thread; the disk write runs on a background
thread, so a slow shared file system never stalls training (a snapshot still being written when the next is
due makes that next one skipped and counted, not queued).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch

from weight_sync.broadcast import manifest

# The previous snapshot survives the next rename, for a reader that listed the directory just before it.
SNAPSHOT_KEEP = 2
FORMAT = "opd-weights-1"


class SnapshotMismatch(RuntimeError):
    """The snapshot holds other tensors than this model: loading it would scramble the weights."""


def _name(version: int) -> str:
    return f"v{version:08d}.safetensors"


def _version_of(path: Path) -> int | None:
    stem = path.name.removesuffix(".safetensors")
    return int(stem[1:]) if stem.startswith("v") and stem[1:].isdigit() else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """The snapshot directory of a run: written by the learner, read by actors (any host that mounts it)."""

    def __init__(self, root: Path, keep: int = SNAPSHOT_KEEP):
        self.root, self.keep = Path(root), keep
        self._writer: threading.Thread | None = None
        self.skipped = 0
        self.last_version: int | None = None  # newest version handed to write_async
        self.last_error: BaseException | None = None

    # ---------------------------------------------------------------------------------- learner side
    def write(self, version: int, named: list[tuple[str, torch.Tensor]]) -> Path:
        """Write synchronously (tests, and the background thread of `write_async`)."""
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named}
        return self._write_cpu(version, tensors, manifest(named))

    def write_async(self, version: int, named: list[tuple[str, torch.Tensor]]) -> float | None:
        """Copy the weights now (the caller may change them right after) and write them on a thread.
        Returns the seconds the copy took, or None when the previous write is still running (skipped) or this
        version was already written (a catch-up sync re-sends the current version)."""
        if version == self.last_version:
            return 0.0
        if self._writer is not None and self._writer.is_alive():
            self.skipped += 1
            return None
        t0 = time.perf_counter()
        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named}
        copy_s = time.perf_counter() - t0
        spec = manifest(named)
        self.last_version = version

        def run() -> None:
            try:
                self._write_cpu(version, tensors, spec)
            except Exception as exc:  # a full disk must not kill the learner; reported through last_error
                self.last_error = exc

        self._writer = threading.Thread(target=run, name=f"snapshot-v{version}", daemon=True)
        self._writer.start()
        return copy_s

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()

    def _write_cpu(self, version: int, tensors: dict[str, torch.Tensor], spec: list[list]) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / _name(version)
        tmp = self.root / f".{final.name}.tmp"
        meta = {"format": FORMAT, "version": str(version), "manifest": json.dumps(spec)}
        save_file(tensors, str(tmp), metadata=meta)
        _fsync(tmp)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        done = self.versions()
        for _, old in done[: -self.keep] if self.keep else []:
            old.unlink(missing_ok=True)

    def drop_newer_than(self, version: int) -> list[Path]:
        """A resumed learner whose checkpoint is older than a snapshot: that snapshot's weights will never
        exist in this run again (the steps after the checkpoint may train differently), so it must not be read."""
        gone = [p for v, p in self.versions() if v > version]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone

    # ------------------------------------------------------------------------------------ actor side
    def versions(self) -> list[tuple[int, Path]]:
        """Complete snapshots, oldest first (temporary files are dot-prefixed and never match)."""
        if not self.root.is_dir():
            return []
        found = [(_version_of(p), p) for p in self.root.glob("v*.safetensors")]
        return sorted((v, p) for v, p in found if v is not None)

    def latest(self, max_version: int | None = None) -> tuple[int, Path] | None:
        ok = [(v, p) for v, p in self.versions() if max_version is None or v <= max_version]
        return ok[-1] if ok else None


def read_header(path: Path) -> tuple[int, list[list]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "version" not in meta or "manifest" not in meta:
        raise SnapshotMismatch(f"{path} is not an opd weight snapshot (header {sorted(meta)})")
    return int(meta["version"]), json.loads(meta["manifest"])


def _first_difference(theirs: list[list], ours: list[list]) -> str:
    for a, b in zip(theirs, ours, strict=False):
        if a != b:
            return f"snapshot {a} vs actor {b}"
    return f"{len(theirs)} vs {len(ours)} tensors"


@torch.no_grad()
def load_snapshot(path: Path, named: list[tuple[str, torch.Tensor]]) -> int:
    """Copy the snapshot into `named` in place after checking it against their manifest; returns its version.
    Nothing is written unless every tensor matches (name, shape, dtype), so a refused snapshot leaves the
    model as it was."""
    from safetensors import safe_open

    version, theirs = read_header(path)
    ours = manifest(named)
    if theirs != ours:
        raise SnapshotMismatch(
            f"weight snapshot {path} does not match this actor's model ({_first_difference(theirs, ours)}): "
            "start the actor from the same student as the learner, or point weight_sync.snapshot_dir at this run"
        )
    with safe_open(str(path), framework="pt", device="cpu") as f:
        stored = {name: f.get_tensor(name) for name, _ in named}
    # The header could lie about the tensors, and copy_ would broadcast a wrong shape silently.
    for name, t in named:
        src = stored[name]
        if src.shape != t.shape or src.dtype != t.dtype:
            raise SnapshotMismatch(
                f"weight snapshot {path}: tensor {name} is {tuple(src.shape)} {src.dtype}, "
                f"the actor's is {tuple(t.shape)} {t.dtype}"
            )
    for name, t in named:
        t.copy_(stored[name])
    return version
