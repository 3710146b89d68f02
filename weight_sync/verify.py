"""Debug check that a weight sync is exact: each side appends a sha256 of its weights per version to a file.

Costs one pass over the weights per version on every process, so it runs only with `weight_sync.verify_digests`
(tests and debugging); comparing the learner's file with each actor's proves the actors' weights bit-identical
to the learner's at every version they took, whether from a broadcast or a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch


@torch.no_grad()
def weights_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and raw bytes, in manifest order (bf16 hashed as its bits)."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DigestLog:
    """`<dir>/<component>.jsonl`: one `{"version", "sha256", "source", "time"}` line per version taken."""

    def __init__(self, directory: Path, component: str):
        self.path = Path(directory) / f"{component}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, version: int, named: list[tuple[str, torch.Tensor]], source: str) -> str:
        digest = weights_digest(named)
        line = json.dumps({"version": version, "sha256": digest, "source": source, "time": time.time()})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
        return digest


def read_digests(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
