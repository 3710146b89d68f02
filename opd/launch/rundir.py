"""A run's identity and home, decided once by whoever launches it: run id, run directory, free ports, resume.

Every process of a run reads one resolved config, so these decisions are made here, before anything starts, and
written to <run dir>/config.yaml. This module imports no torch (a test holds it to that): the cluster helper,
`opd scale` and the CLI resolve runs without paying for the model stack.
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import yaml

from broker import capabilities
from opd.config import Config, dump_config

CONFIG_NAME = "config.yaml"
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
    path = out / CONFIG_NAME
    path.write_text(dump_config(cfg))
    return path
