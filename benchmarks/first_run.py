"""The first run as a newcomer meets it: `opd run configs/tiny.yaml`, idle and beside one CPU-bound process.

    python benchmarks/first_run.py            # two whole demos, about 3 minutes on a 2-core CPU
    python benchmarks/first_run.py --venv     # first a fresh clone, a new venv and `pip install -e .` (timed)
    python benchmarks/first_run.py --smoke    # 3 learner steps per run: checks the script, measures little

Issue 15's targets, each printed with PASS or FAIL: on a 2-core machine, the first training step printed within
30 s of the command and the whole demo within 2 minutes when the machine is idle; with one other CPU-bound
process running (a busy loop this script starts, and stops by its pid), each at most 2x the idle figure. Both
runs are made here, one after the other, so the ratio compares like with like; the machine (cores, platform) and
its load average before and during each run are printed with them, because on a shared machine they explain the
figures. The command is the user's, run as a subprocess into a temporary run directory, with one override:
`run.status_every=1`, so the first step's status line is printed when it happens (by default the first line
comes at step 10; on a terminal a progress bar shows step 1 at once). "First step" is when that line reached
this script; the learner's own time of its first step (metrics.jsonl) is printed beside it.

The child gets the caller's environment less OMP_NUM_THREADS and PYTHONPATH: a newcomer sets neither, and the
product chooses its own thread counts (opd.runtime.threads). This is a benchmark, not a test: nothing here runs
under pytest, and a FAIL is a finding to report, not a broken build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_STEP_TARGET_S = 30.0
WHOLE_TARGET_S = 120.0
BUSY_RATIO_TARGET = 2.0
STEP_LINE = re.compile(r"^step \d+/\d+ ")
BUSY_LOOP = "while True:\n    pass\n"
BUSY_LOAD = 0.5  # a 1-minute load average above this before the idle run: other processes were running


def user_env() -> dict[str, str]:
    """The caller's environment as a newcomer's shell would have it: no thread count, no PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}


def timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[float, str]:
    """Run a setup command; its wall seconds and the end of its output (RuntimeError if it fails)."""
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return time.monotonic() - t0, out.stdout[-500:]


def fresh_install(work: Path) -> tuple[list[str], Path, dict[str, float]]:
    """A clone of this repository's HEAD commit (uncommitted changes are not in it), a new venv and `pip install -e .` into it, as the README's Quick start
    says; the `opd` command it installed, the clone, and how long each part took."""
    clone, venv = work / "clone", work / "venv"
    env = user_env()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    took = {"git clone": timed(["git", "clone", "-q", str(REPO), str(clone)], work, env, 600)[0]}
    timed(
        ["git", "checkout", "-q", head], clone, env, 60
    )  # this worktree's commit, whatever the clone's HEAD
    took["python -m venv"] = timed([sys.executable, "-m", "venv", str(venv)], work, env, 600)[0]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", "."]
    took["pip install -e ."] = timed(pip, clone, env, 1800)[0]
    return [str(venv / "bin" / "opd")], clone, took


def run_demo(opd: list[str], cwd: Path, out_dir: Path, extra: list[str], timeout_s: float) -> dict:
    """One `opd run configs/tiny.yaml` into `out_dir`: when its first step line came, its wall time, the load."""
    cmd = [*opd, "run", "configs/tiny.yaml", f"run.output_dir={out_dir}", "run.status_every=1", *extra]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    first: list[float] = []
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def read() -> None:
        for line in proc.stdout:
            if not first and STEP_LINE.match(line):
                first.append(time.monotonic() - t0)
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    loads = []
    while proc.poll() is None and time.monotonic() - t0 < timeout_s:
        loads.append(os.getloadavg()[0])
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    whole = time.monotonic() - t0
    reader.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{''.join(lines[-30:])}")
    return {
        "first_step_s": first[0] if first else None,
        "learner_first_step_s": _learner_first_step(out_dir, t0),
        "whole_s": whole,
        "load_before": load_before,
        "load_during": sum(loads) / max(len(loads), 1),
        "done": next((x.strip() for x in reversed(lines) if x.startswith("done in")), ""),
    }


def _learner_first_step(out_dir: Path, t0_monotonic: float) -> float | None:
    """Seconds from the command to the learner's first step record (its wall-clock `time`)."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    first = json.loads(metrics.read_text().splitlines()[0])
    started_wall = time.time() - (time.monotonic() - t0_monotonic)
    return first["time"] - started_wall


def busy_process() -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop), as the issue's trial had beside the demo."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(runs: dict[str, dict], install: dict[str, float] | None, smoke: bool) -> list[str]:
    """The printed table: each figure, its target and PASS/FAIL."""
    idle, busy = runs["idle"], runs["busy"]
    rows = []
    for name, run in runs.items():
        first, whole = run["first_step_s"], run["whole_s"]
        learner = run["learner_first_step_s"]
        rows.append(
            f"| {name} | {first:.1f} | {learner:.1f} | {whole:.1f} | {run['load_before']:.2f} | "
            f"{run['load_during']:.2f} |"
        )
    lines = [
        "| run | first step printed (s) | learner's first step (s) | whole demo (s) | load before | load during |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "| target | measured | verdict |",
        "| --- | ---: | --- |",
        f"| idle: first step printed <= {FIRST_STEP_TARGET_S:.0f} s | {idle['first_step_s']:.1f} s | "
        f"{verdict(idle['first_step_s'] <= FIRST_STEP_TARGET_S)} |",
        f"| idle: whole demo <= {WHOLE_TARGET_S:.0f} s | {idle['whole_s']:.1f} s | "
        f"{verdict(idle['whole_s'] <= WHOLE_TARGET_S)}{' (smoke: not the whole demo)' if smoke else ''} |",
    ]
    for key, what in (("first_step_s", "first step printed"), ("whole_s", "whole demo")):
        ratio = busy[key] / idle[key]
        lines.append(
            f"| one busy process: {what} <= {BUSY_RATIO_TARGET:.0f}x idle | {busy[key]:.1f} s = {ratio:.2f}x | "
            f"{verdict(ratio <= BUSY_RATIO_TARGET)} |"
        )
    lines += ["", *(f"{name}: {run['done']}" for name, run in runs.items())]
    if idle["load_before"] > BUSY_LOAD:
        lines.append(
            f"note: the machine was not idle for the 'idle' run (load average {idle['load_before']:.2f} before it): "
            "other processes shared its cores, so its figures are an upper bound of an idle machine's"
        )
    if install:
        lines += ["", "| fresh install | seconds |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.1f} |" for k, v in install.items()]
    return lines


def measure(work: Path, venv: bool, extra: list[str], timeout_s: float) -> tuple[dict, dict | None]:
    """The two demo runs (idle, then beside a busy process), after a fresh install if `venv`."""
    opd, cwd, install = [sys.executable, "-m", "opd"], REPO, None
    if venv:
        print("fresh clone, new venv, pip install -e . ...", flush=True)
        opd, cwd, install = fresh_install(work)
    runs = {}
    print("opd run configs/tiny.yaml, idle ...", flush=True)
    runs["idle"] = run_demo(opd, cwd, work / "idle", extra, timeout_s)
    busy = busy_process()
    try:
        print(f"opd run configs/tiny.yaml, beside one busy process (pid {busy.pid}) ...", flush=True)
        runs["busy"] = run_demo(opd, cwd, work / "busy", extra, timeout_s)
    finally:
        busy.kill()
        busy.wait()
    return runs, install


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--venv", action="store_true", help="fresh clone + new venv + pip install -e . first (timed)"
    )
    p.add_argument("--smoke", action="store_true", help="3 learner steps per run: checks the script only")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take (default 900)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the run directories (and clone, venv)")
    args = p.parse_args(argv)
    extra = ["learner.max_steps=3"] if args.smoke else []
    print(
        f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="opd-first-run-"))
    try:
        runs, install = measure(work, args.venv, extra, args.timeout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(["", *report(runs, install, args.smoke)]))
    if args.keep:
        print(f"kept: {work}")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "install": install, "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
