"""Throughput and latency of the broker for real trajectory messages, next to the generation time they carry.

    python3 benchmarks/broker.py                      # zmq, redis, redis-aof x 1k/8k/32k tokens x top-k 0/20
    python3 benchmarks/broker.py --smoke              # 1k only, few messages (< 45 s)
    python3 benchmarks/broker.py --lengths 1k,8k --configs zmq,redis --target-mb 100 --gen-full-max 1k

Why: every trajectory crosses the broker twice (rollouts, then scored), so the question is whether that hop is
a noticeable share of what the trajectory cost to generate. Each cell measures the path one hop takes in a run:

- producer process: `encode(Trajectory)` (as the actor does) and `publish_with_backpressure` in batches of
  `--batch` (the actor's prompts_per_batch), waiting while the stream holds `broker.max_depth` entries;
- consumer process: `consume` by consumer group (`--consume-count`, the learner's batch size), `decode` with
  `vocab_size` and `require_scored` (full validation), then `ack`.

Brokers: the embedded ZeroMQ broker started as the launcher starts it (`python -m opd broker --config`),
and a real `redis-server` on a free port in a temp dir, with AOF off (`--appendonly no --save ""`) or on
(`--appendonly yes --appendfsync everysec`, the AOF file in that dir). Messages are "scored" messages: prompt
(`--prompt-len` int32), response ids (int32), behaviour and teacher logprobs (float32) and, with top-k,
`teacher_topk_ids` int32 [T, k] + `teacher_topk_logprobs` float32 [T, k]. The rollout message an actor sends is
the no-top-k message less 4 bytes per token.

Definitions (1 MB = 10^6 bytes; 1k = 1024 tokens):
- traj/s, MB/s: steady state of the pipelined run, from the consumer's ack of message `warm-up` to its ack of
  the last one (all processes started and warm); MB are encoded payload bytes.
- pipelined ms/traj = 1000 / traj/s: the wall per trajectory the broker path (encode, transport, decode,
  validation, ack) costs when it keeps up with a stream, with producer and consumer overlapping.
- latency ms: one message at a time, from before `encode` in the producer to after `ack` returns in the
  consumer (the system-wide monotonic clock of both processes); median of `--latency-count`.
- generation s/traj: our student sampler (`opd.models.sampler.sample`, what actors.engines.hf.HFEngine calls), batch of
  1, the project's tiny student shape (configs/tiny.yaml, random init), one torch thread as components run,
  prompt of `--prompt-len` tokens, EOS disabled so every response has exactly T tokens. Lengths up to
  `--gen-full-max` are generated in full; longer ones are estimated (and marked so) as the full run at the
  largest measured length plus the per-token decode cost measured at context positions every 8k up to T
  (prefill to that position, then `--probe-tokens` decode steps), integrated piecewise linearly.
- fraction = broker time per trajectory / generation time per trajectory, for one hop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This file is named like the `broker` package: drop its own directory so `import broker` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from broker import connect, publish_with_backpressure, stream_name  # noqa: E402
from opd.config import dump_config, load_config  # noqa: E402
from opd.protocol import Trajectory, decode, encode  # noqa: E402

VOCAB = 32000  # a realistic vocabulary for the ids in the messages (payload size does not depend on it)
REDIS_ARGS = {
    "redis": ["--appendonly", "no", "--save", ""],
    "redis-aof": ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
}
CONFIGS = ("zmq", "redis", "redis-aof")


def parse_tokens(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ messages
def make_trajectory(length: int, topk: int, prompt_len: int, seed: int = 0) -> Trajectory:
    """A scored trajectory with plausible values (ids in the vocabulary, logprobs <= 0) so validation passes."""
    rng = np.random.default_rng(seed)
    lp = lambda *shape: -rng.exponential(1.0, shape).astype(np.float32)  # noqa: E731
    t = Trajectory(
        run_id="bench",
        prompt_id="p0",
        group_id="g0",
        sample_index=0,
        prompt_token_ids=rng.integers(0, VOCAB, prompt_len, dtype=np.int32),
        response_token_ids=rng.integers(0, VOCAB, length, dtype=np.int32),
        behaviour_logprobs=lp(length),
        policy_version=1,
        teacher_logprobs=lp(length),
        teacher_id="teacher-0",
        teacher_temperature=1.0,
        task={"answer": "42"},
    )
    if topk:
        t.teacher_topk_ids = rng.integers(0, VOCAB, (length, topk), dtype=np.int32)
        t.teacher_topk_logprobs = np.sort(lp(length, topk), axis=1)[:, ::-1].copy()
    return t


# ------------------------------------------------------------------------------------------------ brokers
class BrokerServer:
    """One broker for a config: the zmq broker process as `opd run` starts it, or a redis-server in a temp dir."""

    def __init__(
        self, kind: str, workdir: Path, redis_server: str = "redis-server", overrides: tuple[str, ...] = ()
    ):
        """`overrides`: more config settings (`broker.max_depth=256`), for the broker process and its clients."""
        self.kind, self.workdir = kind, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "server.log", "ab")  # noqa: SIM115
        overrides = ["run.run_id=bench", f"run.output_dir={workdir}", *overrides]
        if kind == "zmq":
            overrides.append(f"broker.port={free_port()}")
        else:
            port = free_port()
            overrides += ["broker.type=redis", f"broker.url=redis://127.0.0.1:{port}/0"]
            cmd = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
            self.proc = subprocess.Popen(cmd + REDIS_ARGS[kind], stdout=self.log, stderr=subprocess.STDOUT)
        self.cfg = load_config(None, overrides)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(dump_config(self.cfg))
        if kind == "zmq":  # the launcher's _spawn + _start_zmq_broker
            env = {**os.environ, "OPD_PARENT_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
            cmd = [sys.executable, "-m", "opd", "broker", "--config", str(self.config_path)]
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        from broker import BrokerUnavailable

        client = connect(self.cfg.broker)
        client.timeout_s = 1.0
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except (BrokerUnavailable, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.kind} broker did not start; see {self.workdir}/server.log"
                    ) from None
                time.sleep(0.1)
        client.close()

    def aof_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.workdir.rglob("*.aof*") if f.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# ------------------------------------------------------------------------------------------------ workers
def producer(spec: dict, peer) -> None:
    """Actor side: encode each trajectory (a fresh id each), publish in batches with backpressure."""
    broker = connect(load_config(spec["config_path"]).broker)
    stream, base = spec["stream"], make_trajectory(spec["length"], spec["topk"], spec["prompt_len"])
    fresh = lambda: dataclasses.replace(base, id=uuid.uuid4().hex, timestamps={"generated": time.time()})  # noqa: E731
    encode_s, left = 0.0, spec["n"]
    while left:
        t0 = time.perf_counter()
        payloads = [encode(fresh()) for _ in range(min(spec["batch"], left))]
        encode_s += time.perf_counter() - t0
        publish_with_backpressure(broker, stream, payloads)
        left -= len(payloads)
    peer.recv()  # the consumer has acknowledged everything: the stream is empty again
    latencies = []
    for _ in range(spec["latency_n"]):
        t0 = time.monotonic()
        publish_with_backpressure(broker, stream, [encode(fresh())])
        latencies.append(peer.recv() - t0)
    peer.send({"encode_s": encode_s, "latencies": latencies})
    broker.close()


def consumer(spec: dict, peer, jobs) -> dict:
    """Scorer/learner side: consume by group, decode with full validation, acknowledge."""
    broker, stream = connect(load_config(spec["config_path"]).broker), spec["stream"]
    broker.consume(stream, "bench", "c0", 1, 0.0)  # creates the group before the first publish
    jobs.send("ready")

    def take(count: int) -> tuple[int, int, float]:
        msgs = broker.consume(stream, "bench", "c0", count, 1.0)
        t0 = time.perf_counter()
        for m in msgs:
            decode(m.data, vocab_size=VOCAB, require_scored=True)
        dt = time.perf_counter() - t0
        broker.ack(stream, "bench", [m.id for m in msgs])
        return len(msgs), sum(len(m.data) for m in msgs), dt

    done, nbytes, decode_s, t_warm, warm_bytes, warm_done = 0, 0, 0.0, None, 0, 0
    while done < spec["n"]:
        k, b, dt = take(min(spec["consume_count"], spec["n"] - done))
        done, nbytes, decode_s = done + k, nbytes + b, decode_s + dt
        if t_warm is None and done >= spec["warmup"]:
            t_warm, warm_done, warm_bytes = time.monotonic(), done, nbytes
    t_end = time.monotonic()
    peer.send("drained")
    got = 0
    while got < spec["latency_n"]:
        k, _, _ = take(1)
        if k:
            got += 1
            peer.send(time.monotonic())
    prod = peer.recv()
    broker.close()
    return {
        "steady_n": done - warm_done,
        "steady_s": t_end - t_warm,
        "steady_bytes": nbytes - warm_bytes,
        "decode_s": decode_s,
        "n": done,
        **prod,
    }


def worker(role: str, jobs, peer) -> None:
    """A producer or consumer process kept for every cell, so each cell pays no process start-up."""
    while (spec := jobs.recv()) is not None:
        if role == "producer":
            producer(spec, peer)
        else:
            jobs.send(consumer(spec, peer, jobs))


class Workers:
    """One producer and one consumer process (spawned, so they share nothing with this one but the pipes)."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        a, b = ctx.Pipe()
        self.jobs, self.procs = {}, []
        for role, peer in (("producer", b), ("consumer", a)):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(role, theirs, peer), name=role, daemon=True)
            proc.start()
            self.jobs[role] = mine
            self.procs.append(proc)

    def _recv(self, role: str, timeout_s: float):
        if not self.jobs[role].poll(timeout_s):
            dead = [p.name for p in self.procs if not p.is_alive()]
            raise RuntimeError(f"no answer from the {role} in {timeout_s:.0f}s (dead: {dead or 'none'})")
        return self.jobs[role].recv()

    def run(self, spec: dict) -> dict:
        self.jobs["consumer"].send(spec)
        if self._recv("consumer", 120) != "ready":
            raise RuntimeError("the consumer did not get ready")
        self.jobs["producer"].send(spec)
        return self._recv("consumer", max(600, spec["n"]))

    def close(self) -> None:
        for conn in self.jobs.values():
            conn.send(None)
        for p in self.procs:
            p.join(30)


# ------------------------------------------------------------------------------------------------ generation
def _student(max_positions: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.models.loading import build_char_tokenizer

    tok = build_char_tokenizer()
    s = load_config(REPO / "configs" / "tiny.yaml").student
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    shape = (
        f"Llama {s.num_layers} layers, hidden {s.hidden_size}, MLP {s.intermediate_size}, vocab {len(tok)}"
    )
    return LlamaForCausalLM(config).eval(), tok, shape


def measure_generation(lengths: list[int], prompt_len: int, full_max: int, probe_tokens: int) -> dict:
    """Seconds per trajectory of our sampler at each length: measured in full up to full_max, else estimated."""
    import torch

    from opd.models.sampler import sample

    torch.set_num_threads(1)  # run.torch_threads: each component process has one thread
    model, tok, shape = _student(prompt_len + max(lengths) + probe_tokens + 16)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, len(tok), (n,), generator=g).tolist()

    def gen(p: list[int], n: int) -> float:  # eos_id -1 never matches: every response is n tokens long
        t0 = time.perf_counter()
        (s,) = sample(model, [p], eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=n, generator=g)
        assert len(s.response_ids) == n
        return time.perf_counter() - t0

    def step_cost(position: int) -> float:
        """Seconds of one decode step (forward + sampling) with `position` response tokens already in context."""
        stamps: list[float] = []
        hook = model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
        try:
            gen(
                prompt(prompt_len + position), probe_tokens + 1
            )  # one prefill forward, then probe_tokens steps
            end = time.perf_counter()
        finally:
            hook.remove()
        return (end - stamps[1]) / probe_tokens

    probes: dict[int, float] = {}

    def estimate(n: int, base: int, base_s: float) -> tuple[float, list[int]]:
        """The `base` run plus the per-step cost probed every 8k from base to n, integrated (trapezoids)."""
        points = sorted({base, n, *range(base - base % 8192 + 8192, n, 8192)})
        for p in points:
            if p not in probes:
                probes[p] = step_cost(p)
        area = sum((b - a) * (probes[a] + probes[b]) / 2 for a, b in zip(points, points[1:], strict=False))
        return base_s + area, points

    gen(prompt(prompt_len), 16)  # warm-up
    out = {"model": shape, "prompt_len": prompt_len, "batch": 1, "torch_threads": 1, "lengths": {}}
    measured = {n: gen(prompt(prompt_len), n) for n in sorted(set(lengths)) if n <= full_max}
    for n, s in measured.items():
        out["lengths"][str(n)] = {"seconds": s, "how": "measured", "ms_per_token": 1e3 * s / n}
    for n in sorted(set(lengths) - set(measured)):
        base = max([m for m in measured if m < n], default=0)
        est, points = estimate(n, base, measured.get(base, 0.0))
        out["lengths"][str(n)] = {
            "seconds": est,
            "how": f"estimated: measured {fmt_tokens(base)} run + decode step cost probed at "
            + ", ".join(fmt_tokens(p) for p in points),
            "ms_per_token": 1e3 * est / n,
        }
    if len(measured) >= 2:  # the same estimate for a length that was also generated in full, as a check
        small, big = sorted(measured)[-2:]
        est, _ = estimate(big, small, measured[small])
        out["check"] = {"length": big, "from": small, "estimated_s": est, "measured_s": measured[big]}
    out["probe_ms_per_step"] = {fmt_tokens(p): 1e3 * c for p, c in sorted(probes.items())}
    return out


# ------------------------------------------------------------------------------------------------ report
def count_for(msg_bytes: int, args) -> int:
    return max(args.min_count, min(args.max_count, int(args.target_mb * 1e6 / msg_bytes)))


def table(cells: list[dict]) -> str:
    head = (
        "| broker | T | top-k | msg MB | traj/s | MB/s | pipelined ms/traj | latency ms (p50) | "
        "encode ms | decode ms | broker µs/token | generation s/traj | broker/gen (pipelined) | broker/gen (latency) |"
    )
    rows = [head, "|" + " --- |" * 2 + " ---: |" * 12]
    for c in cells:
        rows.append(
            f"| {c['broker']} | {fmt_tokens(c['length'])} | {c['topk']} | {c['msg_mb']:.3f} | {c['traj_per_s']:.1f} | "
            f"{c['mb_per_s']:.1f} | {c['pipelined_ms']:.2f} | {c['latency_ms_p50']:.2f} | {c['encode_ms']:.2f} | "
            f"{c['decode_ms']:.2f} | {c['us_per_token']:.2f} | {c['generation_s']:.2f}{'' if c['generation_measured'] else '*'} | "
            f"{c['fraction_pipelined']:.2e} | {c['fraction_latency']:.2e} |"
        )
    return "\n".join(rows)


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(c["length"], c["topk"]) for c in cells})
    brokers = [b for b in CONFIGS if any(c["broker"] == b for c in cells)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(brokers)
    for j, b in enumerate(brokers):
        by = {(c["length"], c["topk"]): c for c in cells if c["broker"] == b}
        xs = [i + j * width for i in range(len(groups))]
        axes[0].bar(xs, [by[g]["mb_per_s"] if g in by else 0 for g in groups], width, label=b)
        axes[1].bar(xs, [by[g]["fraction_pipelined"] if g in by else 0 for g in groups], width, label=b)
    estimated = {c["length"] for c in cells if not c.get("generation_measured", True)}
    labels = [f"{fmt_tokens(n)}{'*' if n in estimated else ''}\ntop-k {k}" for n, k in groups]
    for ax in axes:
        ax.set_xticks([i + width * (len(brokers) - 1) / 2 for i in range(len(groups))], labels)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("MB/s (payload, pipelined steady state)")
    axes[0].set_title("Broker throughput")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("broker ms/traj ÷ generation ms/traj")
    axes[1].set_title("One broker hop vs tiny-CPU-student generation (upper bound)")
    if estimated:
        axes[1].set_xlabel("* generation time estimated from decode-cost probes, not generated in full")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="of zmq, redis, redis-aof")
    ap.add_argument("--lengths", default="1k,8k,32k", help="response lengths in tokens (1k = 1024)")
    ap.add_argument("--topk", type=int, default=20, help="top-k of the top-k cells (0: no top-k cells only)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--target-mb", type=float, default=800, help="payload per pipelined cell (then clamped)")
    ap.add_argument("--min-count", type=int, default=60, help="fewest messages per pipelined cell")
    ap.add_argument("--max-count", type=int, default=5000, help="most messages per pipelined cell")
    ap.add_argument("--latency-count", type=int, default=30, help="one-at-a-time messages per cell")
    ap.add_argument("--batch", type=int, default=8, help="trajectories per publish (actor.prompts_per_batch)")
    ap.add_argument("--consume-count", type=int, default=32, help="entries per consume (learner.batch_size)")
    ap.add_argument(
        "--gen-full-max", default="8k", help="longest length generated in full; longer: estimated"
    )
    ap.add_argument("--probe-tokens", type=int, default=64, help="decode steps per position probe")
    ap.add_argument("--smoke", action="store_true", help="1k only, few messages: a quick check (< 45 s)")
    ap.add_argument(
        "--redis-server", default=shutil.which("redis-server") or "redis-server", help="its binary"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "broker.json")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.min_count, args.max_count, args.latency_count = "1k", 30, 30, 5
    args.length_list = [parse_tokens(x) for x in args.lengths.split(",")]
    args.kinds = [k.strip() for k in args.configs.split(",")]
    unknown = set(args.kinds) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown --configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    args.topks = [0, args.topk] if args.topk else [0]
    return args


def bench_cell(workers: Workers, server: BrokerServer, length: int, topk: int, args) -> dict:
    msg = len(encode(make_trajectory(length, topk, args.prompt_len)))
    n = count_for(msg, args)
    spec = {
        "config_path": str(server.config_path),
        "stream": stream_name(f"bench-{uuid.uuid4().hex[:8]}", "scored"),
        "length": length,
        "topk": topk,
        "prompt_len": args.prompt_len,
        "n": n,
        "warmup": max(3, n // 10),
        "batch": args.batch,
        "consume_count": args.consume_count,
        "latency_n": args.latency_count,
    }
    r = workers.run(spec)
    traj_s = r["steady_n"] / r["steady_s"]
    lat = sorted(r["latencies"])
    cell = {
        "broker": server.kind,
        "length": length,
        "topk": topk,
        "msg_bytes": msg,
        "msg_mb": msg / 1e6,
        "messages": n,
        "steady_messages": r["steady_n"],
        "traj_per_s": traj_s,
        "mb_per_s": r["steady_bytes"] / r["steady_s"] / 1e6,
        "pipelined_ms": 1e3 / traj_s,
        "us_per_token": 1e6 / traj_s / length,
        "latency_ms_p50": 1e3 * statistics.median(lat),
        "latency_ms_p90": 1e3 * lat[int(0.9 * (len(lat) - 1))],
        "encode_ms": 1e3 * r["encode_s"] / n,
        "decode_ms": 1e3 * r["decode_s"] / r["n"],
    }
    print(
        f"{server.kind:9s} {fmt_tokens(length):>4s} top-k {topk:2d}: {msg / 1e6:7.3f} MB x {n:5d}  "
        f"{traj_s:8.1f} traj/s {cell['mb_per_s']:7.1f} MB/s  latency {cell['latency_ms_p50']:.2f} ms",
        flush=True,
    )
    return cell


def run_brokers(args, loads: list[float]) -> tuple[list[dict], dict]:
    cells, aof = [], {}
    workers = Workers()
    try:
        with tempfile.TemporaryDirectory(prefix="opd-bench-broker-") as tmp:
            for kind in args.kinds:
                server = BrokerServer(kind, Path(tmp) / kind, args.redis_server)
                try:
                    for length in args.length_list:
                        for topk in args.topks:
                            cells.append(bench_cell(workers, server, length, topk, args))
                            loads.append(os.getloadavg()[0])
                    if kind == "redis-aof":
                        aof = {"aof_mb_at_end": server.aof_bytes() / 1e6}
                        print(
                            f"redis-aof: {aof['aof_mb_at_end']:.1f} MB of AOF on disk at the end", flush=True
                        )
                finally:
                    server.stop()
    finally:
        workers.close()
    return cells, aof


def report(result: dict, out: Path, png: Path) -> None:
    gen = result["generation"]
    print()
    print(table(result["cells"]))
    print()
    for n, g in gen["lengths"].items():
        print(
            f"generation {fmt_tokens(int(n))}: {g['seconds']:.2f} s ({g['ms_per_token']:.2f} ms/token), {g['how']}"
        )
    if gen.get("probe_ms_per_step"):
        print(
            "decode step cost by position (ms):",
            {k: round(v, 2) for k, v in gen["probe_ms_per_step"].items()},
        )
    if gen.get("check"):
        c = gen["check"]
        print(
            f"check of the estimate: {fmt_tokens(c['length'])} from the {fmt_tokens(c['from'])} run + probes "
            f"{c['estimated_s']:.1f} s, generated in full {c['measured_s']:.1f} s"
        )
    print(
        (
            "\n* estimated, not generated in full (see above). "
            if any(not c["generation_measured"] for c in result["cells"])
            else "\n"
        )
        + f"Generation is our sampler on {gen['model']}, batch 1, "
        "on this CPU: a lower bound of the per-sequence generation time of a real student, so broker/gen is an "
        "upper bound for one sequence. Batched GPU decoding spreads generation over many sequences: compare "
        "'broker µs/token' with your own decode µs per token per sequence (batch step time / batch size). "
        "Each trajectory crosses the broker twice in a run (rollouts, then scored)."
    )
    load = result["load_average_1m"]
    print(
        f"\nload average (1 min) {load['min']:.2f}-{load['max']:.2f}; wall {result['wall_seconds']['total']:.0f} s; "
        f"JSON {out}; plot {png}"
    )


def main() -> int:
    args = parse_args()
    started, loads = time.time(), [os.getloadavg()[0]]
    cells, aof = run_brokers(args, loads)
    broker_s = time.time() - started
    print("generation (our sampler, tiny student, 1 thread, batch 1) ...", flush=True)
    gen = measure_generation(
        args.length_list, args.prompt_len, parse_tokens(args.gen_full_max), args.probe_tokens
    )
    loads.append(os.getloadavg()[0])
    for c in cells:
        g = gen["lengths"][str(c["length"])]
        c["generation_s"], c["generation_measured"] = g["seconds"], g["how"] == "measured"
        c["fraction_pipelined"] = c["pipelined_ms"] / 1e3 / g["seconds"]
        c["fraction_latency"] = c["latency_ms_p50"] / 1e3 / g["seconds"]
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_average_1m": {"samples": loads, "min": min(loads), "max": max(loads)},
        "wall_seconds": {"broker": broker_s, "total": time.time() - started},
        "args": {k: str(v) for k, v in vars(args).items()},
        "vocab_size": VOCAB,
        "generation": gen,
        **aof,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    png = args.plot or args.out.with_suffix(".png")
    plot(cells, png)
    report(result, args.out, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
