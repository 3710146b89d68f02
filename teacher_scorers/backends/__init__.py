"""Teacher backends: what turns trajectories' token ids into teacher logprobs. One file per backend, one line each
in `BACKENDS`; a backend's module is imported only when chosen, so optional dependencies (vllm, an HTTP client)
stay optional.

The scorer process (broker loop, validation, retries, acknowledgement, dead letters) is the same whatever
computes the logprobs, so a backend is one small object (`TeacherBackend`). Its one duty besides scoring is to
say how it failed: it never retries or caches on its own, because only the scorer knows whether a trajectory
will come back from the broker, how long it may wait, and where a hopeless one goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd import registry
from teacher_scorers.backends.base import PartlyScored, TeacherBackend, TeacherError

if TYPE_CHECKING:
    from opd.config import Config, ScorerConfig
    from opd.models.builds import Assets

__all__ = ["BACKENDS", "PartlyScored", "TeacherBackend", "TeacherError", "backend_name", "build_teacher"]

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
    tokenizer (token ids are only meaningful if it does), unless the teacher is declared `tokenizer: different`:
    then it scores in its own vocabulary behind the cross-tokenizer alignment."""
    name = backend_name(cfg.scorer)
    unknown = f"scorer.engine: {cfg.scorer.engine} has no teacher backend {name!r}; known: {sorted(BACKENDS)}"
    backend = registry.load(BACKENDS, name, unknown)(cfg, assets)
    if cfg.scorer.tokenizer == "different":  # the teacher scores its own tokens of the student's text
        from teacher_scorers.backends.cross_tokenizer import CrossTokenizerTeacher

        return CrossTokenizerTeacher(cfg, assets, backend)
    return backend
