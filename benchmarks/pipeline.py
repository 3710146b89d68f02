"""Trained tokens/s of the asynchronous pipeline against lockstep (`pipeline.mode: sync`), and the learner's wait.

    python benchmarks/pipeline.py                  # about 6 minutes on a 2-core CPU
    python benchmarks/pipeline.py --smoke          # a few steps per run: checks the script, measures nothing

Four real `opd run`s of configs/tiny.yaml (same processes, same config but for the keys below), in two settings:

- plain: real compute on this machine. Every stage shares the same CPU cores, so overlapping them mostly
  shares those cores rather than adding compute;
- calibrated: each stage's compute is a fixed per-token service time (`pipeline.service_time`), padded with a
  sleep that frees the CPU, as if each stage had its own accelerator. The service times are calibrated from the
  plain sync run: each stage's real cost per response token there (actor generate_seconds / tokens_generated and
  scorer score_seconds / tokens_scored from summary.json's `components`, learner step_seconds / tokens from
  metrics.jsonl), times `--multiple` (default 5), so the tiny models' real compute is at most a fifth of each
  stage's time and the stages keep their real proportions.

In each setting it runs `pipeline.mode: sync` (each actor generates one batch and waits for the weights trained on
it) and `async` (the design). From the learner's metrics.jsonl, over the steps after `--skip` warm-up steps:
trained tokens/s = response tokens trained / (time of the last step - time of the last warm-up step), and the
learner's wait fraction = sum wait_seconds / sum (wait_seconds + step_seconds + weight_sync_seconds).
Writes JSON to --out and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
MODES = ("sync", "async")
STAGES = ("actor", "scorer", "learner")


def run_opd(overrides: list[str], out_dir: Path, timeout_s: float) -> dict:
    """One `opd run` as a user starts it; returns its learner records, summary and the load average meanwhile."""
    cmd = [sys.executable, "-m", "opd", "run", str(CONFIG), f"run.output_dir={out_dir}", *overrides]
    log_path = out_dir.parent / f"{out_dir.name}.log"
    loads, started = [], time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            loads.append(os.getloadavg()[0])
            if time.time() - started > timeout_s:
                proc.terminate()
                proc.wait(60)
                raise RuntimeError(f"opd run took over {timeout_s:.0f}s; log: {log_path}")
            time.sleep(1.0)
    if proc.returncode != 0:
        raise RuntimeError(f"opd run failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"records": records, "summary": summary, "load_1min": loads, "wall_s": time.time() - started}


def steady(records: list[dict], skip: int) -> dict:
    """Throughput and the learner's time split over the steps after the first `skip`."""
    steps = [r for r in records if r["step"] > skip]
    if skip < 1 or not steps:
        raise ValueError(
            f"need at least one warm-up step and one measured step (skip={skip}, {len(records)} steps)"
        )
    start = next(r["time"] for r in records if r["step"] == skip)
    seconds = steps[-1]["time"] - start
    wait = sum(r["wait_seconds"] for r in steps)
    busy = sum(r["step_seconds"] + r.get("weight_sync_seconds", 0.0) for r in steps)
    return {
        "steps": len(steps),
        "seconds": seconds,
        "tokens": sum(r["tokens"] for r in steps),
        "trained_tokens_per_s": sum(r["tokens"] for r in steps) / seconds,
        "wait_fraction": wait / (wait + busy),
        "learner_pad_seconds": sum(r.get("service_pad_seconds", 0.0) for r in steps),
        "staleness_mean": sum(r["staleness_mean"] for r in steps) / len(steps),
        "staleness_max": max(r["staleness_max"] for r in steps),
    }


def per_token_ms(run: dict, skip: int) -> dict[str, float]:
    """Each stage's real compute per response token, from a run without service times."""
    comps = run["summary"]["components"]

    def total(prefix: str, key: str) -> float:
        return sum(r.get(key, 0.0) for n, r in comps.items() if n.startswith(prefix + "-"))

    steps = [r for r in run["records"] if r["step"] > skip]
    return {
        "actor": 1000 * total("actor", "generate_seconds") / total("actor", "tokens_generated"),
        "scorer": 1000 * total("scorer", "score_seconds") / total("scorer", "tokens_scored"),
        "learner": 1000 * sum(r["step_seconds"] for r in steps) / sum(r["tokens"] for r in steps),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for i, mode in enumerate(MODES):
        xs = [j + (i - 0.5) * width for j in range(len(settings))]
        tps = [results["settings"][s][mode]["trained_tokens_per_s"] for s in settings]
        wf = [results["settings"][s][mode]["wait_fraction"] for s in settings]
        axes[0].bar(xs, tps, width, label=mode)
        axes[1].bar(xs, wf, width, label=mode)
    for ax, title in zip(axes, ("trained tokens/s (learner)", "learner wait fraction"), strict=True):
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(title)
        ax.legend()
    axes[1].set_ylim(0, 1)
    for j, s in enumerate(settings):
        r = results["ratios"][s]["async_over_sync_tokens_per_s"]
        axes[0].annotate(
            f"x{r:.2f}",
            (j, max(results["settings"][s][m]["trained_tokens_per_s"] for m in MODES)),
            ha="center",
            va="bottom",
        )
    fig.suptitle(f"opd-stream async vs sync pipeline ({results['machine']['cpus']} CPUs, tiny models)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(results: dict) -> None:
    service = results["service_time_ms_per_token"]
    print(
        f"\nservice times (ms per response token, {results['multiple']:g} x the plain sync run's real cost): "
        + ", ".join(f"{s} {service[s]:.3f}" for s in STAGES)
    )
    print(
        "\n| setting | mode | steps | trained tok/s | learner wait fraction | staleness mean / max | load (1 min) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for setting, modes in results["settings"].items():
        for mode, m in modes.items():
            print(
                f"| {setting} | {mode} | {m['steps']} | {m['trained_tokens_per_s']:.0f} | {m['wait_fraction']:.2f} "
                f"| {m['staleness_mean']:.2f} / {m['staleness_max']} | {m['load_1min_mean']:.1f} |"
            )
    print("\n| setting | async / sync tok/s | ideal | wait fraction sync | wait fraction async |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for setting, r in results["ratios"].items():
        ideal = f"{r['ideal_async_over_sync']:.2f}" if "ideal_async_over_sync" in r else "-"
        print(
            f"| {setting} | {r['async_over_sync_tokens_per_s']:.2f} | {ideal} | {r['wait_fraction_sync']:.2f} "
            f"| {r['wait_fraction_async']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    p.add_argument(
        "--cache-dir", default=".cache/opd", help="run.cache_dir (built models; built on first use)"
    )
    p.add_argument("--plain-steps", type=int, default=100, help="learner steps of each plain run")
    p.add_argument("--calibrated-steps", type=int, default=50, help="learner steps of each calibrated run")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of every measurement")
    p.add_argument("--multiple", type=float, default=5.0, help="service time = this x the stage's real cost")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="6 steps per run, --multiple 2: checks the script, measures nothing",
    )
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories (printed)")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. --set learner.device=cuda (repeatable)",
    )
    args = p.parse_args(argv)
    # --smoke: every path of the script at the least cost (a small multiple keeps the calibrated runs short)
    if args.smoke:
        args.plain_steps = args.calibrated_steps = 6
        args.skip, args.multiple = 2, 2.0
    common = [
        f"run.cache_dir={args.cache_dir}",
        "run.progress=false",
        "learner.eval_every=0",  # no held-out evaluation inside the timed steps
        "learner.checkpoint_every=0",
        "learner.replay_log=false",
        *args.extra,
    ]
    work = Path(tempfile.mkdtemp(prefix="opd-bench-pipeline-"))
    started = time.time()
    results: dict = {
        "benchmark": "pipeline",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": str(CONFIG.relative_to(REPO)),
        "overrides": args.extra,
        "skip": args.skip,
        "multiple": args.multiple,
        "smoke": args.smoke,
        "settings": {},
        "ratios": {},
    }
    service: dict[str, float] = {}
    for setting, steps in (("plain", args.plain_steps), ("calibrated", args.calibrated_steps)):
        results["settings"][setting] = {}
        for mode in MODES:
            overrides = [*common, f"learner.max_steps={steps}", f"pipeline.mode={mode}"]
            if setting == "calibrated":
                overrides += [f"pipeline.service_time.{s}_ms_per_token={service[s]:.4f}" for s in STAGES]
            print(f"[{time.time() - started:5.0f}s] {setting} {mode}: {steps} steps ...", flush=True)
            run = run_opd(overrides, work / f"{setting}-{mode}", timeout_s=900)
            m = steady(run["records"], args.skip)
            m["load_1min_mean"] = sum(run["load_1min"]) / max(len(run["load_1min"]), 1)
            m["load_1min_max"] = max(run["load_1min"], default=0.0)
            m["opd_run_wall_s"] = run["wall_s"]
            m["stage_ms_per_token"] = per_token_ms(run, args.skip)
            results["settings"][setting][mode] = m
            if setting == "plain" and mode == "sync":  # each stage alone on the CPU: its real cost
                service = {s: args.multiple * v for s, v in m["stage_ms_per_token"].items()}
                results["service_time_ms_per_token"] = service
        sync, asyn = results["settings"][setting]["sync"], results["settings"][setting]["async"]
        results["ratios"][setting] = {
            "async_over_sync_tokens_per_s": asyn["trained_tokens_per_s"] / sync["trained_tokens_per_s"],
            "wait_fraction_sync": sync["wait_fraction"],
            "wait_fraction_async": asyn["wait_fraction"],
        }
    # With fixed service times a, s, l per token, lockstep takes a+s+l per batch and a full pipeline max(a, s, l).
    results["ratios"]["calibrated"]["ideal_async_over_sync"] = sum(service.values()) / max(service.values())
    results["wall_seconds"] = time.time() - started

    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"\nwrote {args.out} and {png} in {results['wall_seconds']:.0f}s")
    if args.keep_runs:
        print(f"run directories: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
