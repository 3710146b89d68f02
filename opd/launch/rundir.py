"""A run's identity and home, decided once by whoever launches it: run id, run directory, free ports, resume.

Every process of a run reads one resolved config, so these decisions are made here, before anything starts, and
written to <run dir>/config.yaml. This module imports no torch (a test holds it to that): the cluster helper,
`opd scale` and the CLI resolve runs without paying for the model stack.

config.yaml holds no secret: it is read by every component and copied around with the run directory. A password in
broker.url moves to <run dir>/secrets/broker.password (0600, in a 0700 folder) and config.yaml names that file in
broker.password_file; any other secret in the config is refused (it would have to be written in the clear).
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from broker import capabilities
from opd.config import Config, ConfigError, dump_config
from opd.config.redact import secret_paths

CONFIG_NAME = "config.yaml"
SECRETS_DIR = "secrets"  # 0700; files that must hold a secret, each 0600
FINISHED_MARKS = ("metrics.jsonl", "summary.json", "student")  # what a run that has trained leaves behind
ENDED_MARKS = ("learner_summary.json", "summary.json")  # an earlier incarnation's end, stale once resumed


class LaunchError(RuntimeError):
    """The run could not start; the message says which part and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_run(cfg: Config) -> Config:
    """Fill what a run needs decided once for all processes: id, directory, ports."""
    cfg = cfg.model_copy(deep=True)
    if cfg.run.run_id is None:
        cfg.run.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{random.randrange(16**4):04x}"
    if cfg.run.output_dir is None:
        cfg.run.output_dir = Path("runs") / cfg.run.run_id
    # A broker the launcher starts itself listens where the launcher says; a server's address is the user's.
    if capabilities(cfg.broker).embedded_process and cfg.broker.port == 0:
        cfg.broker.port = free_port()
    if cfg.weight_sync.port == 0:
        cfg.weight_sync.port = free_port()
    return cfg


def resolve_resume(cfg: Config) -> Config:
    """`opd run CONFIG --resume`: continue the run in run.output_dir (or runs/<run.run_id>) under its own run id,
    so its streams, checkpoints and replay log are the ones picked up."""
    if cfg.run.output_dir is None and cfg.run.run_id is None:
        raise LaunchError(
            "--resume needs the run to continue: set run.output_dir=runs/<id> (or run.run_id=<id>)"
        )
    out = Path(cfg.run.output_dir or Path("runs") / cfg.run.run_id)
    previous = out / CONFIG_NAME
    if not previous.exists():
        raise LaunchError(f"nothing to resume in {out}: no config.yaml there; start it without --resume")
    cfg = cfg.model_copy(deep=True)
    cfg.run.run_id = yaml.safe_load(previous.read_text())["run"]["run_id"]
    cfg.run.output_dir = out
    return resolve_run(cfg)


def prepare_run_dir(cfg: Config, resume: bool) -> Path:
    """Create the run directory (and logs/) and write the resolved config; returns the config's path.

    A directory that already holds a finished run is refused unless resuming: two runs' metrics and checkpoints
    must never mix. On resume the earlier incarnation's end markers go, so this run's report is its own."""
    out = Path(cfg.run.output_dir)
    leftovers = [n for n in FINISHED_MARKS if (out / n).exists()]
    if resume:
        for stale in ENDED_MARKS:
            (out / stale).unlink(missing_ok=True)
    elif leftovers:
        raise LaunchError(
            f"run.output_dir {out} already holds a run ({', '.join(leftovers)}); "
            "add --resume to continue it, or choose another run.output_dir"
        )
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs").chmod(0o700)  # what a library prints on an error may include more than it should
    return write_run_config(cfg, out / CONFIG_NAME)


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by this user only (0600 from creation on: never briefly world-readable)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.rename(path)


def _broker_password_to_file(cfg: Config, out: Path) -> Config:
    """A copy of `cfg` whose broker.url carries no password: it goes to secrets/broker.password instead."""
    url = getattr(cfg.broker, "url", None)
    parts = urlsplit(url) if url else None
    if parts is None or parts.password is None:
        return cfg
    secret = out.absolute() / SECRETS_DIR / "broker.password"
    write_private(secret, parts.password + "\n")
    user = f"{parts.username}@" if parts.username else ""
    cfg = cfg.model_copy(deep=True)
    cfg.broker.url = parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[-1]).geturl()
    cfg.broker.password_file = secret
    return cfg


def write_run_config(cfg: Config, path: Path) -> Path:
    """Write the resolved config every component reads to `path` (atomically) with no secret in it; returns it.

    The broker password moves to a 0600 file the config names; any other secret is refused with the fields named,
    because redacting it would leave the components that need it without it."""
    cfg = _broker_password_to_file(cfg, path.parent)
    leaks = secret_paths(cfg.model_dump(mode="json"))
    if leaks:
        raise ConfigError(
            f"{', '.join(leaks)}: a secret in the config would be written in the clear to {path}; pass it another "
            "way (a remote teacher's key: the environment variable named by scorer.remote.api_key_env)"
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_config(cfg))
    tmp.rename(path)
    return path
