"""The run's report: teacher and student held-out accuracy before training, the saved student's after, summary.json.

This is the only module of the launcher process that loads models (and so imports torch and transformers): the
rest of the launcher only starts and watches processes, and stays light for the commands that share it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from opd import tasks
from opd.config import Config
from opd.launch.monitor import RunState
from opd.launch.rundir import LEGS_DIR, read_legs
from opd.launch.teacher_stats import per_teacher
from opd.models import builds, vlm
from opd.models.builds import Assets, evaluate_within, load_asset
from opd.models.loading import load_model
from opd.runtime.threads import pin_threads


def build_models(cfg: Config, rebuild: bool = False, ship: bool = False, log=print) -> Assets | None:
    """`opd prepare`: find (shipped or cached) or build the teachers and student a run of `cfg` would use, and say
    per model what was done and where it is, so a newcomer knows nothing is left to wait for. Every teacher's
    pool is prepared (`ensure_assets(cfg.for_teacher(name))`); the first one's assets are returned. `rebuild`:
    build them again from their recipes and compare with the shipped ones; `ship`: rebuild them and copy them into
    opd/demo_models/ and its manifest (maintainers)."""
    pin_threads(cfg.run.torch_threads)  # the build itself runs on BUILD_THREADS; loading and checks on these
    if ship:
        builds.ship(cfg, log=log)
        return None
    cache = Path(cfg.run.cache_dir)
    cached_before = {p.resolve() for p in cache.iterdir()} if cache.is_dir() else set()
    teachers = _teacher_views(cfg)
    first = None
    for i, (name, view) in enumerate(teachers.items()):
        assets = builds.ensure_assets(view, log=log, rebuild=rebuild)
        first = first or assets
        roles = [("teacher", assets.teacher)] + ([("student", assets.student)] if i == 0 else [])
        for role, asset in roles:
            what = f"teacher {name}" if role == "teacher" and len(teachers) > 1 else role
            if getattr(view, role).kind == "pretrained":
                log(f"{what}: pretrained {asset.path}, loaded as it is at run time (nothing to build)")
                continue
            acc = "" if asset.eval_accuracy is None else f", held-out accuracy {fmt(asset.eval_accuracy)}"
            log(f"{what}: {_how_found(asset.path, cached_before, rebuild)} at {asset.path}{acc}")
            if rebuild:
                verdict = builds.compare_with_shipped(asset)
                if verdict is not None:
                    log(f"  rebuilt from its recipe: {verdict} the shipped checkpoint (sha256 of every file)")
    return first


def _teacher_views(cfg: Config) -> dict[str, Config]:
    """The config as each teacher's pool sees it (its model in `teacher`, its scorer settings in `scorer`)."""
    return {name: cfg.for_teacher(name) for name in cfg.teacher_pools()}


def _how_found(path, cached_before: set, rebuild: bool) -> str:
    resolved = Path(path).resolve()
    if resolved.is_relative_to(builds.SHIPPED):
        return "shipped with the code"
    if rebuild or resolved not in cached_before:
        return "built now"
    return "already cached"


def accuracy_before(cfg: Config, log: Callable[..., None]) -> dict:
    """Each teacher's and the student's accuracy on the task's held-out set, from the build's record or measured
    here: {"teacher": the first teacher's, "student": ..., "teachers": {name: accuracy}}, and with a task
    mixture, per task too: "teachers_by_task" {name: {task: accuracy}}, "student_by_task" {task: accuracy} (an
    expert teacher is judged on its own task: over the whole mixture it scores about its task's share). Each
    teacher is found or built and measured as its own pool sees it (its model, its scorer.context, local or
    remote)."""
    pin_threads(cfg.run.torch_threads)  # chosen, not torch's all-cores default (opd.runtime.threads says why)
    problems = tasks.eval_set(cfg.task, cfg.images)
    teachers: dict[str, Accuracy] = {}
    student: Accuracy | None = None
    for name, view in _teacher_views(cfg).items():
        assets = builds.ensure_assets(view, log=log)
        what = "the teacher" if len(teachers) == 0 and len(cfg.teacher_pools()) == 1 else f"teacher {name}"
        teachers[name] = _model_accuracy(view, "teacher", assets.teacher, problems, log, what)
        if student is None:
            student = _model_accuracy(view, "student", assets.student, problems, log, "the student")
    student = student or Accuracy(None)
    first = next(iter(teachers.values()))
    if len(teachers) == 1:
        log(f"teacher held-out accuracy {first}; student before {student}")
    else:
        each = ", ".join(f"{name} {acc}" for name, acc in teachers.items())
        log(f"teachers' held-out accuracy: {each}; student before {student}")
    out = {
        "teacher": first.overall,
        "student": student.overall,
        "teachers": {n: a.overall for n, a in teachers.items()},
    }
    if any(a.by_task for a in (*teachers.values(), student)):
        out["teachers_by_task"] = {n: a.by_task for n, a in teachers.items() if a.by_task}
        out["student_by_task"] = student.by_task
    return out


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """One model's held-out accuracy, overall and per task of a mixture (empty for a single task)."""

    overall: float | None
    by_task: dict[str, float] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        tasks_part = ", ".join(f"{k} {fmt(v)}" for k, v in self.by_task.items())
        return fmt(self.overall) + (f" ({tasks_part})" if tasks_part else "")


def _model_accuracy(view: Config, role: str, asset, problems, log, what: str) -> Accuracy:
    """One model's held-out accuracy: the build's record, else measured (a teacher with scorer.context is always
    measured, with the context; a remote teacher is not measured: it may name nothing loadable here)."""
    context = view.scorer.context
    with_context = role == "teacher" and context is not None  # a recorded accuracy is without it
    recorded_by_task = asset.eval_accuracy_by_task is not None or not _is_mixture(problems)
    if asset.eval_accuracy is not None and not with_context and recorded_by_task:
        return Accuracy(asset.eval_accuracy, dict(asset.eval_accuracy_by_task or {}))
    if role == "teacher" and not view.scorer.teacher_is_local:
        return Accuracy(None)
    if not problems:
        return Accuracy(None)
    model, tok = load_asset(asset)
    seen = teacher_view(problems, context) if with_context and tok.chat_template else problems
    what += " with scorer.context" if seen is not problems else ""
    mode = tasks.verifier_mode(view.task)
    result = evaluate_within(model, tok, seen, view.sampling.max_new_tokens, mode, log=log, what=what)
    return Accuracy(result.accuracy, dict(result.by_task))


def _is_mixture(problems: list[tasks.Problem]) -> bool:
    return any("task" in p.metadata for p in problems)


def teacher_view(problems: list[tasks.Problem], context) -> list[tasks.Problem]:
    """The held-out problems as the scorer shows them to the teacher under `scorer.context`: its system turn in
    place of the student's, its few-shot turns before the student's own, so the teacher's accuracy in the report
    is the one the student is distilled toward (without it a context run reported its teacher at 0.000)."""
    shots = tuple(t for s in context.few_shot for t in (("user", s.user), ("assistant", s.assistant)))
    seen = []
    for p in problems:
        own = p.messages or (("user", p.prompt),)
        system = own[:1] if own[0][0] == "system" and not context.system_prompt else ()
        rest = own[1:] if own[0][0] == "system" else own
        seen.append(
            dataclasses.replace(
                p, messages=(*system, *shots, *rest), system_prompt=context.system_prompt or p.system_prompt
            )
        )
    return seen


def final_accuracy(cfg: Config, out_dir: Path, log: Callable[..., None] = print) -> Accuracy:
    """Evaluate the saved checkpoint as a user would load it: `from_pretrained` on the run directory (progress
    through `log`: a bar on the launcher's terminal, else one line); per task too for a mixture."""
    final = out_dir / "student"
    problems = tasks.eval_set(cfg.task, cfg.images)
    if not final.is_dir() or not problems:
        return Accuracy(None)
    if vlm.is_vlm_dir(final):  # a vision-language student: with its processor (kept on the model)
        model, processor = vlm.load_vlm(final)
        tok = processor.tokenizer
    else:
        model, tok = load_model(final, final)  # with the real vocabulary: padding rows are never generated
    mode = tasks.verifier_mode(cfg.task)
    result = evaluate_within(
        model, tok, problems, cfg.sampling.max_new_tokens, mode, log=log, what="the final student"
    )
    return Accuracy(result.accuracy, dict(result.by_task))


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
    after = final_accuracy(cfg, out_dir)
    teachers = list(cfg.teacher_pools())
    latest = state.latest
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
        # with several teachers, each one's (the first is `teacher_accuracy`)
        **({"teacher_accuracies": before["teachers"]} if len(before.get("teachers") or ()) > 1 else {}),
        "student_accuracy_before": before["student"],
        "student_accuracy_after": after.overall,
        # a task mixture's accuracies per task: {task: accuracy}, the teachers' {teacher: {task: accuracy}}
        **_by_task(before, after),
        # several teachers, or a teacher of another tokenizer: each pool's scoring totals, alignment figures and
        # share of what was trained (opd/launch/teacher_stats)
        **(
            {"teachers": per_teacher(teachers, latest, latest.get("learner"))}
            if len(teachers) > 1
            or any(p.scorer.tokenizer == "different" for p in cfg.teacher_pools().values())
            else {}
        ),
        **_image_figures(state, time.time() - started),
        **_stream_figures(state),
        "wall_seconds": time.time() - started,
        "interrupted": interrupted,
    }
    summary = across_legs(summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _image_figures(state: RunState, wall_s: float) -> dict:
    """Prompts with images: images generated per second and the encoded bytes per trajectory (images inline),
    what they cost the broker; nothing for a text-only run."""
    images = state.totals("images_generated", "actor")
    if not images:
        return {}
    trajectories = state.totals("trajectories_generated", "actor")
    return {
        "images_generated": int(images),
        "images_per_second": images / wall_s if wall_s > 0 else None,
        "bytes_per_trajectory": state.totals("rollout_bytes", "actor") / trajectories
        if trajectories
        else None,
    }


def _stream_figures(state: RunState) -> dict:
    """Streaming actors (actors/streaming.py): the share of decode steps where a slot was busy, the mean wait
    from a trajectory's last token to its publication (a group waits for its last member), and tokens per weight
    version per trajectory (a trajectory's response tokens over the distinct versions that sampled them); nothing
    for batch generation."""
    slot_steps = state.totals("slot_steps", "actor")
    if not slot_steps:
        return {}
    published = state.totals("trajectories_generated", "actor")
    versions = state.totals("trajectory_versions", "actor")
    return {
        "stream": {
            "slot_occupancy": state.totals("slot_busy_steps", "actor") / slot_steps,
            "decode_steps": int(state.totals("decode_steps", "actor")),
            "publish_delay_mean_s": state.totals("publish_delay_seconds", "actor") / published
            if published
            else None,
            "versions_per_trajectory": versions / published if published else None,
            "tokens_per_version": state.totals("tokens_generated", "actor") / versions if versions else None,
            "sequences_dropped_at_stop": int(state.totals("sequences_dropped_at_stop", "actor")),
            "tokens_restarted": int(state.totals("tokens_restarted", "actor")),
        }
    }


def _by_task(before: dict, after: Accuracy) -> dict:
    """summary.json's per-task fields of a task mixture (none for a single task)."""
    out = {}
    if before.get("teachers_by_task"):
        out["teacher_accuracies_by_task"] = before["teachers_by_task"]
    if before.get("student_by_task"):
        out["student_accuracy_before_by_task"] = before["student_by_task"]
    if after.by_task:
        out["student_accuracy_after_by_task"] = after.by_task
    return out


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
        f"(teacher {fmt(s['teacher_accuracy'])}){_tasks_part(s)}; summary in {out_dir / 'summary.json'}"
    )


def _tasks_part(s: dict) -> str:
    """`; per task: addition 0.070 -> 0.340 (best teacher 0.970), ...` for a task mixture, else ""."""
    before, after = (
        s.get("student_accuracy_before_by_task") or {},
        s.get("student_accuracy_after_by_task") or {},
    )
    teachers = s.get("teacher_accuracies_by_task") or {}
    parts = []
    for task in dict.fromkeys([*before, *after]):
        best = [a[task] for a in teachers.values() if isinstance(a.get(task), int | float)]
        ref = f" (best teacher {fmt(max(best))})" if best else ""
        parts.append(f"{task} {fmt(before.get(task))} -> {fmt(after.get(task))}{ref}")
    return "; per task: " + ", ".join(parts) if parts else ""


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
