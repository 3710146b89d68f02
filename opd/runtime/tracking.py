"""The learner's per-step record to wandb and TensorBoard, when the config asks for them.

Both are optional extras (`pip install -e .[logging]`), imported only when enabled, so a run that does not use
them needs neither installed. They receive exactly the record written to metrics.jsonl.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from opd.config import Config
from opd.config.redact import redact

EXTRA_HINT = "pip install -e '.[logging]' (or pip install {pkg})"
SKIPPED_KEYS = ("step", "time")  # the x axis and the wall clock, not series


def _import(module: str, pkg: str, key: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(
            f"{key}.enabled needs the {pkg} package: {EXTRA_HINT.format(pkg=pkg)}; or set {key}.enabled=false"
        ) from exc


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Numeric fields of a step record (bools and lists such as lag_histogram are left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in SKIPPED_KEYS
    }


class _Wandb:
    def __init__(self, cfg: Config):
        wb = cfg.metrics.wandb
        self.wandb = wandb = _import("wandb", "wandb", "metrics.wandb")
        folder = Path(wb.dir or cfg.run.output_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=wb.project,
            mode=wb.mode,
            dir=str(folder),
            name=cfg.run.run_id,
            id=cfg.run.run_id,  # a resumed run continues the same wandb run
            resume="allow",
            config=redact(cfg.model_dump(mode="json")),  # the tracker keeps it on disk (and may upload it)
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before wandb's service process has written the last records (offline runs were
        # missing their history when read at once); teardown waits for that process to end.
        self.wandb.teardown()


class _TensorBoard:
    def __init__(self, cfg: Config):
        tb = cfg.metrics.tensorboard
        _import("tensorboard", "tensorboard", "metrics.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(tb.dir or Path(cfg.run.output_dir or ".") / "tensorboard")
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # one flush per step: `tensorboard --logdir` shows a live run

    def close(self) -> None:
        self.writer.close()


class StepTracker:
    """Fans the learner's step records out to the experiment trackers the config enables (maybe none)."""

    def __init__(self, cfg: Config):
        self.sinks: list[_Wandb | _TensorBoard] = []
        if cfg.metrics.tensorboard.enabled:
            self.sinks.append(_TensorBoard(cfg))
        if cfg.metrics.wandb.enabled:
            os.environ.setdefault("WANDB_SILENT", "true")
            self.sinks.append(_Wandb(cfg))

    def log(self, record: dict[str, Any]) -> None:
        if not self.sinks or "step" not in record:
            return
        values = scalars(record)
        for sink in self.sinks:
            sink.log(int(record["step"]), values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
