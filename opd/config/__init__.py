"""The one typed config tree for a run, validated when it is loaded.

Every component reads the same resolved file, so a mistake is caught once, at load time, with a message that
names the field and the fix, instead of surfacing minutes later inside one of four processes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and how to fix it."""


def _refuse_planned(field: str, planned: tuple[str, ...], fix: str):
    """A field validator that names values which are planned but not built yet, instead of a bare type error."""

    def check(cls, v: Any) -> Any:
        if v in planned:
            raise ValueError(f"{v} is not implemented yet; use {fix}")
        return v

    return field_validator(field, mode="before")(classmethod(check))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- task
class AdditionTask(_Strict):
    """Built-in task: `a+b=` answered with the sum; a verifier checks the digits exactly."""

    kind: Literal["addition"] = "addition"
    max_digits: int = Field(3, ge=1, le=6, description="Operands have 1..max_digits digits.")
    eval_size: int = Field(200, ge=1, description="Held-out problems used for accuracy.")
    eval_seed: int = Field(12345, description="Seed of the held-out set (kept out of training prompts).")


class JsonlTask(_Strict):
    """Prompts from a JSONL file: one object per line with `prompt` and optionally `answer` and `id`."""

    kind: Literal["jsonl"] = "jsonl"
    train_path: Path = Field(description="JSONL of training prompts.")
    eval_path: Path | None = Field(
        None, description="JSONL of held-out prompts with `answer`; none = no accuracy."
    )
    verifier: Literal["exact", "contains"] = Field(
        "exact", description="How a completion is checked against `answer`."
    )
    eval_size: int = Field(200, ge=1, description="At most this many held-out prompts are evaluated.")


TaskConfig = Annotated[AdditionTask | JsonlTask, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------- models
class TinyModel(_Strict):
    """A small Llama-architecture model built from this config and trained by `opd prepare` on the built-in task."""

    kind: Literal["tiny"] = "tiny"
    hidden_size: int = Field(64, ge=8, description="Model width.")
    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    sft_steps: int = Field(
        200, ge=0, description="Supervised steps on the task before the run (0 = random init)."
    )
    sft_lr: float = Field(3e-3, gt=0, description="Peak lr of that SFT (warmup, then linear decay).")
    sft_batch_size: int = Field(128, ge=1, description="Problems per SFT step.")
    sft_suffix_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of SFT targets given a spurious trailing '=' before EOS: a habit for OPD to remove.",
    )
    seed: int = Field(0, description="Initialisation and SFT data seed.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        return self


class PretrainedModel(_Strict):
    """A Hugging Face model: a hub id (needs network) or a local directory saved with `save_pretrained`."""

    kind: Literal["pretrained"] = "pretrained"
    name_or_path: str = Field(description="HF hub id or local checkpoint directory.")
    tokenizer: str | None = Field(None, description="Tokenizer id/path; defaults to name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype when loaded."
    )


ModelConfig = Annotated[TinyModel | PretrainedModel, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------- components
class SamplingConfig(_Strict):
    """How actors sample. Behaviour logprobs are log-softmax(raw logits / temperature) of the sampled token."""

    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the learner scores at the same one."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    max_new_tokens: int = Field(
        8, ge=1, description="Longest response; longer ones end with finish_reason length."
    )
    n: int = Field(4, ge=1, description="Samples per prompt (group size).")


class VLLMEngineConfig(_Strict):
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


class ActorConfig(_Strict):
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


class RemoteTeacherConfig(_Strict):
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


class ScorerConfig(_Strict):
    engine: Literal["hf", "vllm", "remote"] = Field(
        "hf",
        description="Teacher backend: hf (in process), vllm (in-process vLLM, see vllm) or remote (an "
        "SGLang/vLLM server, see remote).",
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

    remote: RemoteTeacherConfig = Field(
        default_factory=RemoteTeacherConfig,
        description="The teacher server used when engine: remote (ignored otherwise).",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig,
        description="The vLLM engine used when engine: vllm (ignored otherwise).",
    )

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


LOSSES = ("reverse_kl_pg", "opd_penalty", "topk_forward_kl", "topk_reverse_kl", "gkd_jsd", "hybrid")
_LOGIT_LOSSES = ("topk_forward_kl", "topk_reverse_kl", "gkd_jsd")  # need the teacher's top-k and full logits
_REWARD_LOSSES = ("opd_penalty", "hybrid")  # need a verifier reward per trajectory


class CorrectionConfig(_Strict):
    """How the learner reweights tokens sampled by an older policy (staleness correction); see README."""

    mode: Literal["none", "tis", "ppo_clip", "decoupled", "mask"] = Field(
        "tis",
        description="none | tis (min(exp(s-b), C)) | ppo_clip vs behaviour | decoupled (behaviour->proximal "
        "weight x clipped proximal->current ratio) | mask (drop tokens whose ratio leaves [1/C, C]).",
    )
    level: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token, or per sequence (geometric mean of its token ratios)."
    )
    cap: float = Field(2.0, ge=1.0, description="C of tis, decoupled and mask.")
    clip_eps: float = Field(
        0.2, gt=0, lt=1, description="PPO clip range 1-eps (and 1+eps unless clip_eps_high)."
    )
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip 1+eps_high (DAPO clip-higher); null = clip_eps."
    )
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="Dual-clip c: the loss of a negative-advantage token is at most c|A|; null = off.",
    )
    proximal: Literal["recompute", "none"] = Field(
        "recompute",
        description="decoupled needs proximal logprobs: one no-grad learner forward at the start of each update.",
    )


class HybridConfig(_Strict):
    """loss: hybrid = rl_weight * RL loss (task_estimator on the verifier reward) + distill_weight * distill."""

    distill: Literal["reverse_kl_pg", "topk_forward_kl", "topk_reverse_kl", "gkd_jsd"] = Field(
        "reverse_kl_pg", description="The distillation term."
    )
    rl_weight: float = Field(1.0, ge=0, description="lambda_rl.")
    distill_weight: float = Field(1.0, ge=0, description="lambda_distill.")


class DeepSpeedConfig(_Strict):
    """Used when learner.engine: deepspeed (one learner rank; ZeRO shards optimiser state, gradients, weights)."""

    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage 0-3.")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU.")


class LearnerConfig(_Strict):
    engine: Literal["torch", "deepspeed"] = Field(
        "torch", description="Training engine: plain torch, or DeepSpeed (ZeRO; pip install deepspeed)."
    )
    loss: Literal[LOSSES] = Field(  # type: ignore[valid-type]
        "reverse_kl_pg", description="Distillation loss: " + " | ".join(LOSSES) + " (see README)."
    )
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum"] = Field(
        "token_mean",
        description="Per-token losses to a scalar: token-mean, mean of sequence token-means, or sum/constant.",
    )
    aggregation_constant: float | None = Field(
        None, gt=0, description="Divisor of seq_sum per sequence; null = sampling.max_new_tokens."
    )
    gamma: float = Field(
        0.0, ge=0, le=1, description="Discount of future tokens' -(b-q) in the PG advantage."
    )
    whiten: bool = Field(False, description="Whiten PG advantages over the batch (mean 0, std 1).")
    task_estimator: Literal["grpo", "reinforce_pp"] = Field(
        "grpo",
        description="Task advantage of opd_penalty/hybrid: grpo (per prompt group) or reinforce_pp (batch).",
    )
    opd_lambda: float = Field(1.0, ge=0, description="lambda of opd_penalty: A = A_task - lambda (b - q).")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="beta of gkd_jsd (0 = forward KL, 1 = reverse KL).")
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)
    max_staleness: int = Field(
        4,
        ge=0,
        description="Drop (and count) samples more than this many weight versions old; actors pause ahead.",
    )
    max_steps: int = Field(
        200,
        ge=1,
        description="Learner steps (consumed batches); then the student is saved and the run stops.",
    )
    batch_size: int = Field(32, ge=1, description="Scored trajectories consumed per update.")
    minibatches: int = Field(
        1,
        ge=1,
        description="Optimiser steps per consumed batch (the batch is split; >1 makes ppo_clip/decoupled bite).",
    )
    micro_batch_size: int = Field(0, ge=0, description="Most sequences per forward/backward (0 = no limit).")
    micro_batch_tokens: int = Field(
        0, ge=0, description="Most padded tokens per forward/backward, packed by length (0 = no limit)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="After warmup: constant, or cosine to 0 at max_steps."
    )
    warmup_steps: int = Field(
        10, ge=0, description="Linear warmup from 0; a fresh Adam's first steps are otherwise too large."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="Save a resumable checkpoint every this many learner steps (0 = only when stopping).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep this many newest checkpoints.")
    replay_log: bool = Field(
        True,
        description="Write each step's scored messages to replay/ until the next checkpoint, so a resume re-trains "
        "them (exactly once); off saves that disk but loses the steps after the last checkpoint on a crash.",
    )
    eval_every: int = Field(
        20, ge=0, description="Learner steps between held-out evaluations (0 = only at the end)."
    )
    device: str = Field("cpu", description="torch device of the learner.")
    batch_timeout_s: float = Field(
        600.0, gt=0, description="Give up if no scored data arrives for this long."
    )

    @property
    def distill_loss(self) -> str:
        """The loss that needs the teacher: the loss itself, or the distillation term of hybrid."""
        return self.hybrid.distill if self.loss == "hybrid" else self.loss

    @model_validator(mode="after")
    def _own_combinations(self) -> LearnerConfig:
        c = self.correction
        if c.mode == "decoupled" and c.proximal == "none":
            raise ValueError(
                "correction.mode: decoupled needs the proximal policy; set learner.correction.proximal: recompute "
                "or pick mode tis/ppo_clip"
            )
        if (
            self.distill_loss in _LOGIT_LOSSES
            and self.loss != "hybrid"
            and c.mode in ("ppo_clip", "decoupled")
        ):
            raise ValueError(
                f"correction.mode: {c.mode} clips a policy-gradient ratio, and loss {self.loss} has none; "
                "use learner.correction.mode: tis, mask or none"
            )
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError("micro_batch_size is larger than batch_size; lower it or use 0 (no limit)")
        if self.minibatches > self.batch_size:
            raise ValueError("minibatches is larger than batch_size; each optimiser step needs a sequence")
        if self.engine == "deepspeed" and self.deepspeed.dtype == "bf16" and "cuda" not in self.device:
            raise ValueError(
                "deepspeed.dtype: bf16 needs learner.device: cuda; use dtype: fp32 (or auto) on CPU"
            )
        return self


class WeightSyncConfig(_Strict):
    every: int = Field(1, ge=1, description="Broadcast weights every this many learner steps.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="auto = nccl when learner and actors are on different CUDA devices, else gloo (NCCL refuses "
        "two ranks on one GPU); set nccl for multi-node GPU runs.",
    )
    host: str = Field("127.0.0.1", description="Where the learner hosts the rendezvous store.")
    port: int = Field(0, ge=0, le=65535, description="Rendezvous port; 0 = the launcher picks a free one.")
    bucket_mb: float = Field(
        32.0, gt=0, description="Parameters are broadcast in buckets of about this size."
    )
    timeout_s: float = Field(
        300.0, gt=0, description="How long an actor waits to reach the learner's rendezvous store."
    )
    join_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Timeout of forming a sync group (actors join between generation batches) and of each broadcast.",
    )
    liveness_s: float = Field(
        5.0,
        gt=0,
        description="An actor whose heartbeat has not moved for this long is left out of the next sync.",
    )
    # Default 4 = the default learner.max_staleness: a joiner's snapshot is then at most 3 versions old, inside
    # the staleness budget, so it can sample at once; disk traffic is a quarter of the broadcast's, written by a
    # background thread (the learner pays one copy of the weights to CPU memory).
    snapshot_every: int = Field(
        4,
        ge=0,
        description="Write a safetensors snapshot of the weights every this many versions, for late-joining "
        "actors and as the fallback when broadcasts fail; 0 = off.",
    )
    snapshot_dir: Path | None = Field(
        None,
        description="Shared directory of the weight snapshots (every actor host must read it); "
        "default <run.output_dir>/weights.",
    )
    verify_digests: bool = Field(
        False,
        description="Debug: learner and actors append a sha256 of their weights per version to "
        "<run.output_dir>/weight_digests/<component>.jsonl (one extra pass over the weights per version).",
    )


class _BrokerCommon(_Strict):
    max_depth: int = Field(
        256, ge=1, description="Producers wait while a work stream holds this many unfinished entries."
    )
    control_maxlen: int = Field(
        10000, ge=16, description="Fan-out streams keep only this many newest entries."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="A broker that does not answer for this long is dead."
    )
    max_message_mb: float = Field(64.0, gt=0, description="Larger messages are refused (dead-lettered).")


class ZmqBrokerConfig(_BrokerCommon):
    """Embedded broker: one small process holding bounded in-memory streams; no server to install."""

    type: Literal["zmq"] = "zmq"
    host: str = Field("127.0.0.1", description="Bind/connect address; 127.0.0.1 keeps it off the network.")
    port: int = Field(0, ge=0, le=65535, description="0 = the launcher picks a free port.")


class RedisBrokerConfig(_BrokerCommon):
    """Redis Streams: durable, redelivers a dead worker's entries, lets components on many hosts join one run."""

    type: Literal["redis"] = "redis"
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// (TLS) URL, with user:password@ for auth; the run id prefixes every stream.",
    )
    claim_idle_s: float = Field(
        30.0,
        gt=0,
        description="An entry pending this long with a silent consumer is redelivered to a live one.",
    )
    max_deliveries: int = Field(
        3, ge=1, description="An entry delivered this many times without being acknowledged is dead-lettered."
    )
    tls_ca_file: Path | None = Field(
        None,
        description="rediss:// only: CA bundle that signed the server's certificate (default: system CAs).",
    )
    tls_cert_file: Path | None = Field(None, description="rediss:// only: client certificate (mutual TLS).")
    tls_key_file: Path | None = Field(None, description="rediss:// only: the client certificate's key.")

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisBrokerConfig:
        tls = [n for n in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, n) is not None]
        if tls and not self.url.startswith("rediss://"):
            raise ValueError(f"{tls[0]} is set but url is not rediss://; use rediss://host:port/db for TLS")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "tls_cert_file and tls_key_file go together; set both for mutual TLS, or neither"
            )
        return self

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "url must start with redis://, rediss:// (TLS) or unix://; e.g. redis://127.0.0.1:6379/0"
            )
        return v


BrokerConfig = Annotated[ZmqBrokerConfig | RedisBrokerConfig, Field(discriminator="type")]


class RunConfig(_Strict):
    run_id: str | None = Field(
        None, description="Names the run directory and streams; default: time-stamped."
    )
    output_dir: Path | None = Field(None, description="Run directory; default runs/<run_id>.")
    cache_dir: Path = Field(
        Path(".cache/opd"), description="Where built tokenizers and tiny models are cached."
    )
    seed: int = Field(0, description="Seeds actors' prompt streams and sampling, and the learner.")
    torch_threads: int = Field(1, ge=1, description="Threads per component process (they share the machine).")
    status_every: int = Field(10, ge=1, description="Learner steps between status lines.")
    progress: bool = Field(True, description="Show a progress bar when stdout is a terminal.")
    shutdown_grace_s: float = Field(
        20.0, gt=0, description="Seconds a component gets to stop before it is killed."
    )

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/\\ :")):
            raise ValueError("run_id must be non-empty without '/', '\\', ':' or spaces")
        return v


class ScalingConfig(_Strict):
    """Teacher scorers added or removed while a run trains (`opd scale`, or this autoscaler); see README."""

    autoscale: bool = Field(
        False, description="Let the launcher add/remove scorers to keep the rollouts queue within bounds."
    )
    min_scorers: int = Field(1, ge=1, description="The autoscaler never goes below this many scorers.")
    max_scorers: int = Field(
        4, ge=1, description="The autoscaler never goes above this; without autoscale, `opd scale` may."
    )
    queue_low: int = Field(
        8, ge=0, description="Remove a scorer when the mean rollouts depth over cooldown_s is below this."
    )
    queue_high: int = Field(
        128, ge=1, description="Add a scorer when the mean rollouts depth over cooldown_s is above this."
    )
    cooldown_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between autoscaler changes (and the window its depth is averaged over).",
    )
    interval_s: float = Field(
        5.0, gt=0, description="Seconds between scorer throughput records in runs/<id>/scaling.jsonl."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.min_scorers > self.max_scorers:
            raise ValueError(
                f"scaling.min_scorers ({self.min_scorers}) > scaling.max_scorers ({self.max_scorers}); "
                "raise max_scorers or lower min_scorers"
            )
        if self.queue_low >= self.queue_high:
            raise ValueError(
                f"scaling.queue_low ({self.queue_low}) must be below scaling.queue_high ({self.queue_high}); "
                "widen the band"
            )
        return self


class RayResources(_Strict):
    """Ray resources one component's actor reserves (fractions allowed, as in Ray)."""

    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs the component's Ray actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs the component's Ray actor reserves.")


# Per-role defaults, as classes so that `opd run --help` shows each role's own default.
class RayBrokerResources(RayResources):
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs the broker's Ray actor reserves.")


class RayLearnerResources(RayResources):
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs the learner's Ray actor reserves.")


class RayScorerResources(RayResources):
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs each scorer's Ray actor reserves.")


class RayConfig(_Strict):
    """`opd run --launcher ray`: each component is a process owned by a Ray actor placed with these resources."""

    address: str | None = Field(
        None, description="Ray cluster to join (e.g. auto or ray://host:10001); null = start a local Ray."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the local Ray started when address is null (null = all)."
    )
    placement_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for Ray to place a component before giving up on it."
    )
    broker: RayBrokerResources = Field(
        default_factory=RayBrokerResources, description="Resources of the zmq broker."
    )
    learner: RayLearnerResources = Field(
        default_factory=RayLearnerResources, description="Resources of the learner."
    )
    actor: RayResources = Field(default_factory=RayResources, description="Resources of each actor.")
    scorer: RayScorerResources = Field(
        default_factory=RayScorerResources, description="Resources of each scorer."
    )


class WandbConfig(_Strict):
    """Weights & Biases logging of the learner's per-step record (`pip install -e .[logging]`)."""

    enabled: bool = Field(False, description="Log every learner step to wandb.")
    project: str = Field("opd-stream", description="wandb project name.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline writes a local run (`wandb sync` uploads it later); online needs a login.",
    )
    dir: Path | None = Field(None, description="Where wandb writes its run folder; null = run.output_dir.")


class TensorBoardConfig(_Strict):
    """TensorBoard event files of the learner's per-step scalars (`pip install -e .[logging]`)."""

    enabled: bool = Field(False, description="Write the learner's per-step scalars as TensorBoard events.")
    dir: Path | None = Field(None, description="Event file folder; null = <run.output_dir>/tensorboard.")


class MetricsConfig(_Strict):
    """Prometheus endpoints of every component, and the learner's wandb/TensorBoard logging."""

    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Base Prometheus port (0 = off). Learner +0, actor i +1+i, scorer j +1+actor.num_actors+j "
        "(README: Watching a run).",
    )
    host: str = Field(
        "127.0.0.1", description="Address the endpoints bind; 0.0.0.0 to be scraped from other hosts."
    )
    port_layout: Literal["offset", "fixed"] = Field(
        "offset",
        description="offset: many components on one host (opd run), each on metrics.port plus its offset; "
        "fixed: each binds metrics.port itself (one component per container: docker-compose, --index auto).",
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)

    @field_validator("port")
    @classmethod
    def _not_privileged(cls, v: int) -> int:
        if 0 < v < 1024:
            raise ValueError(f"metrics.port {v} is a privileged port; use 0 (off) or e.g. 9400")
        return v


class ServiceTimeConfig(_Strict):
    """Emulated per-token compute of each stage, for benchmarks: after its real work on a batch of N tokens a stage
    sleeps until the batch took at least N x ms. Sleeping frees the CPU, so each stage behaves as if it ran on its
    own accelerator, and the overlap the asynchronous design buys shows even on a 2-core CPU (BENCHMARKS.md)."""

    actor_ms_per_token: float = Field(
        0.0, ge=0, description="Each actor batch takes at least this x generated response tokens (0 = off)."
    )
    scorer_ms_per_token: float = Field(
        0.0, ge=0, description="Each scoring round takes at least this x scored response tokens (0 = off)."
    )
    learner_ms_per_token: float = Field(
        0.0, ge=0, description="Each learner update takes at least this x trained response tokens (0 = off)."
    )


class PipelineConfig(_Strict):
    """How the stages overlap: async (the design) or sync (lockstep generate -> score -> train, for comparison)."""

    mode: Literal["async", "sync"] = Field(
        "async",
        description="async: actors keep generating while older batches are scored and trained; sync: each actor "
        "generates one batch, then waits for the weights trained on it (one batch in flight, staleness 0).",
    )
    service_time: ServiceTimeConfig = Field(
        default_factory=ServiceTimeConfig, description="Emulated per-token stage compute (benchmarks)."
    )


# The teacher must be clearly stronger than the student, so its defaults are a bigger, longer-trained model.
_TEACHER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "sft_steps": 1500,
}


class Config(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=AdditionTask)
    student: ModelConfig = Field(default_factory=TinyModel)
    teacher: ModelConfig = Field(default_factory=lambda: TinyModel(**_TEACHER_DEFAULTS))
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    broker: BrokerConfig = Field(default_factory=ZmqBrokerConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_tags(cls, data: Any) -> Any:
        """Let `student.sft_steps=50` work without also writing `student.kind=tiny`."""
        if not isinstance(data, dict):
            return data
        for key, tag, default in (
            ("task", "kind", "addition"),
            ("student", "kind", "tiny"),
            ("teacher", "kind", "tiny"),
            ("broker", "type", "zmq"),
        ):
            section = data.get(key)
            if isinstance(section, dict) and tag not in section:
                data[key] = {tag: default, **section}
        teacher = data.get("teacher")
        if isinstance(teacher, dict) and teacher.get("kind") == "tiny":
            data["teacher"] = {**_TEACHER_DEFAULTS, **teacher}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        for role in ("student", "teacher"):
            model = getattr(self, role)
            if model.kind == "tiny" and self.task.kind != "addition":
                raise ValueError(
                    f"{role}.kind: tiny models are built for the built-in task only; with task.kind: "
                    f"{self.task.kind} set {role}: {{kind: pretrained, name_or_path: ...}}"
                )
        if (self.student.kind == "tiny") != (self.teacher.kind == "tiny"):
            raise ValueError(
                "student and teacher must share a tokenizer: use kind: tiny for both (built-in tokenizer) "
                "or kind: pretrained for both"
            )
        self._loss_inputs()
        self._ray_fits()
        self._sync_pipeline()
        if self.weight_sync.backend == "nccl" and "cuda" not in self.learner.device:
            raise ValueError("weight_sync.backend: nccl needs learner.device: cuda; use backend: gloo on CPU")
        if self.weight_sync.backend == "nccl" and "cuda" not in self.actor.device:
            raise ValueError(
                f"weight_sync.backend: nccl needs actor.device: cuda (got {self.actor.device}); "
                "use backend: gloo or auto"
            )
        if self.actor.engine == "vllm" and self.sampling.top_p < 1.0:
            # vLLM's processed logprobs are taken after top-p truncation; raw ones before the temperature.
            raise ValueError(
                f"actor.engine: vllm with sampling.top_p {self.sampling.top_p}: vLLM's logprobs would describe "
                "the top-p-truncated distribution, not log_softmax(logits / T) the learner recomputes; set "
                "sampling.top_p: 1 or actor.engine: hf"
            )
        return self

    def _ray_fits(self) -> None:
        """A local Ray smaller than what the components reserve would leave one waiting to be placed."""
        r = self.ray
        if r.address is not None or r.num_cpus is None:
            return
        parts = {
            "broker": r.broker.num_cpus if self.broker.type == "zmq" else 0.0,
            "learner": r.learner.num_cpus,
            "actors": self.actor.num_actors * r.actor.num_cpus,
            "scorers": self.scorer.num_scorers * r.scorer.num_cpus,
        }
        if sum(parts.values()) > r.num_cpus + 1e-9:
            detail = " + ".join(f"{k} {v:g}" for k, v in parts.items())
            raise ValueError(
                f"ray.num_cpus={r.num_cpus} is less than the components reserve at start ({detail}); "
                "raise ray.num_cpus or lower ray.<role>.num_cpus"
            )

    def _sync_pipeline(self) -> None:
        """Lockstep needs one generation round to be exactly one learner batch, and new weights after every
        batch; otherwise the learner waits for data no actor will make (or actors for weights never sent)."""
        if self.pipeline.mode != "sync":
            return
        made = self.actor.num_actors * self.actor.prompts_per_batch * self.sampling.n
        if made != self.learner.batch_size:
            raise ValueError(
                f"pipeline.mode: sync needs actor.num_actors x actor.prompts_per_batch x sampling.n "
                f"({self.actor.num_actors} x {self.actor.prompts_per_batch} x {self.sampling.n} = {made}) to "
                f"equal learner.batch_size ({self.learner.batch_size}); set learner.batch_size={made} or change "
                "the actor side"
            )
        if self.weight_sync.every != 1:
            raise ValueError(
                f"pipeline.mode: sync needs weight_sync.every: 1 (got {self.weight_sync.every}): each actor waits "
                "for the weights trained on its batch; set weight_sync.every=1"
            )

    def _loss_inputs(self) -> None:
        """Refuse a loss whose inputs this run would never produce, instead of failing at the first batch."""
        lc = self.learner
        if lc.distill_loss in _LOGIT_LOSSES and self.scorer.topk == 0:
            raise ValueError(
                f"learner.loss {lc.distill_loss} needs the teacher's top-k logprobs; set scorer.topk (e.g. 8)"
            )
        if lc.loss in _REWARD_LOSSES and lc.task_estimator == "grpo" and self.sampling.n < 2:
            raise ValueError(
                f"learner.loss {lc.loss} with task_estimator grpo normalises rewards within a prompt's group; "
                "set sampling.n >= 2 or learner.task_estimator: reinforce_pp"
            )


# ------------------------------------------------------------------------------------------ loading
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. learner.max_steps=20")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key part; write e.g. learner.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return path, value


_TAGS = ("kind", "type")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (`learner.max_steps=20`); values are parsed as YAML scalars/lists. Overrides apply in
    order, and one that changes a section's `kind`/`type` clears that section's other keys first."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        if path[-1] in _TAGS and node.get(path[-1], value) != value:
            node.clear()  # switching `student.kind` starts the section afresh: the old variant's keys do not apply
        node[path[-1]] = value
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `opd run --help` or configs/"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None, checks=()) -> Config:
    """Load YAML, apply dotted overrides, validate; raise ConfigError with every problem named."""
    cfg = _load_config(path, overrides)
    problems = [p for check in checks for p in check(cfg)]  # TEMP stub (dropped at merge)
    if problems:
        source = str(path) if path else "<defaults>"
        raise ConfigError("\n".join([f"invalid config ({source}):", *(f"  {k}: {m}" for k, m in problems)]))
    return cfg


def _load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (run:, task:, ...)")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per config key with its default and description, for `opd run --help`."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        variants = [a for a in get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            variants = [ann]
        for sub in variants:
            tag = sub.model_fields.get("kind") or sub.model_fields.get("type")
            label = f" [{tag.default}]" if tag is not None and len(variants) > 1 else ""
            if label:
                lines.append(f"  {key}:{label}")
            lines.extend(describe_fields(sub, key + "."))
        if variants:
            continue
        value = field.get_default(call_default_factory=True)
        shown = str(value) if isinstance(value, Path) else repr(value)
        default = "" if field.is_required() else f" (default: {shown})"
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  {key}{default}{desc}")
    return lines
