"""The task section: where prompts come from and how a completion is checked (read by opd/tasks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

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


def _not_blank(v: str | None) -> str | None:
    if v is not None and not v.strip():
        raise ValueError("task.system_prompt is blank; give it text or drop the key")
    return v


# The prompt-format fields every task with real-model prompts has (the addition task has them as constants).
ChatTemplate = Annotated[
    Literal["auto", "none"],
    Field(
        description="auto: render prompts with the student's chat template when its tokenizer has one (generation "
        "prompt added; responses end at the template's end-of-turn token); none: raw text after BOS."
    ),
]
SystemPrompt = Annotated[
    str | None,
    Field(
        description="System turn put before every prompt that has none of its own (raw text before the prompt "
        "without a chat template); none = the template's default."
    ),
    AfterValidator(_not_blank),
]
# A built-in verifier name or a custom `module:function`, imported and probed at load: refused here, not mid-run.
Verifier = Annotated[str, AfterValidator(verifiers.check_name)]


def _verifier_field(default: str) -> object:
    return Field(
        default,
        description=f"How a completion is checked against `answer`: {' | '.join(verifiers.VERIFIERS)} "
        "(opd/verifiers.py), or 'module:function' taking (answer, completion) -> bool, imported at load.",
    )


class JsonlTask(Strict):
    """Prompts from a JSONL file: one object per line with `prompt` (raw text) or `messages` (a chat, OpenAI-style
    roles, ending with a user turn), and optionally `answer` and `id`."""

    kind: Literal["jsonl"] = "jsonl"
    train_path: Path = Field(description="JSONL of training prompts.")
    eval_path: Path | None = Field(
        None, description="JSONL of held-out prompts with `answer`; none = no accuracy."
    )
    verifier: Verifier = _verifier_field("exact")
    eval_size: int = Field(200, ge=1, description="At most this many held-out prompts are evaluated.")
    chat_template: ChatTemplate = "auto"
    system_prompt: SystemPrompt = None


class CapitalsTask(Strict):
    """Built-in task: "What is the capital of France?" answered "Paris", over ~150 countries written in
    opd/tasks.py (unambiguous capitals with plain-ASCII names). A seeded share of the countries is held out: never
    a training prompt, only evaluated, so accuracy measures knowledge the run did not train on directly."""

    kind: Literal["capitals"] = "capitals"
    eval_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of the countries held out of training and used for accuracy."
    )
    eval_seed: int = Field(
        12345, description="Seed of the held-out split (the same seed, the same countries)."
    )
    eval_size: int = Field(200, ge=1, description="At most this many held-out countries are evaluated.")
    verifier: Verifier = _verifier_field("contains")
    chat_template: ChatTemplate = "auto"
    system_prompt: SystemPrompt = None


class WordProblemsTask(Strict):
    """Built-in task: one-step arithmetic word problems with one-digit numbers (+, -, x), made from templates in
    opd/tasks.py ("Tom has 3 apples. Tom buys 4 more apples. How many apples does Tom have now?" -> "7"). Held out:
    a seeded share of the templates of each operation, and a seeded share of the number pairs of each operation;
    a problem with either is never a training prompt, so accuracy measures new wordings and new sums."""

    kind: Literal["word_problems"] = "word_problems"
    eval_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of the templates, and of the number pairs, held out of training."
    )
    eval_seed: int = Field(
        12345, description="Seed of the held-out split and of the held-out problems drawn."
    )
    eval_size: int = Field(
        200, ge=1, description="Held-out problems used for accuracy (at most all of them)."
    )
    verifier: Verifier = _verifier_field("last_number")
    chat_template: ChatTemplate = "auto"
    system_prompt: SystemPrompt = None


TaskConfig = Annotated[
    AdditionTask | JsonlTask | CapitalsTask | WordProblemsTask, Field(discriminator="kind")
]
# Every task kind, for code that takes any of them.
AnyTask = AdditionTask | JsonlTask | CapitalsTask | WordProblemsTask
