"""The run's report: teacher and student held-out accuracy before training, the saved student's after, summary.json.

This is the only module of the launcher process that loads models (and so imports torch and transformers): the
rest of the launcher only starts and watches processes, and stays light for the commands that share it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opd import tasks
from opd.config import Config
from opd.launch.monitor import RunState
from opd.launch.rundir import LEGS_DIR, read_legs
from opd.models.builds import ensure_assets, evaluate, load_asset
from opd.models.loading import load_causal_lm, load_tokenizer


def build_models(cfg: Config) -> None:
    """`opd prepare`: build (or find cached) the tokenizer, teacher and student a run of `cfg` would use."""
    ensure_assets(cfg)


def accuracy_before(cfg: Config, log: Callable[..., None]) -> dict[str, float | None]:
    """Teacher and student accuracy on the task's held-out set, from the build's record or measured here."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    assets = ensure_assets(cfg, log=log)
    problems = tasks.eval_set(cfg.task)
    mode, max_new = tasks.verifier_mode(cfg.task), cfg.sampling.max_new_tokens
    acc: dict[str, float | None] = {}
    for role, asset in (("teacher", assets.teacher), ("student", assets.student)):
        if asset.eval_accuracy is not None:
            acc[role] = asset.eval_accuracy
        elif role == "teacher" and not cfg.scorer.teacher_is_local:
            acc[role] = None  # the teacher lives on its server; `teacher:` may name nothing loadable here
        elif problems:
            model, tok = load_asset(asset)
            acc[role] = evaluate(model, tok, problems, max_new, mode)
        else:
            acc[role] = None
    log(f"teacher held-out accuracy {fmt(acc['teacher'])}; student before {fmt(acc['student'])}")
    return acc


def final_accuracy(cfg: Config, out_dir: Path) -> float | None:
    """Evaluate the saved checkpoint as a user would load it: `from_pretrained` on the run directory."""
    final = out_dir / "student"
    problems = tasks.eval_set(cfg.task)
    if not final.is_dir() or not problems:
        return None
    model, tok = load_causal_lm(final), load_tokenizer(final)
    return evaluate(model, tok, problems, cfg.sampling.max_new_tokens, tasks.verifier_mode(cfg.task))


def write_summary(
    cfg: Config,
    out_dir: Path,
    state: RunState,
    before: dict,
    started: float,
    interrupted: bool,
    supervision: dict | None = None,
) -> dict:
    """The learner's own summary joined with what the launcher saw; written to summary.json and returned.

    Counts are sums over every incarnation of every component (a restarted process starts its counters at 0);
    what a process did after its last metrics record before it was killed is not in them (at most
    actor/scorer.metrics_every_s of work per kill; the actors' ledgers hold every id)."""
    learner = json.loads((out_dir / "learner_summary.json").read_text())
    summary = {
        "run_id": cfg.run.run_id,
        **learner,
        "trajectories_generated": int(state.totals("trajectories_generated", "actor")),
        "trajectories_scored": int(state.totals("trajectories_scored", "scorer")),
        "dead_lettered": state.dead_letters,
        "actor_weight_versions": {
            n: r.get("weight_version") for n, r in state.latest.items() if n.startswith("actor")
        },
        # each component's counters summed over its incarnations (tokens, *_seconds, service_pad_seconds):
        # per-stage costs, e.g. for calibrating pipeline.service_time (benchmarks/pipeline.py)
        "components": {n: r for n, r in sorted(state.latest.items()) if n != "learner"},
        **(supervision or {}),
        "teacher_accuracy": before["teacher"],
        "student_accuracy_before": before["student"],
        "student_accuracy_after": final_accuracy(cfg, out_dir),
        "wall_seconds": time.time() - started,
        "interrupted": interrupted,
    }
    summary = across_legs(summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


SUMMED_OVER_LEGS = ("trajectories_generated", "trajectories_scored", "dead_lettered", "wall_seconds")


def across_legs(leg: dict, out_dir: Path) -> dict:
    """The whole run's summary from this leg's: the leg's own is kept as legs/<n>.summary.json, and the launcher's
    per-leg counts (trajectories generated and scored, dead letters, wall time) are summed over every leg with a
    summary; each leg is listed under `legs`. The learner's fields are already the run's (its checkpoint carries
    steps, trained ids and histories across legs). A leg that ended without a summary (it failed) is listed with
    `summary: false`, and its work, which nobody counted, is not in the sums."""
    legs = read_legs(out_dir)
    if not legs:  # a run directory made before legs were recorded
        return leg
    n = legs[-1]["leg"]
    (out_dir / LEGS_DIR / f"{n}.summary.json").write_text(json.dumps(leg, indent=2))
    whole, listed = dict(leg), []
    for entry in legs:
        path = out_dir / LEGS_DIR / f"{entry['leg']}.summary.json"
        own = json.loads(path.read_text()) if path.exists() else None
        if own is not None and entry["leg"] != n:
            for key in SUMMED_OVER_LEGS:
                whole[key] = (whole.get(key) or 0) + (own.get(key) or 0)
        listed.append(
            {
                **entry,
                "summary": own is not None,
                **{k: (own or {}).get(k) for k in (*SUMMED_OVER_LEGS, "learner_steps", "interrupted")},
            }
        )
    whole["legs"] = listed
    return whole


def done_line(summary: dict, out_dir: Path) -> str:
    s = summary
    return (
        f"[bold]done[/] in {s['wall_seconds']:.0f}s: {s['learner_steps']} steps, weight version "
        f"{s['weight_version']}, reverse KL {fmt(s['reverse_kl_first'])} -> {fmt(s['reverse_kl_last'])}, "
        f"student accuracy {fmt(s['student_accuracy_before'])} -> {fmt(s['student_accuracy_after'])} "
        f"(teacher {fmt(s['teacher_accuracy'])}); summary in {out_dir / 'summary.json'}"
    )


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
