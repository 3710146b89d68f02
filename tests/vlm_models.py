"""Untrained tiny vision-language models (0 SFT steps: built in seconds) for tests that need a real VLM's
forward, processor and image ids but not a trained one."""

from __future__ import annotations

import numpy as np

from opd.config import Config
from opd.images import ImageBlob
from opd.protocol import Trajectory


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


def image_trajectory(
    i: int, prompt: list[int], response: list[int], images: list[ImageBlob] | None
) -> Trajectory:
    """An unscored trajectory of prompt ids (expanded, as actors send them), a response and its images."""
    return Trajectory(
        run_id="t",
        prompt_id=f"p{i}",
        group_id=f"g{i}",
        sample_index=0,
        prompt_token_ids=np.asarray(prompt, dtype=np.int32),
        response_token_ids=np.asarray(response, dtype=np.int32),
        behaviour_logprobs=np.zeros(len(response), dtype=np.float32),
        policy_version=0,
        images=images,
    )
