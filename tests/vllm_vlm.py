"""What the vLLM-tier VLM tests share: a tiny vision-language config vLLM's CPU build runs, and visual prompts.

vLLM 0.32's CPU attention has no kernel for head dim 16 ("Unsupported CPU attention configuration:
head_dim=16"), which the default tiny_vlm student has (text hidden 64, 4 heads), so the student here has 2 text
heads (head dim 32); the default teacher (hidden 128, 4 heads) runs as it is. vLLM's LLaVA module imports
transformers' Pixtral image processor, which imports torchvision: without torchvision these tests are skipped.
"""

from __future__ import annotations

import pytest

from opd import tasks
from opd.config import Config
from opd.images import ImageBlob
from tests.vlm_models import image_trajectory

ATOL = 1e-4  # as tests/e2e/test_vllm.py: float32 on both sides, different kernels


def require_vllm_llava() -> None:
    pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh and use .venv-vllm")
    pytest.importorskip(
        "torchvision",
        reason="vLLM's LLaVA imports transformers' Pixtral image processor, which needs torchvision (a CPU build)",
    )


def vlm_config(cache, **sections) -> Config:
    return Config.model_validate(
        {
            "run": {"cache_dir": str(cache)},
            "task": {"kind": "visual_digits", "eval_size": 8},
            "student": {"kind": "tiny_vlm", "sft_steps": 0, "num_heads": 2},
            "teacher": {"kind": "tiny_vlm", "sft_steps": 0},
            "sampling": {"max_new_tokens": 4},
            **sections,
        }
    )


def visual_prompts(cfg: Config, processor, count: int) -> list[tuple[list[int], list[ImageBlob]]]:
    """(expanded prompt ids, images) of held-out visual problems, as an actor makes them."""
    from opd.models import vlm

    problems = tasks.eval_set(cfg.task)[:count]
    return [(vlm.prompt_ids(processor, p), [ImageBlob.of(b) for b in p.images]) for p in problems]


trajectory = image_trajectory  # the tests' name for it
