"""One learner rank of the resharding test (tests/e2e/test_learner_reshard.py), run as a process:

    python -m tests.reshard_worker RANK WORLD PORT OUT_DIR save|load

For each ZeRO stage of STAGES, through the production code (`RankGroup.join`, `build_engine`, `engine.step`,
`save_state`, `RunFiles.reshard`/`restore`): `save` trains two steps on WORLD ranks, writes a checkpoint of them
(engine state, state.json with the number of ranks) and trains a third step; `load` resumes that checkpoint on
WORLD ranks (another number) and trains the same third step. Rank 0 writes the parameters after the third step
and the engine's counters and learning rate after the checkpoint, to OUT_DIR/<stage>-<phase>.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from learner.checkpoint import write_state
from learner.ranks import RankGroup, rendezvous
from learner.state import Progress, RunFiles
from opd.config import load_config
from tests.ranks_worker import BASE, batches

STAGES = (0, 1, 2, 3)


def run(stage: int, phase: str, group: RankGroup | None, world: int, port: int, out: Path) -> None:
    from learner.engines import build_engine, engine_class
    from tests.scored import tiny_model

    cfg = load_config(
        None,
        [
            *BASE,
            "learner.engine=deepspeed",
            f"learner.deepspeed.zero_stage={stage}",
            f"learner.num_ranks={world}",
            f"learner.master_port={port}",
            "learner.lr_schedule=cosine",  # a learning rate that moves with the step count
            "learner.max_steps=10",
        ],
    )
    run_dir = out / f"zero{stage}"
    files = RunFiles(run_dir, cfg.learner)
    model = tiny_model(0, torch.float32)
    train = batches(8)
    checkpoint = run_dir / "checkpoints" / "step-000002"
    leader = group is None or group.leader
    if phase == "load":
        if leader:  # as learner.learner.agreed_checkpoint: rank 0 converts before any rank loads
            files.reshard(checkpoint, engine_class(cfg))
        if group is not None:
            group.all_true(True)
    engine = build_engine(model, cfg, group)
    if phase == "save":
        engine.step(train[0])
        engine.step(train[2])
        engine.save_state(checkpoint / "engine")
        if leader:
            write_state(checkpoint, {**Progress(4, step=2).to_json({}), "num_ranks": world})
    else:
        files.restore(checkpoint, engine, 4)
    after = {"optimizer_steps": engine.optimizer_steps, "lr": engine.current_lr()}
    engine.step(train[0])
    with engine.gathered():
        params = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    if leader:
        torch.save({"params": params, "after": json.dumps(after)}, out / f"zero{stage}-{phase}.pt")


def main(rank: int, world: int, port: int, out: Path, phase: str) -> None:
    torch.set_num_threads(1)
    group = None
    if world > 1:
        cfg = load_config(None, [f"learner.num_ranks={world}", f"learner.master_port={port}"])
        group = RankGroup.join(rendezvous(cfg.learner, rank), "cpu", 120)
    for stage in STAGES:
        run(stage, phase, group, world, port, out)
    if group is not None:
        group.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
    # The work is done and written; leave without interpreter teardown: a DeepSpeed/gloo thread still alive then
    # can abort the process ("terminate called without an active exception", seen once under load), which
    # would fail the test on a result already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
