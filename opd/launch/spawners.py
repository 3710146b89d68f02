"""The launchers' registry: `--launcher NAME` -> the spawner that places component processes.

One line per launcher; each is imported only when chosen (Ray is an optional dependency). A spawner implements
the `Spawner` contract of `opd/launch/supervisor.py`.
"""

from __future__ import annotations

from collections.abc import Callable

from opd import registry
from opd.config import Config
from opd.launch.supervisor import Spawner

SPAWNERS = {
    "local": "opd.launch.supervisor:LocalSpawner",
    "ray": "opd.launch.ray_launcher:RaySpawner",
}


def open_spawner(launcher: str, cfg: Config, log: Callable[..., None]) -> Spawner:
    """The spawner registered under `launcher` (see SPAWNERS), imported only when chosen."""
    unknown = f"--launcher {launcher}: choose one of {sorted(SPAWNERS)}"
    return registry.load(SPAWNERS, launcher, unknown)(cfg, log)
