"""The student and teacher sections: a tiny model built for the built-in task, or a pretrained Hugging Face model."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from opd.config.base import Strict


class TinyModel(Strict):
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


class PretrainedModel(Strict):
    """A Hugging Face model: a hub id (needs network) or a local directory saved with `save_pretrained`."""

    kind: Literal["pretrained"] = "pretrained"
    name_or_path: str = Field(description="HF hub id or local checkpoint directory.")
    tokenizer: str | None = Field(None, description="Tokenizer id/path; defaults to name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weights and compute dtype where this model runs (student: actors; teacher: scorers; logprobs "
        "are always taken in fp32). bfloat16 on a CPU needs native bf16 (avx512_bf16/AMX), checked at load. The "
        "learner keeps fp32 master weights whatever this is (learner.dtype sets its compute).",
    )


ModelConfig = Annotated[TinyModel | PretrainedModel, Field(discriminator="kind")]


# The teacher must be clearly stronger than the student, so its defaults are a bigger, longer-trained model.
TEACHER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "sft_steps": 1500,
}
