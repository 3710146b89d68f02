"""The task section: where prompts come from and how a completion is checked (read by opd/tasks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from opd import verifiers
from opd.config.base import Strict


class AdditionTask(Strict):
    """Built-in task: `a+b=` answered with the sum; a verifier checks the digits exactly.

    Its prompts are rendered with the student's chat template when the tokenizer has one (the demo's character
    tokenizer has none, so the tiny models see raw `a+b=`). It has no prompt-format fields of its own: the tiny
    models are named by a hash of this section, and new fields would rename every shipped model."""

    kind: Literal["addition"] = "addition"
    max_digits: int = Field(3, ge=1, le=6, description="Operands have 1..max_digits digits.")
    eval_size: int = Field(200, ge=1, description="Held-out problems used for accuracy.")
    eval_seed: int = Field(12345, description="Seed of the held-out set (kept out of training prompts).")

    @property
    def chat_template(self) -> Literal["auto", "none"]:
        return "auto"

    @property
    def system_prompt(self) -> str | None:
        return None


class JsonlTask(Strict):
    """Prompts from a JSONL file: one object per line with `prompt` (raw text) or `messages` (a chat, OpenAI-style
    roles, ending with a user turn), and optionally `answer` and `id`."""

    kind: Literal["jsonl"] = "jsonl"
    train_path: Path = Field(description="JSONL of training prompts.")
    eval_path: Path | None = Field(
        None, description="JSONL of held-out prompts with `answer`; none = no accuracy."
    )
    verifier: str = Field(
        "exact",
        description=f"How a completion is checked against `answer`: {' | '.join(verifiers.VERIFIERS)} "
        "(opd/verifiers.py), or 'module:function' taking (answer, completion) -> bool, imported at load.",
    )
    eval_size: int = Field(200, ge=1, description="At most this many held-out prompts are evaluated.")
    chat_template: Literal["auto", "none"] = Field(
        "auto",
        description="auto: render prompts with the student's chat template when its tokenizer has one (generation "
        "prompt added; responses end at the template's end-of-turn token); none: raw text after BOS.",
    )
    system_prompt: str | None = Field(
        None,
        description="System turn put before every prompt that has none of its own (raw text before the prompt "
        "without a chat template); none = the template's default.",
    )

    @field_validator("system_prompt")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("task.system_prompt is blank; give it text or drop the key")
        return v

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, name: str) -> str:
        """A built-in name, or a custom function that imports and answers a probe: refused here, not mid-run."""
        return verifiers.check_name(name)


TaskConfig = Annotated[AdditionTask | JsonlTask, Field(discriminator="kind")]
