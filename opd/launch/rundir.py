"""A run's identity and home, decided once by whoever launches it: run id, run directory, free ports, resume.

A run may have several legs: the first `opd run`, then each `--resume`. A resume continues from the run's own
config.yaml (not from the YAML named on the command line, which may have changed since or be another file), with
the overrides of the resume applied on top. Each leg's config is kept as legs/<n>.config.yaml and listed in
legs.json with its overrides as typed and the fields it changed; config.yaml is always the config of the leg running
now (what the components and the tools read).

A run that fails before its first learner step leaves its config and logs (to read why) but nothing trained, and a
`failed.json` marking it reusable: the next `opd run` into that directory clears it and starts afresh. Deleting it
outright would take away the logs a newcomer needs to fix the cause.

Every process of a run reads one resolved config, so these decisions are made here, before anything starts, and
written to <run dir>/config.yaml. This module imports no torch (a test holds it to that): the cluster helper,
`opd scale` and the CLI resolve runs without paying for the model stack.

config.yaml holds no secret: it is read by every component and copied around with the run directory. A password in
broker.url moves to <run dir>/secrets/broker.password (0600, in a 0700 folder) and config.yaml names that file in
broker.password_file; any other secret in the config is refused (it would have to be written in the clear).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from broker import capabilities
from opd.config import Config, ConfigError, dump_config
from opd.config.loading import apply_overrides
from opd.config.redact import redact_text, secret_paths
from opd.launch.checks import load_run_config

CONFIG_NAME = "config.yaml"
SECRETS_DIR = "secrets"  # 0700; files that must hold a secret, each 0600
FINISHED_MARKS = ("metrics.jsonl", "summary.json", "student")  # what a run that has trained leaves behind
ENDED_MARKS = ("learner_summary.json", "summary.json")  # an earlier incarnation's end, stale once resumed
# [{leg, started, config, overrides, changed}] one per `opd run` / `--resume` of the run
LEGS_NAME = "legs.json"
LEGS_DIR = "legs"  # <n>.config.yaml and <n>.summary.json of each leg
# the run failed before its first step: nothing trained, the directory is reusable
FAILED_NAME = "failed.json"
KEPT_ON_FAILURE = (CONFIG_NAME, "logs", SECRETS_DIR, LEGS_NAME, LEGS_DIR, "metrics_ports.json")


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
    if cfg.learner.num_ranks > 1 and cfg.learner.master_port == 0:  # the learner ranks' rendezvous
        cfg.learner.master_port = free_port()
    return cfg


def _port(host: str, port: int) -> int:
    """`port` if it can be bound on `host` now, else a free one: an earlier leg's port is kept where it is free
    (a component started by hand may know it) and replaced only where something else took it meanwhile."""
    try:
        with socket.socket() as s:
            s.bind((host, port))
    except OSError as exc:
        # in use: pick another; not an address of this host (the learner elsewhere): the user's to keep
        return free_port() if exc.errno == errno.EADDRINUSE else port
    return port


def resolve_resume(config: str | Path | None, overrides: list[str], load=load_run_config) -> Config:
    """`opd run CONFIG --resume [overrides]`: continue the run in run.output_dir (or runs/<run.run_id>) from the
    run's own config.yaml, with `overrides` applied on top, under its own run id (so its streams, checkpoints and
    replay log are the ones picked up). CONFIG only says where the run is when no override does. `load` reads
    the run's config (the CLI passes its start checks: task files, model sources)."""
    where = apply_overrides({}, overrides).get("run", {})
    if not where.get("output_dir") and not where.get("run_id"):  # then the named YAML says where
        named = load_run_config(config, overrides).run
        where = {"output_dir": named.output_dir, "run_id": named.run_id}
    if not where.get("output_dir") and not where.get("run_id"):
        raise LaunchError(
            "--resume needs the run to continue: set run.output_dir=runs/<id> (or run.run_id=<id>)"
        )
    out = Path(where.get("output_dir") or Path("runs") / str(where["run_id"]))
    previous = out / CONFIG_NAME
    if (out / FAILED_NAME).exists():
        raise LaunchError(
            f"nothing to resume in {out}: the run failed before its first step ({out / FAILED_NAME}); "
            "start it again without --resume"
        )
    if not previous.exists():
        raise LaunchError(f"nothing to resume in {out}: no config.yaml there; start it without --resume")
    cfg = load(previous, overrides)
    cfg.run.run_id = yaml.safe_load(previous.read_text())["run"]["run_id"]
    cfg.run.output_dir = out
    if capabilities(cfg.broker).embedded_process and cfg.broker.port:
        cfg.broker.port = _port(cfg.broker.host, cfg.broker.port)
    if cfg.weight_sync.port:
        cfg.weight_sync.port = _port(cfg.weight_sync.host, cfg.weight_sync.port)
    if cfg.learner.num_ranks > 1 and cfg.learner.master_port:
        cfg.learner.master_port = _port(cfg.learner.master_addr or "127.0.0.1", cfg.learner.master_port)
    return resolve_run(cfg)


def prepare_run_dir(cfg: Config, resume: bool, overrides: list[str] | None = None) -> Path:
    """Create the run directory (and logs/) and write the resolved config; returns the config's path.

    A directory that already holds a finished run is refused unless resuming: two runs' metrics and checkpoints
    must never mix; one marked failed before its first step is cleared and reused. On resume the earlier
    incarnation's end markers go, so this run's report is its own (its summary stays in legs/<n>.summary.json),
    and the leg is recorded in legs.json with its overrides and the fields it changed."""
    out = Path(cfg.run.output_dir)
    if not resume and (out / FAILED_NAME).exists():
        shutil.rmtree(out)  # failed before its first step: nothing trained to lose, only its logs
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
    return _write_leg(cfg, out, resume, overrides or [])


def _write_leg(cfg: Config, out: Path, resume: bool, overrides: list[str]) -> Path:
    """Write config.yaml for this leg, keep a copy in legs/<n>.config.yaml and record the leg in legs.json (a
    first leg starts a fresh record; a resume appends, after keeping a legacy run's config as leg 1)."""
    if not resume:  # a first leg: whatever an unfinished earlier start recorded is not this run's
        (out / LEGS_NAME).unlink(missing_ok=True)
        shutil.rmtree(out / LEGS_DIR, ignore_errors=True)
    (out / LEGS_DIR).mkdir(exist_ok=True)
    previous = out / CONFIG_NAME
    was = yaml.safe_load(previous.read_text()) if resume and previous.exists() else None
    legs = read_legs(out)
    if was is not None and not legs:  # a run from before legs were recorded: its config becomes leg 1
        shutil.copyfile(previous, out / LEGS_DIR / "1.config.yaml")
        legs = [
            {
                "leg": 1,
                "started": None,
                "config": f"{LEGS_DIR}/1.config.yaml",
                "overrides": None,
                "changed": {},
            }
        ]
    path = write_run_config(cfg, previous)
    _record_leg(out, legs, was, yaml.safe_load(path.read_text()), overrides)
    shutil.copyfile(path, out / legs[-1]["config"])
    return path


def read_legs(out: Path) -> list[dict]:
    """The run's legs in order (empty for a run directory made before legs were recorded)."""
    path = Path(out) / LEGS_NAME
    return json.loads(path.read_text()) if path.exists() else []


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _record_leg(out: Path, legs: list[dict], was: dict | None, now: dict, overrides: list[str]) -> None:
    """Append this leg to `legs` and legs.json: its overrides as typed and, on a resume, the fields it changes
    from the config running so far ({field: [was, now]}), so a resume with overrides is on record and the earlier
    config is never lost. Both configs are as written (no secret in them); the overrides are redacted."""
    changed: dict[str, list] = {}
    if was is not None:
        before, after = _flat(was), _flat(now)
        changed = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
    n = len(legs) + 1
    legs.append(
        {
            "leg": n,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": f"{LEGS_DIR}/{n}.config.yaml",
            "overrides": [redact_text(o) for o in overrides],
            "changed": changed,
        }
    )
    tmp = out / f".{LEGS_NAME}.tmp"
    tmp.write_text(json.dumps(legs, indent=2))
    tmp.rename(out / LEGS_NAME)


def has_trained(out: Path) -> bool:
    """Whether the learner finished a step in `out`: a metrics line, a replayable step or a checkpoint past 0."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return True
    if any((out / "replay").glob("step-*")):
        return True
    return any(p.name != "step-000000" for p in (out / "checkpoints").glob("step-*"))


def mark_failed(out: Path, reason: str) -> None:
    """The run failed before its first learner step: keep its config and logs, remove what it saved (a student
    and checkpoints of 0 steps), and write failed.json so the next `opd run` into this directory reuses it."""
    out = Path(out)
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name in KEPT_ON_FAILURE:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (out / FAILED_NAME).write_text(json.dumps({"reason": reason, "steps": 0}, indent=2))


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
