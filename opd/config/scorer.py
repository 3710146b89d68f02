"""The scorer section: the teacher backend (in process, in-process vLLM, or a remote server) and its pool."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from opd.config.base import Strict
from opd.config.vllm_engine import VLLMEngineConfig


class RemoteTeacherConfig(Strict):
    """A teacher behind an HTTP server. It must serve a model with the student's tokenizer: ids are sent as-is."""

    api: Literal["sglang", "openai"] = Field(
        "sglang",
        description="Wire format: sglang (native /generate) or openai (vLLM's /v1/completions with prompt_logprobs).",
    )
    url: str | None = Field(None, description="Server base URL, e.g. http://127.0.0.1:30000 (no /v1 suffix).")
    model: str | None = Field(
        None, description="Served model name sent with openai requests; none = the server's only model."
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Seconds one HTTP request may take before it is retried."
    )
    retries: int = Field(
        3, ge=0, description="Retries of a request after a connection error, timeout, 408/429 or 5xx."
    )
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles after every failed attempt.")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once from one scorer process.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (sent as a Bearer token)."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"scorer.remote.url {v!r} must start with http:// or https://")
        return v.rstrip("/") if v else v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(
                "scorer.remote.api_key_env names an environment variable (e.g. TEACHER_API_KEY) that holds the "
                "key; never put the key itself in a config file"
            )
        return v


class FewShotTurn(Strict):
    """One worked example the teacher sees before the prompt: a user turn and the assistant's answer."""

    user: str = Field(min_length=1, description="The example's user turn.")
    assistant: str = Field(min_length=1, description="The answer the teacher sees given to it.")


class TeacherContext(Strict):
    """What the teacher sees before every prompt and the student does not (context distillation): the student
    learns to behave as if it had read it. With a chat template the teacher's prompt is the system turn, then
    the few-shot turns, then the student's own turns; without one, the texts are put before the prompt as ids."""

    system_prompt: str | None = Field(
        None,
        description="The teacher's system turn; it replaces the student's (task.system_prompt or the template's "
        "default). None = the teacher keeps the student's.",
    )
    few_shot: list[FewShotTurn] = Field(
        default_factory=list, description="Worked examples put before the prompt, in order."
    )

    @model_validator(mode="after")
    def _says_something(self) -> TeacherContext:
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("scorer.context.system_prompt is blank; give it text or drop the key")
        if self.system_prompt is None and not self.few_shot:
            raise ValueError(
                "scorer.context is empty; give it a system_prompt and/or few_shot: [{user: ..., assistant: ...}], "
                "or drop it"
            )
        return self


class ScorerConfig(Strict):
    engine: Literal["hf", "vllm", "remote"] = Field(
        "hf",
        description="Teacher backend: hf (in process), vllm (in-process vLLM, see vllm) or remote (an "
        "SGLang/vLLM server, see remote).",
    )
    tokenizer: Literal["same", "different"] = Field(
        "same",
        description="same: the teacher shares the student's tokenizer (checked at start). different: a teacher of "
        "another tokenizer, scored on its own tokens of the student's text and mapped back by aligned chunks "
        "(README: Teachers with another tokenizer). Per teacher: teachers.<name>.tokenizer.",
    )
    num_scorers: int = Field(1, ge=1, description="Teacher scorer processes sharing the rollouts stream.")
    topk: int = Field(0, ge=0, description="Teacher top-k logprobs attached per token (0 = off).")
    temperature: float = Field(1.0, gt=0, description="Temperature of the teacher's logprobs.")
    batch_size: int = Field(64, ge=1, description="Trajectories taken from the broker per scoring round.")
    max_tokens_per_batch: int = Field(
        8192, ge=16, description="Token budget of one teacher forward (length buckets)."
    )
    device: str = Field("cpu", description="torch device of the teacher.")
    metrics_every_s: float = Field(0.5, gt=0, description="Seconds between metrics records on the broker.")
    context: TeacherContext | None = Field(
        None,
        description="Context distillation: a system prompt and/or few-shot turns only the teacher sees before each "
        "prompt; the teacher still scores exactly the student's response tokens.",
    )
    prefix_cache: bool = Field(
        True,
        description="hf teacher: compute the KV cache of the prompt prefix every teacher input shares (the "
        "context, the chat template's system turn) once and reuse it for every trajectory. vllm and remote "
        "teachers cache prefixes on their own.",
    )

    remote: RemoteTeacherConfig = Field(
        default_factory=RemoteTeacherConfig,
        description="The teacher server used when engine: remote (ignored otherwise).",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig,
        description="The vLLM engine used when engine: vllm (ignored otherwise).",
    )

    @property
    def teacher_is_local(self) -> bool:
        """Whether the run's own processes load the teacher's weights (not for a teacher behind a server)."""
        return self.engine != "remote"

    @model_validator(mode="after")
    def _cross_tokenizer_fits(self) -> ScorerConfig:
        if self.tokenizer == "different" and self.context is not None:
            raise ValueError(
                "scorer.context with tokenizer: different is not built yet: the context is spliced into the "
                "teacher's prompt as the student's token ids; drop scorer.context or use a teacher of the "
                "student's tokenizer"
            )
        return self

    @model_validator(mode="after")
    def _remote_needs(self) -> ScorerConfig:
        if self.engine != "remote":
            return self
        if not self.remote.url:
            raise ValueError("scorer.engine: remote needs scorer.remote.url, e.g. http://127.0.0.1:30000")
        if self.temperature != 1.0:
            raise ValueError(
                f"scorer.temperature {self.temperature}: SGLang and vLLM servers return prompt logprobs of the raw "
                "logits (temperature 1) and a sampled-token or top-k logprob cannot be re-tempered without the "
                "full distribution; set scorer.temperature: 1 or use scorer.engine: hf"
            )
        return self
