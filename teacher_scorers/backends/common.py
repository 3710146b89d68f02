"""Helpers shared by the teacher backends: length buckets, the tokenizer check, the teacher's prompt ids, and
writing the teacher fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from opd.models.builds import Assets
from opd.models.loading import check_same_vocabulary, load_tokenizer
from opd.models.prompts import TeacherPrompts
from opd.protocol import LOGPROB_FLOOR, Trajectory

if TYPE_CHECKING:
    from opd.config import Config

_T = TypeVar("_T")


def _total_length(t: Trajectory) -> int:
    return len(t.prompt_token_ids) + len(t.response_token_ids)


def length_buckets(
    trajs: list[_T], max_tokens: int, length: Callable[[_T], int] = _total_length
) -> list[list[_T]]:
    """Sort by length (a trajectory's prompt + response unless `length` says otherwise) and cut into forwards
    whose padded size stays within max_tokens."""
    order = sorted(trajs, key=length)
    buckets: list[list[_T]] = []
    for t in order:
        length_t = length(t)
        if buckets and (len(buckets[-1]) + 1) * length_t <= max_tokens:
            buckets[-1].append(t)
        else:
            buckets.append([t])
    return buckets


def check_teacher_tokenizer(cfg: Config, assets: Assets, teacher_tokenizer) -> None:
    """Token ids are only meaningful if student and teacher share a tokenizer: refuse at start-up otherwise,
    naming both models. Their embedding sizes may differ (padded vocabularies: opd.models.vocab). A teacher
    declared `tokenizer: different` scores its own tokens of the student's text
    (teacher_scorers/backends/cross_tokenizer.py): nothing to check here."""
    if cfg.scorer.tokenizer == "different":
        return
    names = (assets.student.path, assets.teacher.path)
    check_same_vocabulary(load_tokenizer(assets.student.tokenizer), teacher_tokenizer, names)


def teacher_prompts(cfg: Config, tokenizer) -> TeacherPrompts:
    """How this run's teacher turns a student's prompt ids into its own: the same ids, or with
    `scorer.context` in place of the student's system turn (opd.models.prompts)."""
    return TeacherPrompts.build(tokenizer, cfg.task, cfg.scorer.context)


def teacher_inputs(
    prompts: TeacherPrompts, trajs: list[Trajectory]
) -> tuple[list[tuple[list[int], list[int]]], dict[int, Exception]]:
    """(teacher prompt ids, response ids) per trajectory, and by position why a trajectory has none: the
    response ids are the student's, untouched, whatever the teacher's prompt is."""
    seqs: list[tuple[list[int], list[int]]] = []
    failures: dict[int, Exception] = {}
    for i, t in enumerate(trajs):
        try:
            seqs.append((prompts.teacher_ids(t.prompt_token_ids.tolist()), t.response_token_ids.tolist()))
        except ValueError as exc:
            failures[i] = ValueError(f"trajectory {t.id}: {exc}")
            seqs.append(([], []))
    return seqs, failures


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
