"""The actor section: the student engine, how many actors sample, and how they generate (batch or stream)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opd.config.base import Strict
from opd.config.vllm_engine import VLLMEngineConfig


class ActorConfig(Strict):
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="Student engine: hf (transformers sampling loop) or vllm (see actor.vllm)."
    )
    num_actors: int = Field(1, ge=1, description="Actor processes (weight-sync ranks 1..N).")
    prompts_per_batch: int = Field(8, ge=1, description="Prompts per generation batch; batch = prompts x n.")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda:0.")
    metrics_every_s: float = Field(0.5, gt=0, description="Seconds between metrics records on the broker.")
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig,
        description="The vLLM engine used when engine: vllm (ignored otherwise).",
    )
    keep_kv_cache: bool = Field(
        False,
        description="vllm: keep the prefix/KV cache across weight updates (reuses KV computed by old weights); "
        "false resets it after every update.",
    )
    generation: Literal["batch", "stream"] = Field(
        "batch",
        description="batch: generate prompts_per_batch x n sequences, publish them together, take new weights "
        "between batches. stream: continuous batching; keep up to max_inflight sequences generating, publish each "
        "group of n when its last member ends, admit a new prompt in its place, and apply new weights between "
        "decode steps (on_new_weights); every token records the version that sampled it (token_versions).",
    )
    max_inflight: int | None = Field(
        None,
        ge=1,
        description="stream: sequences generating at once (slots); unset = prompts_per_batch x sampling.n. A group "
        "of sampling.n is admitted whole, so it must be at least sampling.n.",
    )
    on_new_weights: Literal["continue", "recompute", "restart"] = Field(
        "continue",
        description="stream: what sequences in flight do when a weight version lands. continue: go on with the "
        "new weights, keeping the KV cache of tokens already generated (their keys/values came from older "
        "weights, so the behaviour logprobs after the update are those of neither version exactly; they are still "
        "the probabilities the tokens were sampled with). recompute: rebuild that KV cache with the new weights "
        "(one prefill of every sequence in flight), so each token's behaviour logprob is exactly its version's. "
        "restart: drop the tokens generated so far and start again from the prompt. See README 'Streaming actors'.",
    )
    on_stop: Literal["drop", "finish"] = Field(
        "drop",
        description="stream: sequences in flight at stop. drop: discard them (never published, counted as "
        "sequences_dropped_at_stop); finish: generate them to the end (no new prompts) and publish them.",
    )

    @model_validator(mode="after")
    def _stream_only(self) -> ActorConfig:
        if self.generation == "batch" and self.max_inflight is not None:
            raise ValueError(
                "actor.max_inflight is a setting of actor.generation: stream (batch generation has "
                "prompts_per_batch x sampling.n sequences per batch); set actor.generation: stream or drop it"
            )
        return self
