"""Teacher backends: what turns trajectories' token ids into teacher logprobs. One file per backend, one line each
in `BACKENDS`; a backend's module is imported only when chosen, so optional dependencies (vllm, an HTTP client)
stay optional.

The scorer process (broker loop, validation, retries, acknowledgement, dead letters) is the same whatever
computes the logprobs, so a backend is one small object (`TeacherBackend`). Its one duty besides scoring is to
say how it failed: it never retries or caches on its own, because only the scorer knows whether a trajectory
will come back from the broker, how long it may wait, and where a hopeless one goes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from opd.config import Config, ScorerConfig
    from opd.models.builds import Assets
    from opd.protocol import Trajectory


class TeacherBackend(Protocol):
    """`vocab_size` bounds the incoming ids, `teacher_id` is stamped on every scored trajectory.

    `score(trajs)` fills, in place, `teacher_logprobs`, `teacher_id`, `teacher_temperature` and, when
    `scorer.topk > 0`, `teacher_topk_ids`/`teacher_topk_logprobs`, plus `teacher_tail_logprobs` where the backend
    sees the full distribution (the learner falls back to 1 - sum(top-k) where it is None). It either scores all of
    them or raises: `PartlyScored` when it knows which ones failed (the rest are scored), anything else when the
    batch failed as a whole (the scorer then finds the culprit one trajectory at a time)."""

    vocab_size: int
    teacher_id: str

    def score(self, trajs: list[Trajectory]) -> None: ...


class TeacherError(RuntimeError):
    """A teacher could not score one trajectory (or answer a start-up request).

    `retryable` says whether asking again may succeed: the server was unreachable, too slow, overloaded or
    failing (connection errors, timeouts, 5xx, 408, 429). Otherwise the request was refused or the reply was not
    what we asked for, and asking again would only repeat it. `where` names the server and the trajectory,
    `reason` what went wrong; the scorer's retry policy reads all three."""

    def __init__(self, where: str, reason: str, *, retryable: bool):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason, self.retryable = where, reason, retryable


class PartlyScored(RuntimeError):
    """Raised by `score` when some trajectories failed: `failures` maps their positions in the batch to why
    (positions, not ids: nothing forbids a batch holding one trajectory twice); every other trajectory of the
    batch is scored, so the scorer retries or dead-letters only these."""

    def __init__(self, failures: dict[int, Exception], total: int):
        first = next(iter(failures.values()))
        super().__init__(f"{len(failures)} of {total} trajectories failed; first: {first}")
        self.failures = failures


# Backend name -> "module:Class", built as Class(cfg, assets). Imported only when chosen.
BACKENDS: dict[str, str] = {
    "hf": "teacher_scorers.backends.hf:HFTeacher",
    "vllm": "teacher_scorers.backends.vllm:VLLMTeacher",
    "sglang": "teacher_scorers.backends.sglang:SGLangTeacher",
    "openai": "teacher_scorers.backends.openai:OpenAITeacher",
}


def backend_name(sc: ScorerConfig) -> str:
    """The config names in-process teachers by `scorer.engine` and servers by `scorer.remote.api` (the engine is
    then `remote`); this is the one place that maps both onto `BACKENDS`."""
    return sc.remote.api if sc.engine == "remote" else sc.engine


def build_teacher(cfg: Config, assets: Assets) -> TeacherBackend:
    """The teacher backend the config names. It checks, where it can, that the teacher shares the student's
    tokenizer: token ids are only meaningful if it does."""
    name = backend_name(cfg.scorer)
    try:
        module, attr = BACKENDS[name].split(":")
    except KeyError:
        raise NotImplementedError(
            f"scorer.engine: {cfg.scorer.engine} has no teacher backend {name!r}; known: {sorted(BACKENDS)}"
        ) from None
    return getattr(importlib.import_module(module), attr)(cfg, assets)
