"""The config checks that need the component registries, run by every `opd` verb when it loads a config.

The config package checks what it can see by itself (types, ranges, combinations of its own fields); whether a
loss can run on what the scorer sends is known only to the loss registry in `learner/`, which the config core
must not import. The roof may import everything, so it hands those registry checks to `load_config`, and a bad
combination is refused at load time with the usual ConfigError, on every verb, before any process starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from opd.config import Config, load_config

Check = Callable[[Config], list[tuple[str, str]]]  # -> (field path, message) pairs


def _loss_errors(cfg: Config) -> list[tuple[str, str]]:
    # Imported when a config is loaded, not when the CLI starts: `learner` loads torch, and `opd --help` or a
    # mistyped flag should answer without waiting for it.
    from learner.losses import config_errors

    return config_errors(cfg)


REGISTRY_CHECKS: tuple[Check, ...] = (_loss_errors,)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load, validate and check a config against the registries; raise ConfigError naming every problem."""
    return load_config(path, overrides, checks=REGISTRY_CHECKS)
