"""Quality benchmark: learner steps and tokens to reach 90% / 95% of the teacher's held-out accuracy.

Methods, all from the same initial student, teacher, batch (16 prompts x n 4 = 64 trajectories), AdamW settings
and lr schedule (constant after 10 warmup steps), run in the in-process harness (benchmarks/harness.py):

  opd_rkl      on-policy distillation, `loss: reverse_kl_pg`
  grpo         pure RL on the verifier's exact-match reward: `loss: hybrid`, `hybrid.distill_weight: 0`,
               `task_estimator: grpo`. The teacher is never called, so its teacher tokens are 0.
  offpolicy_kd supervised training on teacher samples (teacher samples at T=1; the student minimises their
               token-mean NLL). Expressed through the engine as reverse_kl_pg with A_t = 1 and correction none,
               which is exactly -token_mean(log pi(y_t)), so it uses the same AdamW/lr schedule/grad clip.
               Student tokens are 0 (the student generates nothing); teacher tokens = tokens it generated.
  gkd_jsd      `loss: gkd_jsd`, jsd_beta 0.5, on the teacher's top-8 (scorer.topk 8).
  hybrid       `loss: hybrid`, distill reverse_kl_pg, rl_weight 1, distill_weight 1.

Tokens: student tokens = response tokens the student generated; teacher tokens = tokens the teacher scored (or
generated, for KD). Seeds change the prompt order, the sampling and the learner seed; the initial student is the
same. Two settings (BENCHMARKS.md, "Quality"), one config each:

  configs/bench_quality.yaml        A, primary: a capable student (teacher's architecture and SFT length) with a
                                    spurious trailing '=' habit, so the exact-match reward is sparse
  configs/bench_quality_skill.yaml  B: an under-trained student (a skill gap; a null result)

`python3 benchmarks/quality.py [--config C]` writes benchmarks/results/<name>.{json,png}, where <name> is the
config's file name without `bench_` (quality, quality_skill); `--sweep` runs the lr sweep that chose LR below
(<name>_sweep_<methods>.json); `--smoke` is a seconds-long run on throwaway tiny models (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import OFF_POLICY_KD, ON_POLICY, RL_ONLY, run  # noqa: E402
from opd import tasks  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.models.builds import ensure_assets, evaluate, load_asset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "bench_quality.yaml"  # setting A (primary)
SKILL_CONFIG = REPO / "configs" / "bench_quality_skill.yaml"  # setting B
# benchmarks/staleness.py imports CONFIG; its documented numbers were measured on the skill-gap models.
CONFIG = SKILL_CONFIG
RESULTS = REPO / "benchmarks" / "results"

METHODS: dict[str, dict] = {
    "opd_rkl": {"kind": ON_POLICY, "family": "distill", "overrides": ["learner.loss=reverse_kl_pg"]},
    "grpo": {
        "kind": RL_ONLY,
        "family": "rl",
        "overrides": [
            "learner.loss=hybrid",
            "learner.hybrid.distill=reverse_kl_pg",
            "learner.hybrid.rl_weight=1",
            "learner.hybrid.distill_weight=0",
            "learner.task_estimator=grpo",
        ],
    },
    "offpolicy_kd": {
        "kind": OFF_POLICY_KD,
        "family": "kd",
        "overrides": ["learner.loss=reverse_kl_pg", "learner.correction.mode=none"],
    },
    "gkd_jsd": {
        "kind": ON_POLICY,
        "family": "distill",
        "overrides": ["learner.loss=gkd_jsd", "learner.jsd_beta=0.5", "scorer.topk=8"],
    },
    "hybrid": {
        "kind": ON_POLICY,
        "family": "distill",
        "overrides": [
            "learner.loss=hybrid",
            "learner.hybrid.distill=reverse_kl_pg",
            "learner.hybrid.rl_weight=1",
            "learner.hybrid.distill_weight=1",
            "learner.task_estimator=grpo",
        ],
    },
}

# One peak lr per family and config, from `--sweep` (numbers in BENCHMARKS.md).
LR_BY_CONFIG = {
    # setting A: not swept (time); 1e-4 is the demo's lr (configs/tiny.yaml distils the same habit away at 1e-4,
    # 64 trajectories/step), the same for every method. `--sweep` would check it.
    "bench_quality": {"distill": 1e-4, "rl": 1e-4, "kd": 1e-4},
    # setting B: every family was best at 3e-5 and lost accuracy at 1e-4 and 3e-4, so all use 3e-5.
    "bench_quality_skill": {"distill": 3e-5, "rl": 3e-5, "kd": 3e-5},
}
SWEEP_LRS = (3e-5, 1e-4, 3e-4)

# Throwaway models for --smoke: built in seconds, cached like any other.
SMOKE_OVERRIDES = [
    "task.eval_size=40",
    "student.hidden_size=32",
    "student.num_layers=1",
    "student.intermediate_size=64",
    "student.sft_steps=5",
    "student.sft_batch_size=16",
    "teacher.hidden_size=32",
    "teacher.num_layers=1",
    "teacher.intermediate_size=64",
    "teacher.sft_steps=5",
    "teacher.sft_batch_size=16",
    "actor.prompts_per_batch=4",
    "learner.batch_size=16",
]


def output_name(config: Path) -> str:
    """benchmarks/results/<name>.json for a config: its file name without `bench_`."""
    return config.stem.removeprefix("bench_")


def method_config(config: Path, base: list[str], method: str, lr: float | None = None):
    spec = METHODS[method]
    if lr is None:
        lr = LR_BY_CONFIG.get(config.stem, LR_BY_CONFIG["bench_quality"])[spec["family"]]
    return load_config(config, [*base, *spec["overrides"], f"learner.lr={lr}"])


def _one_run(job: tuple) -> dict:
    config, base, name, seed, steps, eval_every = job
    cfg = method_config(config, base, name)
    assets = ensure_assets(cfg, log=lambda m: None)
    return run(cfg, assets, steps=steps, eval_every=eval_every, kind=METHODS[name]["kind"], seed=seed)


def parallel_map(fn, jobs: list, workers: int) -> list:
    """Independent deterministic runs, in `workers` single-threaded processes (1 = in this process)."""
    if workers <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=1)


def crossing(evals: list[dict], target: float) -> dict | None:
    """The first evaluation where the mean of it and the previous evaluation reaches `target` (one 300-problem
    evaluation has a standard error of about 0.025, so a single lucky evaluation does not count as reaching it);
    returns its step and cumulative tokens."""
    for prev, e in zip(evals, evals[1:], strict=False):
        if (prev["accuracy"] + e["accuracy"]) / 2 >= target:
            return {k: e[k] for k in ("step", "student_tokens", "teacher_tokens")}
    return None


def summarise(runs: list[dict], target: float, steps: int) -> dict:
    """Median and min-max over seeds of steps/tokens to `target`; an unreached seed counts as infinity."""
    hits = [crossing(r["evals"], target) for r in runs]
    out = {"reached": sum(h is not None for h in hits), "seeds": len(hits)}
    for key in ("step", "student_tokens", "teacher_tokens", "total_tokens"):
        vals = []
        for h in hits:
            if h is None:
                vals.append(math.inf)
            elif key == "total_tokens":
                vals.append(h["student_tokens"] + h["teacher_tokens"])
            else:
                vals.append(h[key])
        med = statistics.median(vals)
        out[key] = {
            "median": None if math.isinf(med) else med,
            "min": None if math.isinf(min(vals)) else min(vals),
            "max": None if math.isinf(max(vals)) else max(vals),
        }
    return out


def fmt(d: dict, steps: int, scale: float = 1.0, unit: str = "") -> str:
    if d["median"] is None:
        return f"not reached in {steps}"
    lo, hi = d["min"], d["max"]
    hi_s = f">{steps}" if hi is None and unit == "" else ("n/r" if hi is None else f"{hi / scale:.0f}{unit}")
    return f"{d['median'] / scale:.0f}{unit} ({lo / scale:.0f}–{hi_s})"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    teacher = result["teacher_accuracy"]
    for name, m in result["methods"].items():
        curves = [r["evals"] for r in m["runs"]]
        steps = [e["step"] for e in curves[0]]
        acc = [[c[i]["accuracy"] for c in curves] for i in range(len(steps))]
        med = [statistics.median(a) for a in acc]
        (line,) = ax.plot(steps, med, label=f"{name} (lr {m['lr']:g})")
        ax.fill_between(
            steps, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.2
        )
    ax.axhline(teacher, color="k", lw=1, label=f"teacher {teacher:.3f}")
    ax.axhline(0.95 * teacher, color="k", lw=0.8, ls="--", label="95% of teacher")
    ax.axhline(0.90 * teacher, color="k", lw=0.8, ls=":", label="90% of teacher")
    ax.set_xlabel("learner step (64 trajectories each)")
    ax.set_ylabel("held-out exact-match accuracy (greedy)")
    ax.set_title(f"quality: median and min–max over {result['seeds']} seeds")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    steps = result["steps"]
    lines = [
        "| method | lr | steps to 90% | steps to 95% | student tok @95% | teacher tok @95% | total tok @95% | final acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in result["methods"].items():
        s90, s95 = m["to_90"], m["to_95"]
        finals = [r["evals"][-1]["accuracy"] for r in m["runs"]]
        lines.append(
            f"| {name} | {m['lr']:g} | {fmt(s90['step'], steps)} | {fmt(s95['step'], steps)} | "
            f"{fmt(s95['student_tokens'], steps, 1e3, 'k')} | {fmt(s95['teacher_tokens'], steps, 1e3, 'k')} | "
            f"{fmt(s95['total_tokens'], steps, 1e3, 'k')} | {statistics.median(finals):.3f} "
            f"({min(finals):.3f}–{max(finals):.3f}) |"
        )
    lines.append("")
    lines.append("| method | student tok @90% | teacher tok @90% | total tok @90% | wall s (per seed) |")
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for name, m in result["methods"].items():
        s90 = m["to_90"]
        walls = [r["wall_seconds"] for r in m["runs"]]
        lines.append(
            f"| {name} | {fmt(s90['student_tokens'], steps, 1e3, 'k')} | {fmt(s90['teacher_tokens'], steps, 1e3, 'k')} "
            f"| {fmt(s90['total_tokens'], steps, 1e3, 'k')} | {statistics.median(walls):.0f} |"
        )
    return "\n".join(lines)


def sweep(args, base, methods, assets, teacher_acc, out_dir) -> int:
    """lr sweep: one seed, each family's representative at SWEEP_LRS."""
    found = {}
    fam_rep = {"distill": "opd_rkl", "rl": "grpo", "kd": "offpolicy_kd"}
    for name in [n for n in fam_rep.values() if n in methods]:
        for lr in SWEEP_LRS:
            cfg = method_config(args.config, base, name, lr)
            r = run(cfg, assets, steps=args.steps, eval_every=args.eval_every, kind=METHODS[name]["kind"])
            accs = [e["accuracy"] for e in r["evals"]]
            c90 = crossing(r["evals"], 0.9 * teacher_acc)
            found[f"{name}@{lr:g}"] = {"accuracy": accs, "to_90": c90, "best": max(accs)}
            print(
                f"sweep {name} lr {lr:g}: final {accs[-1]:.3f} best {max(accs):.3f} "
                f"steps to 90% {c90['step'] if c90 else 'n/r'} ({r['wall_seconds']:.0f}s)",
                flush=True,
            )
    tag = "_".join(n for n in fam_rep.values() if n in methods)
    (out_dir / f"{output_name(args.config)}_sweep_{tag}.json").write_text(
        json.dumps({"teacher_accuracy": teacher_acc, **found}, indent=1)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="setting (default: A, the primary)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on throwaway tiny models (tests)")
    ap.add_argument("--sweep", action="store_true", help="lr sweep: one seed, each family at SWEEP_LRS")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    ap.add_argument("--cache-dir", default=None, help="run.cache_dir for the built models")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (2 cores)")
    args = ap.parse_args(argv)

    base = [] if args.cache_dir is None else [f"run.cache_dir={args.cache_dir}"]
    if args.smoke:
        base += SMOKE_OVERRIDES
        args.steps, args.eval_every, args.seeds, args.jobs = 4, 2, 2, 1
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")

    args.config = args.config.resolve()
    name = output_name(args.config)
    cfg0 = load_config(args.config, base)
    assets = ensure_assets(cfg0, log=lambda m: print(m, flush=True))
    teacher_model, tok = load_asset(assets.teacher)
    teacher_acc = evaluate(
        teacher_model, tok, tasks.eval_set(cfg0.task), cfg0.sampling.max_new_tokens, "exact"
    )
    print(
        f"teacher held-out accuracy {teacher_acc:.3f}; student (initial) {assets.student.eval_accuracy:.3f}"
    )
    t_start = time.time()

    if args.sweep:
        return sweep(args, base, methods, assets, teacher_acc, out_dir)

    result = {
        "config": str(args.config.relative_to(REPO))
        if args.config.is_relative_to(REPO)
        else str(args.config),
        "smoke": args.smoke,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "seeds": args.seeds,
        "batch_trajectories": cfg0.learner.batch_size,
        "teacher_accuracy": teacher_acc,
        "student_initial_accuracy": assets.student.eval_accuracy,
        "targets": {"to_90": 0.9 * teacher_acc, "to_95": 0.95 * teacher_acc},
        "methods": {},
    }
    jobs = [
        (args.config, base, m, seed, args.steps, args.eval_every)
        for m in methods
        for seed in range(args.seeds)
    ]
    done = parallel_map(_one_run, jobs, args.jobs)
    for method in methods:
        spec = METHODS[method]
        cfg = method_config(args.config, base, method)
        runs = [r for job, r in zip(jobs, done, strict=True) if job[2] == method]
        for seed, r in enumerate(runs):
            c90 = crossing(r["evals"], 0.9 * teacher_acc)
            print(
                f"{method} seed {seed}: final acc {r['evals'][-1]['accuracy']:.3f}, steps to 90% "
                f"{c90['step'] if c90 else 'n/r'} ({r['wall_seconds']:.0f}s)",
                flush=True,
            )
        result["methods"][method] = {
            "kind": spec["kind"],
            "overrides": spec["overrides"],
            "lr": cfg.learner.lr,
            "teacher_tokens_note": {
                ON_POLICY: "teacher scored every student token",
                RL_ONLY: "0: the teacher is not needed for RL on the verifier's reward",
                OFF_POLICY_KD: "tokens the teacher generated (student generates none)",
            }[spec["kind"]],
            "to_90": summarise(runs, 0.9 * teacher_acc, args.steps),
            "to_95": summarise(runs, 0.95 * teacher_acc, args.steps),
            "runs": runs,
        }
    result["wall_seconds"] = time.time() - t_start
    result["cpu_threads"] = 1
    result["loadavg_end"] = os.getloadavg()
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir / f"{name}.png")
    print(table(result))
    print(f"wrote {out_dir / name}.json and {name}.png in {result['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
