"""The learner alone at 1 and 2 ranks: trained tokens/s against linear, the share of step time in the gradient
all-reduce, and the ZeRO-3 parameter gather per weight version against model size.

    python benchmarks/learner_scaling.py          # 5 rounds, 6 timed steps each, 3 model sizes (about 1.5 min here)
    python benchmarks/learner_scaling.py --smoke  # 1 round, 2 steps, 1 size: that the path runs (about 30 s)

It prints its tables (with the machine and its load average) and writes benchmarks/results/learner_scaling.json
and .png (`--out` elsewhere).

What it measures (two learner processes, one torch thread each, joined as the learner joins them:
`learner.ranks.rendezvous` + `RankGroup.join`, gloo; the production engines, `learner.engines.build_engine`):
- scaling (torch engine: replicated weights, one bucketed gradient all-reduce per optimiser step): the same
  global batches (`--batch` scored trajectories of uneven lengths, seeded) trained by one rank, then by two
  (each its token-balanced share), alternating in each round, so both see the same machine load. Trained tok/s =
  response tokens of the timed batches / wall seconds from a barrier to a barrier; ratio to linear = tok/s with 2
  / (2 x tok/s with 1). While one rank trains, the other process waits in a blocking collective (no CPU).
  Two settings: plain (real compute: two ranks share this machine's cores with whatever else runs) and
  calibrated (after its step each rank waits `--calibrate` x its real per-token cost x its tokens, emulating a
  device per rank, so the ratio shows what the split and the all-reduce cost rather than the CPU contention;
  as `pipeline.service_time` does for the run and benchmarks/scorers.py for scorers).
  Communication share = a rank's seconds in the all-reduce (`RankGroup.comm_seconds`, the step record's
  rank_comm_seconds) / its step seconds.
- ZeRO-3 gather (DeepSpeed, 2 ranks): the time to enter `engine.gathered()` (what the publisher times as
  weight_gather_seconds before each weight version goes out), median of `--repeats`, per model size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "learner_scaling.json"
VOCAB = 512  # token ids of the synthetic batches; every model's vocabulary is at least this
# name -> (hidden, layers, intermediate, vocab) of a Llama student
SIZES = {
    "xs": (64, 2, 256, 512),
    "s": (128, 2, 512, 1024),
    "m": (256, 4, 1024, 2048),
}
SCALING_SIZE = "s"
COMMON = ["learner.warmup_steps=0", "learner.micro_batch_size=8", "learner.eval_every=0"]


def make_model(size: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, vocab = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(cfg)


def make_batches(n: int, rows: int, seed: int = 0):
    """n global batches of `rows` scored trajectories, prompts 8-40 and responses 4-64 tokens (uneven, as sampled
    responses are), with behaviour and teacher logprobs."""
    from learner.batching import collate
    from opd.protocol import Trajectory

    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        trajs = []
        for i in range(rows):
            P, T = int(rng.integers(8, 41)), int(rng.integers(4, 65))
            resp = rng.integers(3, VOCAB, size=T).astype(np.int32)
            trajs.append(
                Trajectory(
                    run_id="bench",
                    prompt_id=f"p{b}-{i}",
                    group_id=f"g{b}-{i}",
                    sample_index=0,
                    prompt_token_ids=np.concatenate([[1], rng.integers(3, VOCAB, size=P - 1)]).astype(
                        np.int32
                    ),
                    response_token_ids=resp,
                    policy_version=0,
                    behaviour_logprobs=-rng.exponential(1.5, size=T).astype(np.float32),
                    teacher_logprobs=-rng.exponential(1.0, size=T).astype(np.float32),
                )  # fmt: skip
            )
        out.append((collate(trajs, 0), sum(len(t.response_token_ids) for t in trajs)))
    return out


def config(ranks: int, port: int, *extra: str):
    from opd.config import load_config

    return load_config(None, [*COMMON, f"learner.num_ranks={ranks}", f"learner.master_port={port}",
                              "learner.collective_timeout_s=900", *extra])  # fmt: skip


def train(group, cfg, batches, delay_per_token: float) -> dict:
    """Warm-up step, then the timed steps; this rank's figures."""
    from learner.engines import build_engine

    engine = build_engine(make_model(SCALING_SIZE), cfg, group)
    engine.step(batches[0][0])
    if group is not None:
        group.all_true(True)  # barrier
        group.take_comm_seconds()
    step_s = comm_s = 0.0
    tokens_run = 0
    t0 = time.perf_counter()
    for batch, _ in batches[1:]:
        ts = time.perf_counter()
        engine.step(batch)
        if delay_per_token:
            time.sleep(delay_per_token * engine.rank_tokens)
        step_s += time.perf_counter() - ts
        tokens_run += engine.rank_tokens
        if group is not None:
            comm_s += group.take_comm_seconds()
    if group is not None:
        group.all_true(True)
    wall = time.perf_counter() - t0
    return {"wall": wall, "step_s": step_s, "comm_s": comm_s, "tokens_run": tokens_run}


def scaling(group, port: int, args, batches) -> list[dict]:
    """Rounds of (1 rank, 2 ranks) per setting; rank 0's list of rows (others return [])."""
    rows = []
    trained = sum(t for _, t in batches[1:])
    delay, costs = 0.0, []
    for setting in ("plain", "calibrated"):
        if setting == "calibrated":  # --calibrate x one rank's median per-token cost over the plain rounds
            delay = args.calibrate * statistics.median(costs) if group.leader else None
            delay = json.loads(group.broadcast_bytes(json.dumps(delay).encode() if group.leader else None))
        for rnd in range(args.rounds):
            load = os.getloadavg()[0]
            if group.leader:
                one = train(None, config(1, port), batches, delay)
            group.all_true(True)  # rank 1 waits here while rank 0 trains alone
            two = group.all_gather_obj(train(group, config(2, port), batches, delay))
            if not group.leader:
                continue
            if setting == "plain":
                costs.append(one["step_s"] / one["tokens_run"])
            for ranks, res in ((1, [one]), (2, two)):
                rows.append({
                    "setting": setting, "round": rnd, "ranks": ranks, "tok_s": trained / res[0]["wall"],
                    "comm_share": [r["comm_s"] / r["step_s"] for r in res],
                    "imbalance": max(r["tokens_run"] for r in res) / statistics.mean(r["tokens_run"] for r in res),
                    "load": load, "delay_ms_per_token": delay * 1e3,
                })  # fmt: skip
    return rows


def gathers(group, port: int, args) -> list[dict]:
    """ZeRO-3 gather seconds per size (2 ranks); rank 0's rows."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return []
    from learner.engines import build_engine

    rows = []
    for size in args.sizes:
        model = make_model(size)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        params = sum(p.numel() for p in model.parameters())
        cfg = config(2, port, "learner.engine=deepspeed", "learner.deepspeed.zero_stage=3")
        engine = build_engine(model, cfg, group)
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            group.all_true(True)
            t0 = time.perf_counter()
            with engine.gathered():
                entered = time.perf_counter() - t0
            times.append(entered)
        if group.leader:
            rows.append(
                {"size": size, "params": params, "bytes": nbytes, "seconds": statistics.median(times[1:])}
            )
        del engine, model
    return rows


def run_rank(rank: int, port: int, args, out: str | None = None) -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from learner.ranks import RankGroup, rendezvous

    cfg = config(2, port)
    group = RankGroup.join(rendezvous(cfg.learner, rank), "cpu", cfg.learner.collective_timeout_s)
    batches = make_batches(args.steps + 1, args.batch)
    result = {"scaling": scaling(group, port, args, batches), "gather": gathers(group, port, args)}
    if group.leader and out:
        Path(out).write_text(json.dumps(result))
    group.close()
    if not group.leader:
        # done, and everything it had to say is in rank 0's result: leave without the interpreter's teardown,
        # where DeepSpeed's and gloo's threads have been seen to abort ("terminate called without an active
        # exception") after a complete run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median(rows: list[dict], key) -> float:
    return statistics.median(key(r) for r in rows)


def plot(result: dict, path: Path) -> None:
    """Speed-up over one rank per setting (against linear), and the ZeRO-3 gather time against model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, setting in enumerate(("plain", "calibrated")):
        rows = [r for r in result["scaling"] if r["setting"] == setting]
        base = _median([r for r in rows if r["ranks"] == 1], lambda r: r["tok_s"])
        two = _median([r for r in rows if r["ranks"] == 2], lambda r: r["tok_s"])
        left.bar(i, two / base, color=f"C{i}")
        left.text(i, two / base, f"{two / base:.2f}", ha="center", va="bottom")
    left.axhline(2.0, color="gray", linestyle="--", label="linear (2x)")
    left.set(xticks=[0, 1], xticklabels=["plain", "calibrated"], ylabel="tok/s with 2 ranks / with 1",
             title="learner: 2 ranks vs 1 (torch engine)")  # fmt: skip
    left.legend()
    if result["gather"]:
        mb = [g["bytes"] / 1e6 for g in result["gather"]]
        right.plot(mb, [g["seconds"] * 1e3 for g in result["gather"]], marker="o")
        right.set(
            xscale="log", xlabel="model MB (fp32)", ylabel="ms", title="ZeRO-3 gather per weight version"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict, args, seconds: float, loads: tuple[float, float]) -> str:
    hidden, layers, _, vocab = SIZES[SCALING_SIZE]
    lines = [
        f"learner scaling, torch engine: Llama {hidden}x{layers} layers, vocab {vocab}; global batch {args.batch} "
        f"trajectories, {args.steps} timed steps per measurement, {args.rounds} round(s) of 1 rank then 2 ranks; "
        "1 torch thread per rank; medians over rounds",
        "| setting | ranks | trained tok/s | speed-up vs 1 | ratio to linear | comm share of step (per rank) | "
        "token imbalance | load (1 min) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for setting in ("plain", "calibrated"):
        base = _median(
            [r for r in result["scaling"] if r["setting"] == setting and r["ranks"] == 1],
            lambda r: r["tok_s"],
        )
        for ranks in (1, 2):
            rows = [r for r in result["scaling"] if r["setting"] == setting and r["ranks"] == ranks]
            tok = _median(rows, lambda r: r["tok_s"])
            shares = " / ".join(
                f"{_median(rows, lambda r, i=i: r['comm_share'][i]):.1%}" for i in range(ranks)
            )
            lines.append(
                f"| {setting} | {ranks} | {tok:.0f} | {tok / base:.2f} | {tok / base / ranks:.2f} | "
                f"{shares if ranks > 1 else '-'} | {_median(rows, lambda r: r['imbalance']):.3f} | "
                f"{_median(rows, lambda r: r['load']):.1f} |"
            )
    calibrated = [r for r in result["scaling"] if r["setting"] == "calibrated"]
    if calibrated:
        lines.append(
            f"calibrated: each rank waits {calibrated[0]['delay_ms_per_token']:.3f} ms per token it ran "
            f"(--calibrate {args.calibrate:g} x one rank's median cost per token in the plain rounds)"
        )
    lines += ["", "ZeRO-3 (DeepSpeed) parameter gather per weight version, 2 ranks, fp32, median of "
              f"{args.repeats}:", "| model | parameters | MB | gather ms | GB/s gathered |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    if not result["gather"]:
        lines.append("| (DeepSpeed is not installed: pip install -e '.[deepspeed]') | | | | |")
    for r in result["gather"]:
        hidden, layers, _, vocab = SIZES[r["size"]]
        lines.append(
            f"| {hidden}x{layers}, vocab {vocab} | {r['params'] / 1e6:.2f}M | {r['bytes'] / 1e6:.1f} | "
            f"{r['seconds'] * 1e3:.2f} | {r['bytes'] / r['seconds'] / 1e9:.2f} |"
        )
    lines.append(
        f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, {platform.platform()}, "
        f"torch {torch.__version__}; load average {loads[0]:.2f} before, {loads[1]:.2f} after; total {seconds:.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--batch", type=int, default=16, help="trajectories per global batch")
    p.add_argument("--rounds", type=int, default=5, help="rounds of (1 rank, 2 ranks) per setting")
    p.add_argument(
        "--calibrate", type=float, default=10.0, help="calibrated setting: wait this x the real cost"
    )
    p.add_argument("--sizes", default="xs,s,m", help=f"ZeRO-3 gather model sizes, of {sorted(SIZES)}")
    p.add_argument("--repeats", type=int, default=10, help="gathers timed per size (median)")
    p.add_argument("--smoke", action="store_true", help="1 round, 2 steps, batch 8, size xs, 2 gathers")
    p.add_argument(
        "--out",
        type=Path,
        help=f"measurements as JSON, and a PNG beside it (default {RESULTS}; --smoke: none)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.batch, args.sizes, args.repeats = 2, 1, 8, "xs", 2
    args.sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    port, tmp = _free_port(), Path(os.environ.get("TMPDIR", "/tmp")) / f"learner_scaling_{os.getpid()}.json"
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    ctx = mp.get_context("spawn")
    other = ctx.Process(target=run_rank, args=(1, port, args))
    other.start()
    try:
        run_rank(0, port, args, str(tmp))
    finally:
        other.join(120)
        if other.is_alive():
            other.kill()
    result = json.loads(tmp.read_text())
    tmp.unlink()
    print(report(result, args, time.perf_counter() - t0, (load0, os.getloadavg()[0])))
    out = args.out or (None if args.smoke else RESULTS)
    if out is not None:
        result["machine"] = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load": [load0, os.getloadavg()[0]],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        plot(result, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if other.exitcode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
