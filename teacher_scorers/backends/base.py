"""The teacher backend contract: what a backend is (`TeacherBackend`) and how it says it failed.

Kept apart from the registry in `__init__.py` so that backends import the contract without importing the
registry that names them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
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
