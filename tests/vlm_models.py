"""Untrained tiny vision-language models (0 SFT steps: built in seconds) for tests that need a real VLM's
forward, processor and image ids but not a trained one."""

from __future__ import annotations

from opd.config import Config


def untrained_vlm_config(
    cache, student: dict | None = None, teacher: dict | None = None, **sections
) -> Config:
    """A visual_digits config whose tiny VLM student and teacher build with 0 SFT steps into `cache`."""
    return Config.model_validate(
        {
            "run": {"cache_dir": str(cache)},
            "task": {"kind": "visual_digits", "eval_size": 6},
            "student": {"kind": "tiny_vlm", "sft_steps": 0, **(student or {})},
            "teacher": {"kind": "tiny_vlm", "sft_steps": 0, **(teacher or {})},
            **sections,
        }
    )
