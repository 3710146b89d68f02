"""The launchers' registry: `--launcher NAME` -> the spawner that places component processes.

One line per launcher; each is imported only when chosen (Ray is an optional dependency). A spawner implements
the `Spawner` contract of `opd/launch/supervisor.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from opd.config import Config
from opd.launch.supervisor import Spawner

SPAWNERS = {
    "local": "opd.launch.supervisor:LocalSpawner",
    "ray": "opd.launch.ray_launcher:RaySpawner",
}


def open_spawner(launcher: str, cfg: Config, log: Callable[..., None]) -> Spawner:
    """The spawner registered under `launcher` (see SPAWNERS), imported only when chosen."""
    module, _, factory = SPAWNERS[launcher].partition(":")
    return getattr(importlib.import_module(module), factory)(cfg, log)
