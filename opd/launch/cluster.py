"""Launching one run's components from a scheduler (docker-compose, Slurm) instead of `opd run`.

`opd run` decides a run's id, directory and ports once and hands every process the same resolved config. Under
a scheduler nobody runs `opd run`, so two of its decisions move here: the run config is resolved once on the
submitting host (`python3 -m opd.launch.cluster resolve`), and replicas that the scheduler cannot number (compose's
`--scale`) derive a component index from their host name (`--index auto`).
"""

from __future__ import annotations

import argparse
import socket
import sys
import zlib
from pathlib import Path

from broker import capabilities
from opd.config import Config, ConfigError
from opd.launch.checks import load_run_config
from opd.launch.rundir import resolve_run, write_run_config
from opd.runtime import run_secret

AUTO = "auto"


def auto_index(hostname: str | None = None) -> int:
    """A stable index from the host name: compose gives each replica its own (the container id), and a container
    restarted in place keeps it, so a restarted scorer reclaims its own pending Redis entries first. CRC-32 over
    31 bits: a collision among a handful of replicas has odds of about n^2 / 2^32."""
    name = hostname if hostname is not None else socket.gethostname()
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def component_index(value: str) -> int:
    """argparse type of `--index`: a non-negative integer, or `auto` (derived from the host name)."""
    if value == AUTO:
        return auto_index()
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--index must be a non-negative integer or 'auto', not {value!r}"
        ) from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"--index must be >= 0, not {index}")
    return index


def resolve_for_cluster(cfg: Config) -> Path:
    """Fix run id, directory and ports once, write <run dir>/config.yaml, and return its path.

    Paths become absolute because jobs may start in another directory; an existing config.yaml is refused so
    that a second submission cannot silently mix two runs' streams and ledgers."""
    if not capabilities(cfg.broker).multi_host:
        raise ConfigError(
            f"broker.type: {cfg.broker.type} cannot join components on separate jobs; set broker.type=redis "
            "(the scripts do) or use `opd run` on one machine"
        )
    cfg = resolve_run(cfg)
    cfg.run.output_dir = Path(cfg.run.output_dir).absolute()
    cfg.run.cache_dir = Path(cfg.run.cache_dir).absolute()
    path = cfg.run.output_dir / "config.yaml"
    if path.exists():
        raise ConfigError(
            f"run.output_dir: {path} already exists; choose a new run.run_id/run.output_dir, or add components "
            "to that run with its config.yaml"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    written = write_run_config(
        cfg, path
    )  # a password in broker.url goes to a 0600 file, not into config.yaml
    run_secret.ensure_file(
        run_secret.default_path(cfg.run.output_dir)
    )  # 0600, found by every job's component
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m opd.launch.cluster",
        description="Resolve a run config once for components started by a scheduler (deploy/slurm/).",
    )
    sub = p.add_subparsers(dest="action", required=True)
    res = sub.add_parser("resolve", help="write <run dir>/config.yaml and print its path")
    res.add_argument("config")
    res.add_argument("overrides", nargs="*", help="dotted overrides, as for `opd run`")
    args = p.parse_args(argv)
    try:
        path = resolve_for_cluster(load_run_config(args.config, args.overrides))
    except ConfigError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
