"""The `opd` command: `opd run` launches a whole run; the other verbs start one component each."""

from __future__ import annotations

import argparse
import sys

from opd.config import Config, ConfigError, describe_fields, load_config
from opd.launch.cluster import component_index

OVERRIDE_HELP = "dotted overrides such as learner.max_steps=20 run.output_dir=/tmp/x (values parsed as YAML)"


def _config_epilog() -> str:
    return "config keys (set in the YAML file or as overrides):\n" + "\n".join(describe_fields(Config))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd", description="opd-stream: asynchronous on-policy distillation.")
    sub = p.add_subparsers(dest="verb", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser(
        "run",
        help="run everything on this machine (learner, actors, scorers; the zmq broker or a Redis URL)",
        formatter_class=fmt,
        description="Start a full run on this machine: one process per component, the embedded ZeroMQ broker "
        "(or Redis with broker.type: redis; --resume continues a run from its last checkpoint), "
        "weights broadcast over torch.distributed. Writes runs/<run_id>/ (config, metrics.jsonl, student/, summary.json).",
        epilog=_config_epilog(),
    )
    run.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.output_dir from its last checkpoint and replay log",
    )
    run.add_argument(
        "--launcher",
        choices=["local", "ray"],
        default="local",
        help="local: child processes of this command (default); ray: Ray actors, resources from ray: (pip install -e .[ray])",
    )
    run.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)

    scale = sub.add_parser(
        "scale",
        help="add or remove teacher scorers of a running run (opd run, local or ray)",
        description="Ask the launcher of a running run for N teacher scorers: it starts new ones or stops the "
        "newest with SIGTERM (each finishes its batch in hand). Decisions go to runs/<id>/scaling.jsonl.",
    )
    scale.add_argument("--config", required=True, help="the run's resolved config (runs/<id>/config.yaml)")
    scale.add_argument("targets", nargs="+", help="scorers=N, then optional dotted config overrides")

    prep = sub.add_parser(
        "prepare", help="build and cache the tokenizer, teacher and student of a config", formatter_class=fmt
    )
    prep.add_argument("config")
    prep.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)

    dl = sub.add_parser(
        "dead-letter",
        help="list or replay the messages a run rejected (Redis broker)",
        description="Inspect a run's dead_letter stream, or re-inject its messages once the cause is fixed.",
    )
    dl.add_argument("action", choices=["ls", "replay"])
    dl.add_argument("--config", required=True, help="the run's resolved config (runs/<id>/config.yaml)")
    dl.add_argument("--entry", action="append", help="replay only this dead-letter entry id (repeatable)")
    dl.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)

    top = sub.add_parser(
        "top",
        help="live terminal view of a run's throughput, queues and learner (from the broker's metrics stream)",
        description="Per component trajectories/s and tokens/s, queue depths, learner step, lag, KL, accuracy and "
        "wait fraction, refreshed every second; works with the zmq and Redis brokers, and on a finished run.",
    )
    top.add_argument("--config", required=True, help="the run's resolved config (runs/<id>/config.yaml)")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)

    for verb, text in (
        ("broker", "serve the embedded ZeroMQ broker"),
        ("learner", "run the learner (weight-sync rank 0)"),
        ("actor", "run one student actor"),
        ("scorer", "run one teacher scorer"),
    ):
        sp = sub.add_parser(verb, help=text, description=text + " (usually started by `opd run`).")
        sp.add_argument("--config", required=True, help="a resolved config (ports and run_id set)")
        if verb in ("actor", "scorer"):
            sp.add_argument(
                "--index",
                type=component_index,
                default=0,
                help="which actor/scorer this is (0-based), or auto: a stable number from the host name "
                "(for replicas a scheduler cannot number, e.g. docker compose --scale)",
            )
        if verb == "learner":
            sp.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
        sp.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    return p


def _component_config(args) -> Config:
    cfg = load_config(args.config, args.overrides)
    if cfg.broker.type == "redis" and args.verb == "broker":
        raise ConfigError(
            "broker.type: redis has no broker process to start; run redis-server and set broker.url"
        )
    needed = [("run.run_id", cfg.run.run_id)]
    if cfg.broker.type == "zmq":
        needed.append(("broker.port", cfg.broker.port or None))
    if args.verb in ("learner", "actor"):  # they meet in the weight-sync group
        needed.append(("weight_sync.port", cfg.weight_sync.port or None))
    missing = [k for k, v in needed if v is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set when starting a component by hand (opd run sets them)"
        )
    return cfg


def _dead_letter(args) -> int:
    from opd.launch.deadletter import DeadLetterError, list_dead_letters, replay_dead_letters

    cfg = load_config(args.config, args.overrides)
    if cfg.run.run_id is None:
        raise ConfigError("run.run_id must be set: pass the run's own runs/<id>/config.yaml")
    try:
        if args.action == "ls":
            list_dead_letters(cfg)
        else:
            replay_dead_letters(cfg, args.entry)
    except DeadLetterError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2
    return 0


def _scale(args) -> int:
    from opd.launch.scaling import ScaleError, parse_targets, publish_scale

    try:
        target, overrides = parse_targets(args.targets)
        cfg = load_config(args.config, overrides)
        entry = publish_scale(cfg, target)
    except ScaleError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2
    print(
        f"asked run {cfg.run.run_id} for {target} scorers (control entry {entry}); see scaling.jsonl in its run directory"
    )
    return 0


def _run(args) -> int:
    from opd.launch.launcher import LaunchError, LocalLauncher, resolve_resume, resolve_run

    try:
        cfg = load_config(args.config, args.overrides)
        cfg = resolve_resume(cfg) if args.resume else resolve_run(cfg)
        if args.launcher == "ray":
            from opd.launch.ray_launcher import run_on_ray

            return run_on_ray(cfg, resume=args.resume)
        return LocalLauncher(cfg, resume=args.resume).run()
    except LaunchError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 1


def _top(args) -> int:
    from opd.launch.top import run_top

    cfg = load_config(args.config, args.overrides)
    if cfg.run.run_id is None:
        raise ConfigError("run.run_id must be set: pass the run's own runs/<id>/config.yaml")
    return run_top(cfg, once=args.once, interval_s=args.interval)


def _take_launcher(argv: list[str]) -> str | None:
    """Take `--launcher X` (or `--launcher=X`) out of `opd run`'s arguments wherever it stands, as for --resume."""
    for i, item in enumerate(argv[1:], start=1):
        if item.startswith("--launcher="):
            del argv[i]
            return _check_launcher(item.split("=", 1)[1])
        if item == "--launcher" and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i : i + 2]
            return _check_launcher(value)
    return None


def _check_launcher(value: str) -> str:
    if value not in ("local", "ray"):
        print(f"opd run: --launcher {value!r}: choose local or ray", file=sys.stderr)
        raise SystemExit(2)
    return value


def _parse(argv: list[str]) -> argparse.Namespace:
    # `--resume` and `--launcher` may come anywhere, also after the dotted overrides (argparse stops at the
    # first positional)
    resume = bool(argv) and argv[0] in ("run", "learner") and "--resume" in argv[1:]
    if resume:
        argv.remove("--resume")
    launcher = _take_launcher(argv) if argv and argv[0] == "run" else None
    args = _parser().parse_args(argv)
    if resume:
        args.resume = True
    if launcher is not None:
        args.launcher = launcher
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.verb == "run":
            return _run(args)
        if args.verb == "prepare":
            from opd.models.builds import ensure_assets

            ensure_assets(load_config(args.config, args.overrides))
            return 0
        if args.verb in ("dead-letter", "top"):  # tools that read a run rather than join it
            return {"dead-letter": _dead_letter, "top": _top}[args.verb](args)
        if args.verb == "scale":
            return _scale(args)
        cfg = _component_config(args)
    except ConfigError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2
    if args.verb == "broker":
        import os

        from broker.zmq import serve
        from opd.runtime.lifecycle import die_with_parent

        if os.environ.get("OPD_PARENT_PID"):
            die_with_parent(int(os.environ["OPD_PARENT_PID"]))
        b = cfg.broker
        serve(f"tcp://{b.host}:{b.port}", b.max_depth, b.control_maxlen, int(b.max_message_mb * (1 << 20)))
        return 0
    if args.verb == "learner":
        from learner.learner import main as learner_main

        return learner_main(cfg, resume=args.resume)
    if args.verb == "actor":
        from actors.actor import main as actor_main

        return actor_main(cfg, args.index)
    from teacher_scorers.scorer import main as scorer_main

    return scorer_main(cfg, args.index)


if __name__ == "__main__":
    sys.exit(main())
