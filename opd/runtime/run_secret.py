"""The run's weight-sync secret: what makes a process a member of the weight-sync channel.

The learner's rendezvous store accepts anyone who reaches its port, so membership is proven by signing with a
secret only the run's own components hold (weight_sync/auth.py). It reaches them, in this order of precedence:
1. the environment variable OPD_WEIGHT_SYNC_SECRET (what `opd run` and the Ray launcher give their children);
2. `weight_sync.secret_file`, a file readable by its owner only (0600), for components started by hand on hosts
   that do not share the run directory;
3. `<run.output_dir>/weight_sync.secret`: the learner creates it (0600) when absent, actors wait for it; every
   component on storage the run directory lives on finds it without any setting (Slurm, compose volumes).
Never on a command line (other users can read those in `ps`), never in the resolved config.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

from opd.config import Config, WeightSyncConfig

ENV_VAR = "OPD_WEIGHT_SYNC_SECRET"
FILE_NAME = "weight_sync.secret"
POLL_S = 0.2


class SecretError(RuntimeError):
    pass


def default_path(run_dir: Path | str | None) -> Path:
    return Path(run_dir or ".") / FILE_NAME


def ensure_file(path: Path) -> str:
    """The secret in `path`, written there first (0600, created exclusively) when the file does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_file(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def read_file(path: Path) -> str:
    """The secret in `path`; refused when others than its owner may read it or it is too short."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{path} is readable by others (mode {stat.filemode(mode)}); chmod 600 it")
    token = path.read_text().strip()
    if len(token) < 16:
        raise SecretError(f"{path} holds no secret of at least 16 characters")
    return token


def load(ws: WeightSyncConfig, run_dir: Path | str | None, create: bool = False, wait_s: float = 0.0) -> str:
    """The run's secret from the environment, `weight_sync.secret_file`, or the run directory's file (made here
    when `create`, the learner; waited for up to `wait_s` otherwise, an actor that started first)."""
    token = os.environ.get(ENV_VAR, "").strip()
    if token:
        if len(token) < 16:
            raise SecretError(f"{ENV_VAR} must hold at least 16 characters")
        return token
    given = ws.secret_file
    path = Path(given) if given is not None else default_path(run_dir)
    if create and given is None:
        return ensure_file(path)
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() >= deadline:
            raise SecretError(
                f"no weight-sync secret: set {ENV_VAR}, weight_sync.secret_file, or let the learner write {path}"
            )
        time.sleep(POLL_S)
    return read_file(path)


def share_with_children(cfg: Config) -> None:
    """For a launcher: put the run's secret in this process's environment, which every component it spawns
    inherits (and in the run directory's file, for components a person adds by hand)."""
    os.environ[ENV_VAR] = load(cfg.weight_sync, cfg.run.output_dir, create=True)
