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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack
import torch


def _step_dir(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointStore:
    def __init__(self, run_dir: Path, keep: int):
        self.root = run_dir / "checkpoints"
        self.replay = run_dir / "replay"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self.replay.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, step: int, write) -> Path:
        """`write(tmp_dir)` fills a fresh directory; it becomes checkpoints/step-N by one rename."""
        final = self.root / _step_dir(step)
        tmp = self.root / f".{_step_dir(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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


def write_state(path: Path, state: dict) -> None:
    (path / "state.json").write_text(json.dumps(state))
    torch.save({"torch": torch.get_rng_state()}, path / "rng.pt")


def read_state(path: Path) -> dict:
    state = json.loads((path / "state.json").read_text())
    rng = torch.load(path / "rng.pt", weights_only=True)  # our own file; weights_only refuses code anyway
    torch.set_rng_state(rng["torch"])
    return state
