"""Learner checkpoints and the replay log that makes a resume lose nothing and train nothing twice.

The learner acknowledges a scored batch right after its optimiser step (so the broker can trim it and the
actors' staleness accounting stays true), which means a crash after step N but before the next checkpoint would
lose steps M+1..N from the model while the broker already forgot them. So before acknowledging, each step's raw
messages are written to `replay/step-N.msgpack`; a resume loads checkpoint M and re-trains the replayed steps
M+1..N in order, then continues from the broker. Files are written to a temporary name and renamed, so a kill
during a write leaves either the old state or the new one, never half of one.

Layout under the run directory:
    checkpoints/step-000050/model/        HF save_pretrained (safetensors) + tokenizer
    checkpoints/step-000050/engine/       optimiser, lr schedule, counters (torch or DeepSpeed format)
    checkpoints/step-000050/state.json    step, weight version, trained ids in order, histories
    checkpoints/step-000050/rng.pt        torch RNG state
    replay/step-000051.msgpack            the raw scored messages of step 51 (deleted once checkpointed)

A write's progress (`opd.runtime.progress`, in MB) is the growth of its temporary directory, measured every few
seconds while the writers (HF `save_pretrained`, the engine's own state files, DeepSpeed's shards) run, against the
size of the checkpoint before it: it needs nothing from them, and a write faster than WRITE_QUIET_S (a tiny model's)
logs nothing.

Every torch file of a checkpoint is read with `safe_load` (torch's weights-only unpickler): whoever can write the
run directory must not be able to run code in the learner by swapping a file for a crafted pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from pickle import UnpicklingError  # torch's weights-only refusal; nothing here calls pickle itself

import msgpack
import torch

from opd.runtime.progress import EVERY_S, progress

WRITE_QUIET_S = 2.0  # a checkpoint written faster than this is not reported
MB = 1e6
_log = logging.getLogger(__name__)


def _step_dir(step: int) -> str:
    return f"step-{step:06d}"


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (files that vanish while it is being read count 0)."""
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


@contextlib.contextmanager
def watched_write(
    tmp: Path,
    name: str,
    expected_bytes: int | None,
    log: Callable[..., object],
    poll_s: float = EVERY_S,
    quiet_s: float = WRITE_QUIET_S,
) -> Iterator[None]:
    """Report the growth of `tmp` while the body writes into it: a thread measures it every `poll_s` against
    `expected_bytes` (the previous checkpoint's size; None the first time: no ETA) and logs a line at most that
    often; the final line gives the size and time if the write took over `quiet_s`."""
    total = expected_bytes / MB if expected_bytes else None
    with progress(f"writing {name}", total, "MB", log, every_s=poll_s, quiet_under_s=quiet_s) as bar:
        done = threading.Event()

        def poll() -> None:
            while not done.wait(poll_s):
                bar.update(dir_bytes(tmp) / MB)

        watcher = threading.Thread(target=poll, name="checkpoint-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
        size = dir_bytes(tmp) / MB
        bar.update(size, total=size)


class CheckpointStore:
    def __init__(self, run_dir: Path, keep: int, log: Callable[..., object] = _log.info):
        self.root = run_dir / "checkpoints"
        self.replay = run_dir / "replay"
        self.keep, self.log = keep, log
        self.root.mkdir(parents=True, exist_ok=True)
        self.replay.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, step: int, write) -> Path:
        """`write(tmp_dir)` fills a fresh directory; it becomes checkpoints/step-N by one rename."""
        final = self.root / _step_dir(step)
        tmp = self.root / f".{_step_dir(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        before = self.latest()
        with watched_write(tmp, f"checkpoint {final.name}", before and dir_bytes(before), self.log):
            write(tmp)
        if final.exists():  # the same step saved again (stop right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune()
        for f in self.replay.glob("step-*.msgpack"):  # these steps are inside the checkpoint now
            if int(f.stem.split("-")[1]) <= step:
                f.unlink()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: -self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").exists())
        return done[-1] if done else None

    # -------------------------------------------------------------------------------- replay
    def log_step(self, step: int, payloads: list[bytes]) -> None:
        path = self.replay / f"{_step_dir(step)}.msgpack"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb(payloads, use_bin_type=True))
        tmp.rename(path)

    def replay_after(self, step: int) -> list[tuple[int, list[bytes]]]:
        out = []
        for f in sorted(self.replay.glob("step-*.msgpack")):
            n = int(f.stem.split("-")[1])
            if n > step:
                out.append((n, msgpack.unpackb(f.read_bytes(), raw=False)))
        return out


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds more than tensors and plain data: it was not written by us, so it is not loaded."""


def safe_load(path: str | Path, *, allowed: Iterable[type] = (), map_location=None):
    """`torch.load` with weights_only=True, which only rebuilds tensors, containers and the `allowed` classes
    (e.g. DeepSpeed's loss-scaler record) and never calls anything else a pickle names. A file that needs more is
    refused with UnsafeCheckpoint before anything in it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as exc:
        # name what it wanted; torch's message goes on to advise allowlisting it, which is not the fix here
        named = re.search(r"GLOBAL [\w.]+", str(exc))
        raise UnsafeCheckpoint(
            f"checkpoint file {path} holds objects other than tensors and plain data "
            f"({named.group(0) if named else 'not a weights-only pickle'}); refusing to load it, since unpickling it "
            "could run code. It was not written by this learner: restore the file from a trusted copy, or resume "
            "from another checkpoint (move this checkpoint directory away)."
        ) from None


def write_state(path: Path, state: dict) -> None:
    (path / "state.json").write_text(json.dumps(state))
    torch.save({"torch": torch.get_rng_state()}, path / "rng.pt")


def read_state(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text())
    rng = safe_load(path / "rng.pt")
    torch.set_rng_state(rng["torch"])
    return state
