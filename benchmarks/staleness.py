"""Staleness benchmark: exact lag s x correction mode, with `loss: reverse_kl_pg`.

Every batch trained at step k is sampled by the weights of version max(0, k - s) (benchmarks/harness.py keeps a
ring of the last s+1 versions), the worst lag `learner.max_staleness = s` admits; in the real pipeline the lag
is whatever the process timing gives, which is why this runs in-process. Reported per (s, mode): final held-out
accuracy (mean of the last 3 evaluations) and the reverse KL of the student vs the teacher on the student's own
samples (the objective's `reverse_kl`, mean over the last 10 steps). Note that with lag s the samples come from
the s-versions-old student, so their KL describes that student; that is the metric the learner logs.

The lr is higher than quality's (LR below) so that a lag of a few versions moves the policy enough to matter.
`python3 benchmarks/staleness.py` writes benchmarks/results/staleness.{json,png}; `--smoke` is seconds long.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import ON_POLICY, run  # noqa: E402
from benchmarks.quality import CONFIG, REPO, RESULTS, SMOKE_OVERRIDES, parallel_map  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.models.builds import ensure_assets  # noqa: E402

STALENESS = (0, 1, 2, 4, 8)
MODES = ("none", "tis", "ppo_clip", "decoupled", "mask")
LR = 1e-4
CAP = 2.0


def mode_overrides(mode: str) -> list[str]:
    out = [f"learner.correction.mode={mode}", f"learner.correction.cap={CAP}"]
    if mode == "decoupled":
        out.append("learner.correction.proximal=recompute")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, stal = result["modes"], result["staleness"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title, cmap in (
        (axes[0], "final_accuracy", "final held-out accuracy", "viridis"),
        (axes[1], "reverse_kl", "reverse KL (last 10 steps)", "magma_r"),
    ):
        grid = [[result["cells"][f"{s}/{m}"][key] for m in modes] for s in stal]
        im = ax.imshow(grid, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(modes)), modes)
        ax.set_yticks(range(len(stal)), [f"s={s}" for s in stal])
        for i in range(len(stal)):
            for j in range(len(modes)):
                light = im.norm(grid[i][j]) > 0.6 if cmap == "viridis" else im.norm(grid[i][j]) < 0.4
                ax.text(
                    j,
                    i,
                    f"{grid[i][j]:.3f}",
                    ha="center",
                    va="center",
                    color="k" if light else "w",
                    fontsize=8,
                )
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(
        f"reverse_kl_pg, exact lag s, lr {result['lr']:g}, {result['steps']} steps "
        f"(teacher {result['teacher_accuracy']:.3f}, {seed_label(result)})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_label(result: dict) -> str:
    if "seeds" in result:
        return f"median of seeds {', '.join(map(str, result['seeds']))}"
    return f"seed {result['seed']}"


def _cell_text(cell: dict, key: str) -> str:
    if f"{key}_min" in cell:
        return f"{cell[key]:.3f} ({cell[key + '_min']:.3f}–{cell[key + '_max']:.3f})"
    return f"{cell[key]:.3f}"


def merge(paths: list[Path]) -> dict:
    """Combine one-seed results (same grid, different --seed): median and min-max per cell."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("seed", "cells", "wall_seconds", "loadavg_end")}
    out["seeds"] = [r["seed"] for r in runs]
    out["wall_seconds_per_seed"] = [r["wall_seconds"] for r in runs]
    out["cells"] = {}
    for key in runs[0]["cells"]:
        cells = [r["cells"][key] for r in runs]
        merged = {
            "max_lag": max(c["max_lag"] for c in cells),
            "per_seed": dict(zip(out["seeds"], cells, strict=True)),
        }
        for m in ("final_accuracy", "reverse_kl"):
            vals = [c[m] for c in cells]
            merged.update({m: statistics.median(vals), f"{m}_min": min(vals), f"{m}_max": max(vals)})
        out["cells"][key] = merged
    return out


def table(result: dict, key: str) -> str:
    modes = result["modes"]
    lines = ["| s | " + " | ".join(modes) + " |", "| ---: |" + " ---: |" * len(modes)]
    for s in result["staleness"]:
        cells = [_cell_text(result["cells"][f"{s}/{m}"], key) for m in modes]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _one_run(job: tuple) -> dict:
    base, s, mode, steps, eval_every, seed = job
    cfg = load_config(CONFIG, [*base, *mode_overrides(mode), f"learner.max_staleness={s}"])
    assets = ensure_assets(cfg, log=lambda m: None)
    return run(cfg, assets, steps=steps, eval_every=eval_every, kind=ON_POLICY, staleness=s, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--staleness", default=",".join(map(str, STALENESS)))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one torch thread each (2 cores)")
    ap.add_argument(
        "--merge", nargs="+", type=Path, help="combine staleness.json files of other seeds; no runs"
    )
    args = ap.parse_args(argv)
    out_dir = args.out or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.merge:
        result = merge(args.merge)
        report(result, out_dir)
        return 0

    base = [] if args.cache_dir is None else [f"run.cache_dir={args.cache_dir}"]
    stal = [int(x) for x in args.staleness.split(",")]
    modes = args.modes.split(",")
    if args.smoke:
        base += SMOKE_OVERRIDES
        args.steps, args.eval_every, args.jobs = 4, 2, 1
        stal, modes = [0, 2], list(MODES)
    base += ["learner.loss=reverse_kl_pg", f"learner.lr={args.lr}"]
    assets = ensure_assets(load_config(CONFIG, base), log=lambda m: print(m, flush=True))
    result = {
        "config": str(CONFIG.relative_to(REPO)),
        "smoke": args.smoke,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "lr": args.lr,
        "cap": CAP,
        "staleness": stal,
        "modes": modes,
        "teacher_accuracy": assets.teacher.eval_accuracy,
        "student_initial_accuracy": assets.student.eval_accuracy,
        "cells": {},
    }
    t0 = time.time()
    jobs = [(base, s, mode, args.steps, args.eval_every, args.seed) for s in stal for mode in modes]
    for (_, s, mode, _, _, _), r in zip(jobs, parallel_map(_one_run, jobs, args.jobs), strict=True):
        accs = [e["accuracy"] for e in r["evals"]]
        tail = r["steps"][-10:]
        cell = {
            "final_accuracy": statistics.mean(accs[-3:]),
            "last_accuracy": accs[-1],
            "best_accuracy": max(accs),
            "reverse_kl": statistics.mean(x["reverse_kl"] for x in tail),
            "importance_weight": statistics.mean(x.get("importance_weight", float("nan")) for x in tail),
            "max_lag": max(x["lag"] for x in r["steps"]),
            "evals": r["evals"],
            "reverse_kl_curve": [x["reverse_kl"] for x in r["steps"]],
            "wall_seconds": r["wall_seconds"],
        }
        result["cells"][f"{s}/{mode}"] = cell
        print(
            f"s={s} {mode}: acc {cell['final_accuracy']:.3f} (last {cell['last_accuracy']:.3f}) "
            f"rkl {cell['reverse_kl']:.3f} lag<={cell['max_lag']} ({r['wall_seconds']:.0f}s)",
            flush=True,
        )
    result["wall_seconds"] = time.time() - t0
    result["loadavg_end"] = os.getloadavg()
    report(result, out_dir)
    return 0


def report(result: dict, out_dir: Path) -> None:
    (out_dir / "staleness.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir / "staleness.png")
    print(f"final held-out accuracy (mean of the last 3 evaluations), {seed_label(result)}")
    print(table(result, "final_accuracy"))
    print("reverse KL (mean of the last 10 steps)")
    print(table(result, "reverse_kl"))
    print(f"wrote {out_dir / 'staleness.json'} and staleness.png")


if __name__ == "__main__":
    raise SystemExit(main())
