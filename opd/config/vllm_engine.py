"""Settings of an in-process vLLM engine, shared by the actor and scorer sections (`actor.vllm`, `scorer.vllm`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from opd.config.base import Strict


class VLLMEngineConfig(Strict):
    """Settings of an in-process vLLM engine (`actor.engine: vllm` or `scorer.engine: vllm`); see README."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights/activations dtype inside vLLM; auto = the dtype the HF engine would load "
        "(student/teacher dtype), not vLLM's auto, which halves float32 checkpoints.",
    )
    enforce_eager: bool = Field(
        True, description="Skip CUDA-graph/torch.compile capture: starts in seconds instead of minutes."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt + response vLLM plans for; null = the model's own limit."
    )
    max_num_seqs: int = Field(256, ge=1, description="Sequences vLLM schedules in one step.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of GPU memory vLLM may take (weights + KV cache); CUDA only."
    )
    cpu_kv_cache_gb: int = Field(
        1, ge=1, description="KV cache GiB on CPU (sets VLLM_CPU_KVCACHE_SPACE, whole GiB); CPU builds only."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for vllm.LLM (e.g. tensor_parallel_size); they win over the above.",
    )
