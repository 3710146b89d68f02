"""Helpers shared by the teacher backends: length buckets, the tokenizer check, and writing the teacher fields."""

from __future__ import annotations

import numpy as np

from opd.models.builds import Assets
from opd.models.loading import check_same_vocabulary, load_tokenizer
from opd.protocol import LOGPROB_FLOOR, Trajectory


def length_buckets(trajs: list[Trajectory], max_tokens: int) -> list[list[Trajectory]]:
    """Sort by total length and cut into forwards whose padded size stays within max_tokens."""
    order = sorted(trajs, key=lambda t: len(t.prompt_token_ids) + len(t.response_token_ids))
    buckets: list[list[Trajectory]] = []
    for t in order:
        length = len(t.prompt_token_ids) + len(t.response_token_ids)
        if buckets and (len(buckets[-1]) + 1) * length <= max_tokens:
            buckets[-1].append(t)
        else:
            buckets.append([t])
    return buckets


def check_teacher_tokenizer(assets: Assets, teacher_tokenizer) -> None:
    """Token ids are only meaningful if student and teacher share a tokenizer: refuse at start-up otherwise."""
    check_same_vocabulary(load_tokenizer(assets.student.tokenizer), teacher_tokenizer)


def _floored(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(x, dtype=np.float32), LOGPROB_FLOOR)


def attach(
    t: Trajectory,
    logprobs: np.ndarray,
    topk_ids: np.ndarray | None,
    topk_logprobs: np.ndarray | None,
    teacher_id: str,
    temperature: float,
    tail_logprobs: np.ndarray | None = None,
) -> None:
    """Write one trajectory's teacher fields in the wire dtypes, with -inf floored so messages stay finite.

    The tail is written only alongside a top-k (the protocol refuses a tail without one)."""
    t.teacher_logprobs = _floored(logprobs)
    if topk_ids is not None and topk_logprobs is not None:
        t.teacher_topk_ids = np.asarray(topk_ids, dtype=np.int32)
        t.teacher_topk_logprobs = _floored(topk_logprobs)
        t.teacher_tail_logprobs = None if tail_logprobs is None else _floored(tail_logprobs)
    t.teacher_id = teacher_id
    t.teacher_temperature = temperature
