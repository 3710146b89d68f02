"""The weight_sync section: how the learner broadcasts weights to actors, and the snapshot fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from opd.config.base import Strict


class WeightSyncConfig(Strict):
    every: int = Field(1, ge=1, description="Broadcast weights every this many learner steps.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="auto = nccl when learner and actors are on different CUDA devices, else gloo (NCCL refuses "
        "two ranks on one GPU); set nccl for multi-node GPU runs.",
    )
    host: str = Field(
        "127.0.0.1",
        description="The address the learner's rendezvous store and its gloo pairs listen on (that interface "
        "only); actors connect to it. A multi-host run names the learner's address on the actors' network.",
    )
    port: int = Field(0, ge=0, le=65535, description="Rendezvous port; 0 = the launcher picks a free one.")
    bucket_mb: float = Field(
        32.0, gt=0, description="Parameters are broadcast in buckets of about this size."
    )
    timeout_s: float = Field(
        300.0, gt=0, description="How long an actor waits to reach the learner's rendezvous store."
    )
    join_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Timeout of forming a sync group (actors join between generation batches) and of each broadcast.",
    )
    liveness_s: float = Field(
        5.0,
        gt=0,
        description="An actor whose heartbeat has not moved for this long is left out of the next sync.",
    )
    # Default 4 = the default learner.max_staleness: a joiner's snapshot is then at most 3 versions old, inside
    # the staleness budget, so it can sample at once; disk traffic is a quarter of the broadcast's, written by a
    # background thread (the learner pays one copy of the weights to CPU memory).
    snapshot_every: int = Field(
        4,
        ge=0,
        description="Write a safetensors snapshot of the weights every this many versions, for late-joining "
        "actors and as the fallback when broadcasts fail; 0 = off.",
    )
    snapshot_dir: Path | None = Field(
        None,
        description="Shared directory of the weight snapshots (every actor host must read it); "
        "default <run.output_dir>/weights.",
    )
    secret_file: Path | None = Field(
        None,
        description="A file (mode 0600) holding the run's weight-sync secret, for components started by hand "
        "on hosts that do not share the run directory. Unset: the environment variable OPD_WEIGHT_SYNC_SECRET, "
        "else <run.output_dir>/weight_sync.secret (the learner creates it, actors wait for it).",
    )
    verify_digests: bool = Field(
        False,
        description="Debug: learner and actors append a sha256 of their weights per version to "
        "<run.output_dir>/weight_digests/<component>.jsonl (one extra pass over the weights per version).",
    )
