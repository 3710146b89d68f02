"""Teacher backends: what turns trajectories' token ids into teacher logprobs, keyed on `scorer.engine`.

The scorer process (broker loop, validation, acknowledgement, dead letters) is the same whatever computes the
logprobs, so a backend is one small object: `vocab_size` (for validating incoming ids), `teacher_id` (stamped on
every scored trajectory) and `score(trajs)`, which fills `teacher_logprobs`, `teacher_topk_ids`,
`teacher_topk_logprobs`, `teacher_id` and `teacher_temperature` in place. A new backend is one file plus one
entry in `_BUILDERS`; its module is imported only when chosen, so optional dependencies (vllm, an HTTP client)
stay optional.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from opd.config import Config
from opd.models.builds import Assets, load_asset
from opd.models.loading import check_same_vocabulary, load_tokenizer
from opd.models.sampler import response_logprobs
from opd.protocol import LOGPROB_FLOOR, Trajectory


class TeacherBackend(Protocol):
    vocab_size: int
    teacher_id: str

    def score(self, trajs: list[Trajectory]) -> None: ...


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


def attach(
    t: Trajectory,
    logprobs: np.ndarray,
    topk_ids: np.ndarray | None,
    topk_logprobs: np.ndarray | None,
    teacher_id: str,
    temperature: float,
) -> None:
    """Write one trajectory's teacher fields in the wire dtypes, with -inf floored so messages stay finite."""
    t.teacher_logprobs = np.maximum(np.asarray(logprobs, dtype=np.float32), LOGPROB_FLOOR)
    if topk_ids is not None and topk_logprobs is not None:
        t.teacher_topk_ids = np.asarray(topk_ids, dtype=np.int32)
        t.teacher_topk_logprobs = np.maximum(np.asarray(topk_logprobs, dtype=np.float32), LOGPROB_FLOOR)
    t.teacher_id = teacher_id
    t.teacher_temperature = temperature


class HFTeacher:
    """The teacher as a Hugging Face model in this process: one right-padded forward per length bucket."""

    def __init__(self, cfg: Config, assets: Assets):
        self.cfg = cfg
        self.model, self.tokenizer = load_asset(assets.teacher, cfg.scorer.device)
        self.model.eval()
        check_teacher_tokenizer(assets, self.tokenizer)
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self.teacher_id = assets.teacher.path

    @torch.no_grad()
    def score(self, trajs: list[Trajectory]) -> None:
        sc = self.cfg.scorer
        for bucket in length_buckets(trajs, sc.max_tokens_per_batch):
            seqs = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist()) for t in bucket]
            lp, tk_ids, tk_lp = response_logprobs(
                self.model, seqs, pad_id=self.tokenizer.pad_token_id, temperature=sc.temperature, topk=sc.topk
            )
            for i, t in enumerate(bucket):
                attach(
                    t,
                    lp[i].numpy(),
                    tk_ids[i].numpy() if tk_ids is not None else None,
                    tk_lp[i].numpy() if tk_lp is not None else None,
                    self.teacher_id,
                    sc.temperature,
                )


def _lazy(module: str, cls: str) -> Callable[[Config, Assets], TeacherBackend]:
    def build(cfg: Config, assets: Assets) -> TeacherBackend:
        return getattr(importlib.import_module(module), cls)(cfg, assets)

    return build


# scorer.engine -> builder(cfg, assets). Backends with optional dependencies are imported only when chosen.
_BUILDERS: dict[str, Callable[[Config, Assets], TeacherBackend]] = {
    "hf": HFTeacher,
    "vllm": _lazy("teacher_scorers.backends.vllm", "VLLMTeacher"),
    "remote": _lazy("teacher_scorers.backends.remote", "RemoteTeacher"),
}


def build_teacher(cfg: Config, assets: Assets) -> TeacherBackend:
    engine = cfg.scorer.engine
    if engine not in _BUILDERS:
        raise NotImplementedError(
            f"scorer.engine: {engine} has no teacher backend; known: {sorted(_BUILDERS)}"
        )
    return _BUILDERS[engine](cfg, assets)
