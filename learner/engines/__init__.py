"""Learner engines, keyed on `learner.engine`: one file per engine, one line each in `ENGINES`.

An engine owns the optimiser and the update; `learner.engines.base.Engine` is the contract and the shared step.
Engines are imported only when chosen (DeepSpeed is an optional dependency).
"""

from __future__ import annotations

import torch

from learner.engines.base import Engine
from learner.ranks import RankGroup
from opd import registry
from opd.config import Config

ENGINES: dict[str, str] = {
    "torch": "learner.engines.torch:TorchEngine",
    "deepspeed": "learner.engines.deepspeed:DeepSpeedEngine",
}


def engine_class(cfg: Config) -> type[Engine]:
    """The class `learner.engine` names (its class attributes say how it saves its state, before any is built)."""
    unknown = f"learner.engine: {cfg.learner.engine} has no engine; choose one of {sorted(ENGINES)}"
    return registry.load(ENGINES, cfg.learner.engine, unknown)


def build_engine(model: torch.nn.Module, cfg: Config, group: RankGroup | None = None) -> Engine:
    """The engine `learner.engine` names, around `model`, training with the ranks of `group` (default: one)."""
    return engine_class(cfg)(model, cfg, group)
