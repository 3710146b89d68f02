"""One learner rank of the rank-equivalence tests (tests/integration/test_learner_ranks.py), run as a process:

    python -m tests.ranks_worker RANK WORLD PORT OUT_DIR [train|stall|die]

It joins the learner group through the production code (`learner.ranks.rendezvous`, `RankGroup.join`), then for
each variant of VARIANTS builds the production engine (`learner.engines.build_engine`) around the same seeded tiny
model and trains the same global batches (the second one poisoned with a NaN) with `engine.step`. Rank 0 writes
each variant's step records and final (gathered) parameters to OUT_DIR/<variant>.pt for the test to compare with
one rank's update of the same batches. First, the torch engine's gradient sum (`grads`, its verdict in OUT_DIR/grads.txt). `stall` and `die` instead
test that a lost rank does not hang rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from learner.ranks import RankGroup, RankLost, rendezvous
from opd.config import load_config

BASE = [
    "learner.warmup_steps=0",
    "learner.lr=1e-2",
    "learner.batch_size=8",
    "scorer.topk=4",
    "learner.loss=hybrid",  # group-normalised rewards and top-k terms: batch-wide quantities that must be global
    "learner.micro_batch_size=3",
    "learner.eval_every=0",
]
# name -> (overrides, dtype of the model); float64 is exact only for the torch engine (see EXACT)
VARIANTS = {
    "torch-fp64": (["learner.whiten=true", "learner.gamma=0.9"], torch.float64),
    "torch-fp32": ([], torch.float32),
    "torch-decoupled-minibatches": (
        ["learner.correction.mode=decoupled", "learner.minibatches=2", "learner.micro_batch_tokens=20"],
        torch.float64,
    ),
    **{
        f"deepspeed-zero{z}-fp32": (
            ["learner.engine=deepspeed", f"learner.deepspeed.zero_stage={z}"],
            torch.float32,
        )
        for z in (0, 1, 2, 3)
    },
    # ZeRO-3 gathers parameters in every forward: the proximal pass and uneven micro-batch counts must line up.
    # A float64 model, but ZeRO keeps float32 master weights, so DeepSpeed agrees to float32's precision only.
    "deepspeed-zero3-decoupled-fp64": (
        [
            "learner.engine=deepspeed",
            "learner.deepspeed.zero_stage=3",
            "learner.correction.mode=decoupled",
            "learner.minibatches=2",
            "learner.micro_batch_tokens=20",
        ],
        torch.float64,
    ),
    # fewer rows than ranks in an optimiser step: 3 rows in 2 minibatches ([0, 1], [2]), so in the second one
    # rank 1 has no row (stand-in passes under ZeRO-3, zeros into the torch engine's sum) and the NaN is rank 0's
    "torch-fp64-few-rows": (["learner.batch_size=3", "learner.minibatches=2"], torch.float64),
    "deepspeed-zero3-few-rows": (
        [
            "learner.engine=deepspeed",
            "learner.deepspeed.zero_stage=3",
            "learner.batch_size=3",
            "learner.minibatches=2",
        ],
        torch.float32,
    ),
}
ROWS = {"torch-fp64-few-rows": 3, "deepspeed-zero3-few-rows": 3}  # rows per batch; 8 for the others


EXACT = {
    "torch-fp64",
    "torch-decoupled-minibatches",
    "torch-fp64-few-rows",
}  # float64 end to end: agree to 1e-9


def available() -> list[str]:
    """The variants this environment can run (DeepSpeed is an optional dependency)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return [n for n in VARIANTS if not n.startswith("deepspeed")]
    return list(VARIANTS)


STEPS = 3
POISONED = 1  # the step whose batch carries a NaN: skipped on every rank


def batches(rows: int = 8) -> list:
    from learner.batching import collate
    from tests.scored import scored_trajectories  # transformers: imported only where a model is trained

    out = [collate(scored_trajectories(rows, seed=s), 0) for s in range(STEPS)]
    out[POISONED].behaviour[min(5, rows - 1), 0] = float("nan")
    return out


def train(name: str, group: RankGroup | None, world: int) -> tuple[list[dict], torch.Tensor]:
    """The variant's step records and final flat parameters, on `group` (None: one rank)."""
    from learner.engines import build_engine
    from tests.scored import tiny_model

    overrides, dtype = VARIANTS[name]
    cfg = load_config(None, [*BASE, *overrides, f"learner.num_ranks={world}"])
    model = tiny_model(0, dtype)
    engine = build_engine(model, cfg, group)
    records = []
    for b in batches(ROWS.get(name, 8)):
        records.append({**engine.step(b), "rank_tokens": engine.rank_tokens})
    with engine.gathered():
        params = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    return records, params


def fail(group: RankGroup, mode: str, timeout_s: float) -> None:
    """`stall`: rank 1 stops answering; `die`: rank 1 exits at once. Rank 0 then waits in a collective and must
    fail within its timeout with RankLost (exit 3), not hang."""
    if group.rank == 1:
        if mode == "die":
            os._exit(0)
        time.sleep(timeout_s * 10)  # the test kills this rank once rank 0 has ended
        return
    try:
        group.all_true(True)
    except RankLost as exc:
        print(f"RankLost: {exc}", flush=True)
        os._exit(3)  # not sys.exit: the broken group may abort in its destructor at interpreter exit


def grads(group: RankGroup) -> str:
    """`RankGroup.sum_gradients` sums a gradient both ranks have, takes one only rank 1 has, and leaves none where
    no rank has one: "ok", or what it got."""
    both, one, neither = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    both.grad = torch.full((3,), float(group.rank + 1))
    if group.rank == 1:
        one.grad = torch.full((3,), 5.0)
    group.sum_gradients([both, one, neither])
    if both.grad.tolist() == [3.0] * 3 and one.grad.tolist() == [5.0] * 3 and neither.grad is None:
        return "ok"
    return f"wrong: {both.grad} {one.grad} {neither.grad}"


def main(rank: int, world: int, port: int, out: Path, mode: str = "train") -> None:
    torch.set_num_threads(1)
    timeout_s = 120 if mode == "train" else 3
    cfg = load_config(
        None,
        [
            f"learner.num_ranks={world}",
            f"learner.master_port={port}",
            f"learner.collective_timeout_s={timeout_s}",
        ],
    )
    group = RankGroup.join(rendezvous(cfg.learner, rank), "cpu", cfg.learner.collective_timeout_s)
    if mode != "train":
        fail(group, mode, timeout_s)
        return
    if rank == 0:
        (out / "grads.txt").write_text(grads(group))
    else:
        grads(group)
    for name in available():
        records, params = train(name, group, world)
        if rank == 0:
            torch.save({"records": json.dumps(records), "params": params}, out / f"{name}.pt")
    group.close()
    # Everything is written. Leave without the interpreter's teardown: after many DeepSpeed engines in one process
    # a native thread left joinable can abort it there ("terminate called without an active exception", -6),
    # which would fail the test on an exit code that says nothing about the numbers it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
