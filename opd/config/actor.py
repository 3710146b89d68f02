"""The actor section: the student engine and how many actors sample."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    generation: Literal["batch", "stream"] = Field(
        "batch", description="batch: generate a whole batch, then publish; stream: continuous batching."
    )
    max_inflight: int | None = Field(
        None, ge=1, description="stream: sequences generating at once; null = prompts_per_batch * sampling.n."
    )
    on_new_weights: Literal["continue", "recompute", "restart"] = Field(
        "continue",
        description="stream: what in-flight sequences do when a weight version lands (keep their KV, "
        "re-prefill it with the new weights, or start again from the prompt).",
    )
    on_stop: Literal["drop", "finish"] = Field("drop", description="stream: in-flight sequences at stop.")
    keep_kv_cache: bool = Field(
        False,
        description="vllm: keep the prefix/KV cache across weight updates (reuses KV computed by old weights); "
        "false resets it after every update.",
    )
