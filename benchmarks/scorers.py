"""Scored tokens/s with 1, 2 and 4 teacher scorer processes, against ideal linear scaling.

    python benchmarks/scorers.py                   # about 4 minutes on a 2-core CPU
    python benchmarks/scorers.py --smoke           # 1 and 2 scorers, few rollouts: checks the script only

Method: one real zmq broker (`opd broker`) and, for each scorer count N, N real `opd scorer --config ... --index i`
processes of configs/tiny.yaml (its 4-layer teacher, top-k 8, scorer.batch_size 64). Once every scorer has logged
`ready` (models loaded, so start-up is not timed), M rollout Trajectories are published to the run's `rollouts`
stream in one go and the clock runs until all M scored copies have been consumed from `scored` by the benchmark
(its own consumer group, acknowledged as they come). The rollouts are built, not sampled: prompts of the task's
training stream, each answered with its correct sum plus EOS (3-4 response tokens, like the student's), so the
teacher does exactly the work it does in a run. Every round uses fresh streams (its own run id).

Settings:
- calibrated (the table that matters): `pipeline.service_time.scorer_ms_per_token` = `--multiple` (default 10) x
  the real per-token cost of one scorer measured first in the plain setting, so scoring is the bottleneck and
  each scorer's real compute is a tenth of its time: N scorers then need about N/10 of a core, and the 2-core CPU
  does not cap what is measured. This is what N scorers on N accelerators look like;
- plain: real compute only; on 2 cores more than two scorer processes can add no compute, and this says so.

Ratio to ideal = tokens/s with N scorers / (N x tokens/s with 1). Writes JSON to --out and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker import connect, stream_name  # noqa: E402
from broker.base import BrokerUnavailable  # noqa: E402
from opd import tasks  # noqa: E402
from opd.config import Config, dump_config, load_config  # noqa: E402
from opd.models.builds import ensure_assets  # noqa: E402
from opd.models.loading import encode_prompt, load_tokenizer  # noqa: E402
from opd.protocol import Trajectory, encode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollouts(cfg: Config, count: int, run_id: str) -> tuple[list[bytes], int]:
    """`count` encoded rollouts like an actor's (correct answer + EOS as the response) and their response tokens."""
    assets = ensure_assets(cfg, log=lambda *_: None)
    tok = load_tokenizer(assets.student.tokenizer)
    problems = tasks.training_stream(cfg.task, seed=4242)
    payloads, tokens = [], 0
    for i in range(count):
        p = next(problems)
        response = [*tok(p.answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        response = response[: cfg.sampling.max_new_tokens]
        tokens += len(response)
        payloads.append(
            encode(
                Trajectory(
                    run_id=run_id,
                    prompt_id=p.prompt_id,
                    group_id=f"bench-{i}",
                    sample_index=0,
                    prompt_token_ids=np.asarray(encode_prompt(tok, p.prompt), dtype=np.int32),
                    response_token_ids=np.asarray(response, dtype=np.int32),
                    behaviour_logprobs=np.full(len(response), -1.0, dtype=np.float32),
                    policy_version=0,
                    finish_reason="stop",
                    task={"answer": p.answer or ""},
                )
            )
        )
    return payloads, tokens


class Broker:
    """`opd broker` on a free port, for the whole benchmark."""

    def __init__(self, cfg: Config, work: Path):
        path = work / "broker.yaml"
        path.write_text(dump_config(cfg))
        log = open(work / "broker.log", "w")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opd", "broker", "--config", str(path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.client = connect(cfg.broker)
        self.client.timeout_s = 1.0
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.ping()
                break
            except BrokerUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the broker did not start; see {work / 'broker.log'}") from None
        self.client.timeout_s = cfg.broker.request_timeout_s

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_scorers(n: int, path: Path, run_id: str, work: Path) -> list[subprocess.Popen]:
    """n `opd scorer` processes; returns once every one has loaded its teacher and logged `ready`."""
    procs, logs = [], []
    for i in range(n):
        logs.append(work / f"{run_id}-scorer-{i}.log")
        with open(logs[-1], "w") as fh:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "opd", "scorer", "--config", str(path), "--index", str(i)],
                    cwd=REPO,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + 300
    while not all("ready:" in log.read_text() for log in logs):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            stop_all(procs)
            raise RuntimeError(f"a scorer did not start: {[log.read_text()[-2000:] for log in logs]}")
        time.sleep(0.2)
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def time_scoring(
    client, run_id: str, payloads: list[bytes], procs: list[subprocess.Popen]
) -> tuple[float, list]:
    """Publish every rollout, then consume until all scored copies are back: (seconds, load samples)."""
    scored = stream_name(run_id, "scored")
    client.skip_to_end(scored, "bench")
    loads = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    for i in range(0, len(payloads), 256):
        client.publish(stream_name(run_id, "rollouts"), payloads[i : i + 256])
    got, last_load = 0, time.monotonic()
    while got < len(payloads):
        msgs = client.consume(scored, "bench", "bench", 512, 1.0)
        if msgs:
            client.ack(scored, "bench", [m.id for m in msgs])
            got += len(msgs)
        if time.monotonic() - last_load > 1.0:
            loads.append(os.getloadavg()[0])
            last_load = time.monotonic()
        if time.perf_counter() - t0 > 600 or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"scoring stalled at {got}/{len(payloads)}")
    return time.perf_counter() - t0, loads


def measure(base: Config, broker: Broker, n: int, ms_per_token: float, count: int, work: Path) -> dict:
    """Start n scorers, wait until all are ready, publish `count` rollouts, time until all are scored."""
    run_id = f"bench-scorers-{n}-{time.time_ns() % 10**9}"
    cfg = base.model_copy(deep=True)
    cfg.run.run_id = run_id
    cfg.pipeline.service_time.scorer_ms_per_token = ms_per_token
    path = work / f"{run_id}.yaml"
    path.write_text(dump_config(cfg))
    payloads, tokens = rollouts(base, count, run_id)
    procs = start_scorers(n, path, run_id, work)
    try:
        seconds, loads = time_scoring(broker.client, run_id, payloads, procs)
    finally:
        stop_all(procs)
    return {
        "scorers": n,
        "trajectories": count,
        "tokens": tokens,
        "seconds": seconds,
        "scored_tokens_per_s": tokens / seconds,
        "load_1min_mean": sum(loads) / len(loads),
    }


def plot(results: dict, path: Path) -> None:
    """Speed-up over one scorer against N, with the ideal line: both settings on one readable scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = results["scorer_counts"]
    ax.plot(ns, ns, "--", color="grey", label="ideal (N x 1 scorer)")
    for setting, rows in results["settings"].items():
        one = rows[0]["scored_tokens_per_s"]
        ax.plot(
            [r["scorers"] for r in rows],
            [r["scored_tokens_per_s"] / one for r in rows],
            "o-",
            label=f"{setting} (1 scorer: {one:.0f} tok/s)",
        )
    ax.set_xlabel("teacher scorer processes")
    ax.set_ylabel("scored tokens/s, x that of 1 scorer")
    ax.set_xticks(ns)
    ax.set_title(f"scorer scaling ({results['machine']['cpus']} CPUs, tiny teacher)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(results: dict, multiple: float) -> None:
    print(
        f"\nreal cost of one scorer {results['real_ms_per_token']:.3f} ms/token; calibrated service time "
        f"{results['service_time_ms_per_token']:.3f} ms/token ({multiple:g} x)"
    )
    print(
        "\n| setting | scorers | rollouts | seconds | scored tok/s | speedup vs 1 | ratio to ideal | load (1 min) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for setting, rows in results["settings"].items():
        for r in rows:
            print(
                f"| {setting} | {r['scorers']} | {r['trajectories']} | {r['seconds']:.1f} "
                f"| {r['scored_tokens_per_s']:.0f} | {r['speedup']:.2f} | {r['ratio_to_ideal']:.2f} "
                f"| {r['load_1min_mean']:.1f} |"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scorers.json")
    p.add_argument(
        "--cache-dir", default=".cache/opd", help="run.cache_dir (built models; built on first use)"
    )
    p.add_argument("--scorers", default="1,2,4", help="scorer counts to measure")
    p.add_argument("--plain-rollouts", type=int, default=4096, help="rollouts per plain measurement")
    p.add_argument(
        "--calibrated-rollouts", type=int, default=2048, help="rollouts per calibrated measurement"
    )
    p.add_argument(
        "--multiple", type=float, default=10.0, help="service time = this x one scorer's real cost"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="1 and 2 scorers, 128 rollouts, --multiple 2: checks the script only",
    )
    args = p.parse_args(argv)
    counts = [int(x) for x in args.scorers.split(",")]
    # --smoke: every path once at the least cost (a small multiple keeps the calibrated rounds short)
    if args.smoke:
        counts, args.plain_rollouts, args.calibrated_rollouts, args.multiple = [1, 2], 128, 128, 2.0
    work = Path(tempfile.mkdtemp(prefix="opd-bench-scorers-"))
    base = load_config(
        CONFIG, [f"run.cache_dir={args.cache_dir}", f"broker.port={free_port()}", "broker.max_depth=100000"]
    )
    base.run.output_dir = work / "run"
    base.run.run_id = "bench-scorers"  # the broker's; each round's scorers get their own (fresh streams)
    started = time.time()

    broker = Broker(base, work)
    results: dict = {
        "benchmark": "scorers",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": str(CONFIG.relative_to(REPO)),
        "scorer_counts": counts,
        "multiple": args.multiple,
        "smoke": args.smoke,
        "settings": {},
    }
    try:
        plain = []
        for n in counts:
            print(f"[{time.time() - started:5.0f}s] plain, {n} scorer(s) ...", flush=True)
            plain.append(measure(base, broker, n, 0.0, args.plain_rollouts, work))
        results["settings"]["plain"] = plain
        one = next(r for r in plain if r["scorers"] == 1) if 1 in counts else plain[0]
        # one scorer's whole cost per token (teacher forward + its broker round trips), alone on the CPU
        real_ms = 1000.0 / one["scored_tokens_per_s"]
        service = args.multiple * real_ms
        results["real_ms_per_token"] = real_ms
        results["service_time_ms_per_token"] = service
        calibrated = []
        for n in counts:
            print(
                f"[{time.time() - started:5.0f}s] calibrated ({service:.2f} ms/token), {n} scorer(s) ...",
                flush=True,
            )
            calibrated.append(measure(base, broker, n, service, args.calibrated_rollouts, work))
        results["settings"]["calibrated"] = calibrated
    finally:
        broker.close()
    for rows in results["settings"].values():
        for r in rows:
            r["ratio_to_ideal"] = r["scored_tokens_per_s"] / (r["scorers"] * rows[0]["scored_tokens_per_s"])
            r["speedup"] = r["scored_tokens_per_s"] / rows[0]["scored_tokens_per_s"]
    results["wall_seconds"] = time.time() - started

    print_tables(results, args.multiple)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"\nwrote {args.out} and {png} in {results['wall_seconds']:.0f}s")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
