"""The run's plots and report page: runs/<id>/plots/*.png and runs/<id>/report.html, from the run directory alone.

Everything is read from files the run leaves behind (metrics.jsonl: the learner's per-step records; summary.json;
config.yaml; scaling.jsonl: the launcher's per-interval scorer records and rollouts depth), so `opd report` rebuilds
the page for any run, finished, interrupted or failed, on any machine, with no broker or model. A file that is
missing or unreadable is named on the page instead of failing the report: an interrupted run is exactly the one
whose page a person wants. The page is one self-contained file (images as base64 data URIs, inline CSS, no
script), so it can be mailed or attached to an issue; the config on it is redacted like every file a run writes.

A task mixture adds one accuracy plot per task (the learner's `eval_accuracy/<task>`, with the accuracy on that
task of each teacher its prompts are routed to as a dashed line) and a per-task table; several teachers add a
table per teacher (summary.json `teachers`: scoring totals, failures, share of what was trained) and their own
queue and throughput lines.

matplotlib is imported only here, with the Agg backend (no display needed), and only when a report is built.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from broker.base import WORK_STREAMS
from opd.config.redact import redact

PLOTS_DIR = "plots"
PAGE = "report.html"


@dataclass
class RunFiles:
    """What a run directory holds, and what it lacks (said on the page)."""

    out: Path
    records: list[dict] = field(default_factory=list)  # metrics.jsonl, one learner step each
    summary: dict | None = None
    config: dict | None = None
    scaling: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _read_jsonl(path: Path, files: RunFiles) -> list[dict]:
    """Records of a JSONL file; a torn last line (a run killed mid-write) and other bad lines are skipped."""
    if not path.exists():
        files.missing.append(f"{path.name}: not found")
        return []
    out, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
    if bad:
        files.missing.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return out


def _read_structured(path: Path, files: RunFiles, loader: Callable[[str], Any]) -> dict | None:
    if not path.exists():
        files.missing.append(f"{path.name}: not found (a run that did not finish writes none)")
        return None
    try:
        value = loader(path.read_text())
    except Exception as exc:  # a half-written file: the page says so rather than failing
        files.missing.append(f"{path.name}: unreadable ({type(exc).__name__})")
        return None
    return value if isinstance(value, dict) else None


def read_run(out: Path) -> RunFiles:
    files = RunFiles(Path(out))
    files.records = [r for r in _read_jsonl(files.out / "metrics.jsonl", files) if "step" in r]
    files.summary = _read_structured(files.out / "summary.json", files, json.loads)
    files.config = _read_structured(files.out / "config.yaml", files, yaml.safe_load)
    scaling = files.out / "scaling.jsonl"
    files.scaling = _read_jsonl(scaling, files) if scaling.exists() else []
    return files


# ------------------------------------------------------------------------------------------------ plots
@dataclass
class Plot:
    name: str  # file stem under plots/
    title: str
    draw: Callable[
        [Any, RunFiles], str | None
    ]  # draws on an Axes; returns a note, or None when it has no data


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw_kl(ax, f: RunFiles) -> str | None:
    steps, kl = _series(f.records, "reverse_kl")
    if not steps:
        return None
    ax.plot(steps, kl, marker=".", label="per step")
    ax.set(xlabel="learner step", ylabel="reverse KL (token mean)")
    return "reverse KL of the student from the teacher on each trained batch"


def _evaluations(records: list[dict]) -> list[dict]:
    """The held-out evaluations in metrics.jsonl, in the order of the steps they evaluated: `eval_step` (the step
    whose weights were evaluated; a background evaluation reports in a later step's record), else the record's
    step (records written before evaluations named their step)."""
    found = [
        {**r, "eval_step": r.get("eval_step", r["step"])}
        for r in records
        if isinstance(r.get("eval_accuracy"), int | float)
    ]
    return sorted(found, key=lambda r: r["eval_step"])


def _partial(r: dict) -> bool:
    """An evaluation its time budget cut short (it covers fewer problems than the held-out set)."""
    return isinstance(r.get("eval_problems"), int) and r["eval_problems"] < r.get("eval_problems_total", 0)


def _draw_accuracy(ax, f: RunFiles) -> str | None:
    evals = _evaluations(f.records)
    steps, acc = [r["eval_step"] for r in evals], [float(r["eval_accuracy"]) for r in evals]
    s = f.summary or {}
    if s.get("student_accuracy_before") is not None:
        steps, acc = [0, *steps], [s["student_accuracy_before"], *acc]
    if not steps and s.get("student_accuracy_after") is None:
        return None
    ax.plot(steps, acc, marker="o", label="student")
    cut = [r for r in evals if _partial(r)]
    if cut:
        ax.plot([r["eval_step"] for r in cut], [r["eval_accuracy"] for r in cut], "o", mfc="white", color="C0",
                label="budget-cut (part of the set)")  # fmt: skip
    after = s.get("student_accuracy_after")
    if after is not None:
        ax.plot([s.get("learner_steps") or (steps[-1] if steps else 0)], [after], "s", color="C1",
                label="saved student (after)")  # fmt: skip
    several = s.get("teacher_accuracies") if isinstance(s.get("teacher_accuracies"), dict) else {}
    for i, (name, acc) in enumerate(several.items()):  # several teachers: each one's over the whole set
        if isinstance(acc, int | float):
            ax.axhline(acc, color=f"C{i + 2}", linestyle="--", label=f"teacher {name}")
    if s.get("teacher_accuracy") is not None and not several:
        ax.axhline(s["teacher_accuracy"], color="gray", linestyle="--", label="teacher")
    ax.set(xlabel="learner step", ylabel="held-out accuracy", ylim=(-0.02, 1.02))
    ax.legend()
    note = "student accuracy on the held-out set (step 0: before training)"
    if cut:
        note += f"; {len(cut)} evaluation(s) stopped by learner.eval_budget_s cover part of the set (hollow)"
    return note


def _t0(f: RunFiles) -> float | None:
    """When the run began to move: the first step's start or the launcher's first scaling record."""
    timed = [r for r in (*f.records, *f.scaling) if isinstance(r.get("time"), int | float)]
    starts = [r["time"] - r.get("step_seconds", 0) - r.get("wait_seconds", 0) for r in timed]
    return min(starts) if starts else None


def trajectories_of(record: dict) -> int:
    """Trajectories a learner step record trained. Records written before lag was counted per token lack
    `trajectories`; their lag_histogram counted trajectories then."""
    if "trajectories" in record:
        return record["trajectories"]
    return sum(record.get("lag_histogram") or [])


def _draw_throughput(ax, f: RunFiles) -> str | None:
    t0 = _t0(f)
    trained = [
        (
            r["time"] - t0,
            trajectories_of(r) / max(r.get("step_seconds", 0) + r.get("wait_seconds", 0), 1e-9),
        )
        for r in f.records
        if ("trajectories" in r or "lag_histogram" in r) and "time" in r
    ]
    scored = [
        (r["time"] - t0, r["scored_total"] / r["seconds"])
        for r in f.scaling
        if r.get("event") == "interval" and r.get("seconds") and "scored_total" in r
    ]
    for i, (pts, label) in enumerate(
        ((trained, "trained (learner, per step)"), (scored, "scored (scorers)"))
    ):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=f"C{i}", label=label)
    for i, (teacher, pts) in enumerate(_teacher_scored(f, t0).items()):
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], ":", color=f"C{i + 3}", label=f"scored by {teacher}"
        )
    s = f.summary or {}
    wall = s.get("wall_seconds") or 0
    if wall > 0 and isinstance(s.get("trajectories_generated"), int | float):
        ax.axhline(
            s["trajectories_generated"] / wall, linestyle="--", color="C2", label="generated (run mean)"
        )
    if not ax.lines:
        return None
    ax.set(xlabel="seconds since the run began", ylabel="trajectories / s")
    ax.legend()
    return (
        "trajectories per second per stage: the learner at each step, the scorers per scaling.interval_s "
        "(scaling.jsonl), the actors averaged over the run (summary.json)"
    )


def _teacher_scored(f: RunFiles, t0: float | None) -> dict[str, list[tuple[float, float]]]:
    """teacher -> (seconds since the start, trajectories scored per second by its pool) from the launcher's
    interval records of a run of several teachers (`teachers.<name>.scored_total`)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in f.scaling:
        if r.get("event") != "interval" or not r.get("seconds") or not isinstance(r.get("teachers"), dict):
            continue
        for teacher, pool in r["teachers"].items():
            if isinstance(pool, dict) and isinstance(pool.get("scored_total"), int | float):
                out.setdefault(teacher, []).append(
                    (r["time"] - (t0 or 0), pool["scored_total"] / r["seconds"])
                )
    return out


def _teacher_streams(records: list[dict]) -> list[str]:
    """The per-teacher queue keys of the step records (`queue_<kind>:<teacher>`, several teachers only)."""
    keys = {k for r in records for k in r if k.startswith("queue_") and ":" in k}
    return sorted(k.removeprefix("queue_") for k in keys)


def _draw_queues(ax, f: RunFiles) -> str | None:
    for i, stream in enumerate(WORK_STREAMS):  # per-step depths, where the step record carries them
        steps, depth = _series(f.records, f"queue_{stream}")
        if steps:
            ax.plot(
                steps,
                depth,
                label=f"{stream} (all)" if _teacher_streams(f.records) else stream,
                color=f"C{i}",
            )
    for i, stream in enumerate(_teacher_streams(f.records)):  # several teachers: each one's own streams
        steps, depth = _series(f.records, f"queue_{stream}")
        style = "--" if stream.startswith("rollouts") else ":"
        ax.plot(steps, depth, style, label=stream, color=f"C{i + 2}")
    if ax.lines:
        ax.set(xlabel="learner step", ylabel="entries")
        ax.legend(fontsize="small")
        return "work queue depths at each learner step (with several teachers, each teacher's own too)"
    pts = [(r["time"], r["rollouts_depth"]) for r in f.scaling if "rollouts_depth" in r and "time" in r]
    if not pts:
        return None
    t0 = _t0(f)
    ax.plot([t - t0 for t, _ in pts], [d for _, d in pts], marker=".", label="rollouts")
    ax.set(xlabel="seconds since the run began", ylabel="entries")
    ax.legend()
    return "rollouts queue depth (waiting for a scorer), sampled every scaling.interval_s (scaling.jsonl)"


def _lag_histogram(f: RunFiles) -> list[int]:
    hist = (f.summary or {}).get("lag_histogram")
    if isinstance(hist, list) and hist:
        return hist
    total: list[int] = []
    for r in f.records:
        for i, n in enumerate(r.get("lag_histogram") or []):
            total.extend([0] * (i + 1 - len(total)))
            total[i] += n
    return total


def _draw_lag(ax, f: RunFiles) -> str | None:
    hist = _lag_histogram(f)
    if not hist:
        return None
    ax.bar(range(len(hist)), hist)
    ax.set(xlabel="lag (weight versions behind the learner)", ylabel="response tokens trained")
    return "how stale the trained tokens were (each at the version that sampled it)"


def _draw_wait(ax, f: RunFiles) -> str | None:
    pts = [
        (r["step"], r["wait_seconds"] / max(r["wait_seconds"] + r.get("step_seconds", 0), 1e-9))
        for r in f.records
        if isinstance(r.get("wait_seconds"), int | float)
    ]
    if not pts:
        return None
    ax.plot([p[0] for p in pts], [p[1] for p in pts])
    ax.set(xlabel="learner step", ylabel="wait / (wait + step)", ylim=(-0.02, 1.02))
    return "fraction of each step the learner spent waiting for scored trajectories"


def _rank_records(records: list[dict]) -> list[dict]:
    """The step records of a learner of several ranks (learner.num_ranks > 1) that carry per-rank figures."""
    return [r for r in records if isinstance(r.get("rank_step_seconds"), list) and r["rank_step_seconds"]]


def _draw_ranks(ax, f: RunFiles) -> str | None:
    recs = _rank_records(f.records)
    if not recs:
        return None
    steps = [r["step"] for r in recs]
    for rank in range(max(len(r["rank_step_seconds"]) for r in recs)):
        color = f"C{rank % 10}"
        for key, style, what in (("rank_step_seconds", "-", "step"), ("rank_comm_seconds", ":", "comm")):
            pts = [
                (s, r[key][rank]) for s, r in zip(steps, recs, strict=True) if rank < len(r.get(key) or [])
            ]
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"rank {rank} {what}"
                )
    ax.set(xlabel="learner step", ylabel="seconds")
    ax.legend(fontsize="small")
    return (
        "each learner rank's step seconds (solid) and gradient all-reduce seconds (dotted: the torch engine and "
        "ZeRO-0; DeepSpeed's ZeRO-1/2/3 reductions are inside its optimiser step); the table below has the means"
    )


TASK_KEY = "eval_accuracy/"  # the learner's per-task accuracy of a task mixture (learner/evaluation.py)


def task_names(f: RunFiles) -> list[str]:
    """The tasks of a mixture whose accuracy the run recorded (step records or summary.json), in first-seen order."""
    names = [k[len(TASK_KEY) :] for r in f.records for k in r if k.startswith(TASK_KEY)]
    s = f.summary or {}
    for key in ("student_accuracy_before_by_task", "student_accuracy_after_by_task"):
        names += list(s.get(key) or {})
    return list(dict.fromkeys(names))


def routed_teachers(f: RunFiles, task: str) -> list[str] | None:
    """The teachers the run's routing sends `task`'s prompts to (routing on `task`: its route, else the default);
    None when the routing does not go by task (then every teacher is a reference)."""
    routing = (f.config or {}).get("routing") or {}
    if routing.get("field") != "task":
        return None
    route = (routing.get("routes") or {}).get(task) or routing.get("default")
    if isinstance(route, dict):
        return list(route)
    return [route] if isinstance(route, str) else None


def _draw_task_accuracy(task: str, ax, f: RunFiles) -> str | None:
    key, s = TASK_KEY + task, f.summary or {}
    evals = sorted(
        ({"step": r.get("eval_step", r["step"]), "acc": float(r[key])} for r in f.records
         if isinstance(r.get(key), int | float)),
        key=lambda e: e["step"],
    )  # fmt: skip
    steps, acc = [e["step"] for e in evals], [e["acc"] for e in evals]
    before = (s.get("student_accuracy_before_by_task") or {}).get(task)
    if isinstance(before, int | float):
        steps, acc = [0, *steps], [before, *acc]
    after = (s.get("student_accuracy_after_by_task") or {}).get(task)
    if not steps and after is None:
        return None
    ax.plot(steps, acc, marker="o", label="student")
    if isinstance(after, int | float):
        ax.plot([s.get("learner_steps") or (steps[-1] if steps else 0)], [after], "s", color="C1",
                label="saved student (after)")  # fmt: skip
    routed = routed_teachers(f, task)
    for i, (teacher, by_task) in enumerate((s.get("teacher_accuracies_by_task") or {}).items()):
        if isinstance(by_task, dict) and isinstance(by_task.get(task), int | float):
            if routed is None or teacher in routed:
                ax.axhline(by_task[task], color=f"C{i + 2}", linestyle="--", label=f"teacher {teacher}")
    ax.set(xlabel="learner step", ylabel=f"held-out accuracy on {task}", ylim=(-0.02, 1.02))
    ax.legend(fontsize="small")
    return (
        f"student accuracy on the {task} problems of the held-out set (step 0: before training); dashed: the "
        f"accuracy on {task} of each teacher its prompts are routed to"
    )


def task_plots(f: RunFiles) -> tuple[Plot, ...]:
    """One accuracy plot per task of a mixture (none for a single task)."""
    return tuple(
        Plot(f"accuracy_{name}", f"Held-out accuracy: {name}", partial(_draw_task_accuracy, name))
        for name in task_names(f)
    )


PLOTS = (
    Plot("reverse_kl", "Reverse KL", _draw_kl),
    Plot("accuracy", "Held-out accuracy", _draw_accuracy),
    Plot("throughput", "Throughput per stage", _draw_throughput),
    Plot("queues", "Queue depths", _draw_queues),
    Plot("lag_histogram", "Lag histogram", _draw_lag),
    Plot("wait_fraction", "Learner wait fraction", _draw_wait),
)


RANK_PLOT = Plot("learner_ranks", "Learner ranks", _draw_ranks)  # only for a run of several learner ranks


def plots_for(files: RunFiles) -> tuple[Plot, ...]:
    """The plots of this run: PLOTS, one per task of a mixture, and the learner ranks' when its records have them
    (a one-rank run's page carries no empty ranks plot)."""
    ranks = (RANK_PLOT,) if _rank_records(files.records) else ()
    return (*PLOTS, *task_plots(files), *ranks)


def render_plots(files: RunFiles) -> list[tuple[Plot, bytes | None, str]]:
    """(plot, PNG bytes or None, note) for every plot; each PNG is also written under plots/."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a headless machine, a CI job, a run started over ssh
    import matplotlib.pyplot as plt

    out = []
    (files.out / PLOTS_DIR).mkdir(exist_ok=True)
    for plot in plots_for(files):
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        try:
            ax.set_title(plot.title)
            note = plot.draw(ax, files)
            if note is None:  # and no picture left from an earlier report of this directory
                (files.out / PLOTS_DIR / f"{plot.name}.png").unlink(missing_ok=True)
                out.append((plot, None, "no data recorded for this plot"))
                continue
            ax.grid(alpha=0.3)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            (files.out / PLOTS_DIR / f"{plot.name}.png").write_bytes(buf.getvalue())
            out.append((plot, buf.getvalue(), note))
        finally:
            plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------- page
SUMMARY_ROWS = (
    "run_id", "learner_steps", "weight_version", "trajectories_generated", "trajectories_scored",
    "trajectories_trained", "dropped_stale", "dead_lettered", "reverse_kl_first", "reverse_kl_last",
    "teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "wall_seconds", "interrupted",
    "stopped_by", "loss", "engine",
)  # fmt: skip

CSS = (
    "body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}"
    "figure{display:inline-block;margin:.5em;vertical-align:top;max-width:660px}"
    "figcaption{font-size:.9em;color:#555}img{max-width:100%}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
    "pre{background:#f6f6f6;padding:.6em;overflow:auto}.warn{color:#a40}"
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary_table(summary: dict) -> str:
    rows = [f"<tr><th>{k}</th><td>{_cell(summary[k])}</td></tr>" for k in SUMMARY_ROWS if k in summary]
    return "<table>" + "".join(rows) + "</table>"


def _evaluation_table(records: list[dict]) -> str:
    """One row per held-out evaluation: the step and weight version it evaluated, how many problems, how long."""
    evals = _evaluations(records)
    if not evals:
        return "<p>no held-out evaluation recorded in metrics.jsonl</p>"
    head = ("evaluated step", "weight version", "accuracy", "problems", "seconds", "reported at step", "mode")
    rows = []
    for r in evals:
        total = r.get("eval_problems_total")
        problems = r.get("eval_problems", "")
        problems = f"{problems} of {total}" if total is not None else problems
        cells = (r["eval_step"], r.get("eval_weight_version", r.get("weight_version", "")), r["eval_accuracy"],
                 problems, r.get("eval_seconds", ""), r["step"], r.get("eval_mode", ""))  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    skipped = sum(1 for r in records if r.get("eval_skipped"))
    note = (
        f'<p class="warn">{skipped} evaluation(s) skipped: due while the previous one still ran (background mode)'
        "</p>"
        if skipped
        else ""
    )
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f'<table id="evaluations">{header}{"".join(rows)}</table>{note}'


def _row(cells) -> str:
    return "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>"


def _header(head) -> str:
    return "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"


def task_table(files: RunFiles) -> str:
    """A task mixture's held-out accuracy per task: the student before, at its last evaluation and after (the
    saved checkpoint), and each teacher (summary.json's *_by_task, metrics.jsonl's `eval_accuracy/<task>`)."""
    names = task_names(files)
    if not names:
        return ""
    s = files.summary or {}
    teachers = {t: a for t, a in (s.get("teacher_accuracies_by_task") or {}).items() if isinstance(a, dict)}
    head = ("task", "student before", "last evaluation", "student after", *(f"teacher {t}" for t in teachers))
    rows = []
    for task in names:
        last = [r for r in files.records if isinstance(r.get(TASK_KEY + task), int | float)]
        cells = (
            task,
            (s.get("student_accuracy_before_by_task") or {}).get(task, ""),
            last[-1][TASK_KEY + task] if last else "",
            (s.get("student_accuracy_after_by_task") or {}).get(task, ""),
            *(a.get(task, "") for a in teachers.values()),
        )
        rows.append(_row(cells))
    return f'<h2>Accuracy per task</h2><table id="tasks">{_header(head)}{"".join(rows)}</table>'


TEACHER_COLUMNS = (
    ("scorers", "scorers"),
    ("trajectories_scored", "trajectories scored"),
    ("tokens_scored", "tokens scored"),
    ("score_seconds", "scoring seconds"),
    ("batch_seconds", "seconds per batch"),
    ("score_failures", "teacher failures"),
    ("dead_lettered", "dead-lettered"),
    ("join_timeouts", "join timeouts (its copy missing)"),
    ("trajectories_trained", "trajectories trained"),
)
# shown when a teacher of another tokenizer scored (its pool counts alignment_responses)
ALIGNMENT_COLUMNS = (
    ("chunks_per_response", "chunks per response"),
    ("topk_matched_share", "top-k mass matched"),
    ("alignment_failures", "alignment failures"),
)


COUNTED = {
    "scorers",
    "trajectories_scored",
    "tokens_scored",
    "score_failures",
    "dead_lettered",
    "join_timeouts",
    "alignment_failures",
}


def _whole(value: Any) -> Any:
    """A count summed as a float (counters travel as numbers) shown as the integer it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def teacher_table(summary: dict | None) -> str:
    """Several teachers: one row per teacher's pool (summary.json `teachers`, opd/launch/teacher_stats.py):
    what its scorers did, tokens per second of scoring, and its share of the trajectories trained."""
    teachers = (summary or {}).get("teachers")
    if not isinstance(teachers, dict) or not teachers:
        return ""
    aligned = any(isinstance(r, dict) and r.get("alignment_responses") for r in teachers.values())
    columns = TEACHER_COLUMNS + (ALIGNMENT_COLUMNS if aligned else ())
    head = ("teacher", *(h for _, h in columns), "scored tokens/s (busy)", "share of trained")
    rows = []
    for name, r in teachers.items():
        if not isinstance(r, dict):
            continue
        busy = r.get("score_seconds") or 0
        tok_s = r.get("tokens_scored", 0) / busy if busy else ""
        share = f"{r['share']:.1%}" if isinstance(r.get("share"), int | float) else ""
        cells = (
            _whole(r.get(k, "")) if k in COUNTED else ("" if r.get(k) is None else r[k]) for k, _ in columns
        )
        rows.append(_row((name, *cells, tok_s, share)))
    note = (
        "<p>share: of the trajectories trained, a mixture counted by its route's weights; scored tokens/s: per "
        "second of scoring (the pool's busy time)</p>"
    )
    return f'<h2>Teachers</h2><table id="teachers">{_header(head)}{"".join(rows)}</table>{note}'


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def rank_table(records: list[dict]) -> str:
    """One row per learner rank, means over the steps: step and comm seconds, the comm share of the step, apply
    seconds, tokens per step; and the mean and worst token imbalance. Empty for a run of one rank."""
    recs = _rank_records(records)
    if not recs:
        return ""
    head = (
        "rank",
        "step s (mean)",
        "comm s (mean)",
        "comm share",
        "apply s (mean)",
        "tokens per step (mean)",
    )
    rows = []
    for rank in range(max(len(r["rank_step_seconds"]) for r in recs)):

        def col(key: str, rank: int = rank) -> list[float]:
            return [float(r[key][rank]) for r in recs if rank < len(r.get(key) or [])]

        step, comm = col("rank_step_seconds"), col("rank_comm_seconds")
        share = sum(comm) / sum(step) if sum(step) > 0 else 0.0
        cells = (rank, _mean(step), _mean(comm), f"{share:.1%}", _mean(col("rank_apply_seconds")),
                 _mean(col("rank_tokens")))  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    imb = [
        float(r["rank_token_imbalance"])
        for r in recs
        if isinstance(r.get("rank_token_imbalance"), int | float)
    ]
    note = (
        f"<p>token imbalance (heaviest rank over the mean, per step): mean {_mean(imb):.3f}, worst {max(imb):.3f}"
        f" over {len(recs)} steps</p>"
        if imb
        else ""
    )
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f'<h2>Learner ranks</h2><table id="learner-ranks">{header}{"".join(rows)}</table>{note}'


def _figure(plot: Plot, png: bytes | None, note: str) -> str:
    if png is None:
        return f'<figure><h3>{plot.title}</h3><p class="warn">{html.escape(note)}</p></figure>'
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img id="plot-{plot.name}" alt="{plot.title}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(note)}</figcaption></figure>"
    )


def page_html(files: RunFiles, plots: list[tuple[Plot, bytes | None, str]], plot_error: str = "") -> str:
    run_id = (files.summary or {}).get("run_id") or ((files.config or {}).get("run") or {}).get("run_id")
    title = f"opd run {run_id or files.out.name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    if files.summary is None or files.summary.get("interrupted"):
        parts.append(
            '<p class="warn">This run did not finish (interrupted or failed): the page shows what it left.</p>'
        )
    if files.missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in files.missing)
        parts.append(
            f'<p class="warn">Missing or incomplete in {html.escape(str(files.out))}:</p><ul>{items}</ul>'
        )
    if plot_error:
        parts.append(f'<p class="warn">No plots: {html.escape(plot_error)}</p>')
    parts.append("<h2>Plots</h2>" + "".join(_figure(*p) for p in plots))
    parts.append("<h2>Summary</h2>")
    parts.append(_summary_table(files.summary) if files.summary else "<p>no summary.json</p>")
    parts.append(teacher_table(files.summary))
    parts.append(task_table(files))
    parts.append("<h2>Held-out evaluations</h2>" + _evaluation_table(files.records))
    parts.append(rank_table(files.records))
    parts.append("<h2>Config (secrets redacted)</h2>")
    if files.config is not None:
        text = yaml.safe_dump(redact(files.config), sort_keys=False)
        parts.append(f"<pre>{html.escape(text)}</pre>")
    else:
        parts.append("<p>no config.yaml</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, log: Callable[[str], None] | None = None) -> Path:
    """Plots under out/plots/ and out/report.html, from what out holds; returns the page's path.

    Never raises for a run directory's content: a report is the last step of a run and must not turn a finished
    run into a failed one."""
    files = read_run(Path(out))
    try:
        plots, error = render_plots(files), ""
    except ImportError as exc:
        plots, error = [], f"matplotlib is not installed ({exc}); pip install matplotlib"
    except Exception as exc:  # a plotting bug must not fail the run: the page still has summary and config
        plots, error = [], f"{type(exc).__name__}: {exc}"
    page = files.out / PAGE
    page.write_text(page_html(files, plots, error))
    if log is not None:
        log(f"report: {page} (plots in {files.out / PLOTS_DIR})")
    return page
