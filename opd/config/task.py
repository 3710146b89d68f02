"""The task section: where prompts come from and how a completion is checked (read by opd/tasks.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from opd import verifiers
from opd.config.base import Strict


class _CharacterTask:
    """The tiny models' built-in tasks: bare prompts in the tiny tokenizer's characters, no system prompt (a chat
    template applies only if the model has one)."""

    @property
    def chat_template(self) -> Literal["auto", "none"]:
        return "auto"

    @property
    def system_prompt(self) -> str | None:
        return None


class AdditionTask(_CharacterTask, Strict):
    """Built-in task: `a+b=` answered with the sum; a verifier checks the digits exactly.

    Its prompts are rendered with the student's chat template when the tokenizer has one (the demo's character
    tokenizer has none, so the tiny models see raw `a+b=`). It has no prompt-format fields of its own: the tiny
    models are named by a hash of this section, and new fields would rename every shipped model."""

    kind: Literal["addition"] = "addition"
    max_digits: int = Field(3, ge=1, le=6, description="Operands have 1..max_digits digits.")
    eval_size: int = Field(200, ge=1, description="Held-out problems used for accuracy.")
    eval_seed: int = Field(12345, description="Seed of the held-out set (kept out of training prompts).")


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
    roles, ending with a user turn), and optionally `answer` and `id`. Images: an `images` list beside `prompt`
    (one `<image>` in the text per image, in order), or content parts of a message (`{"type": "image", "image":
    ...}`, `{"type": "image_url", "image_url": {"url": ...}}`); each a path relative to the file, a
    `data:image/png;base64,...` URI or base64 of PNG/JPEG bytes (no http URLs), checked at load against the images
    section. A row with images has `#img:` and 16 hex digits of their sha256 appended to its prompt id."""

    kind: Literal["jsonl"] = "jsonl"
    train_path: Path = Field(
        description="JSONL of training prompts (image paths in it are relative to its directory)."
    )
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


class ReversalTask(_CharacterTask, Strict):
    """Built-in task: a digit string followed by `=`, answered with its digits in reverse order (`1234=` gives
    `4321`; leading zeros count: `120=` gives `021`). It uses the addition task's characters, so the tiny models
    share one tokenizer across both tasks (a mixture of the two trains one student on both). A verifier checks the
    digits exactly; a seeded held-out set is never a training prompt."""

    kind: Literal["reversal"] = "reversal"
    min_digits: int = Field(2, ge=1, le=8, description="Strings have min_digits..max_digits digits.")
    max_digits: int = Field(4, ge=1, le=8, description="Strings have min_digits..max_digits digits.")
    eval_size: int = Field(200, ge=1, description="Held-out problems used for accuracy.")
    eval_seed: int = Field(12345, description="Seed of the held-out set (kept out of training prompts).")

    @model_validator(mode="after")
    def _digits_range(self) -> ReversalTask:
        if self.min_digits > self.max_digits:
            raise ValueError(
                f"task.min_digits {self.min_digits} is above task.max_digits {self.max_digits}; "
                "make min_digits <= max_digits"
            )
        return self


class VisualDigitsTask(_CharacterTask, Strict):
    """Built-in visual task: a small grayscale PNG with a number drawn in a blocky 5x7 digit font near the centre
    (seeded offset, ink and background levels), and the prompt `<image>What number?`, answered with the number's
    digits (checked exactly). For the tiny vision-language models (student/teacher kind: tiny_vlm) and tests:
    images come from code (no font files, no download), so the same seed gives the same pixels anywhere. A seeded
    held-out set of images is never a training prompt."""

    kind: Literal["visual_digits"] = "visual_digits"
    image_size: int = Field(32, ge=8, le=1024, description="Width and height of each image in pixels.")
    max_digits: int = Field(1, ge=1, le=4, description="Numbers have 1..max_digits digits.")
    scale: int = Field(2, ge=1, le=16, description="Pixels per dot of the 5x7 digit font.")
    jitter: int = Field(
        1,
        ge=0,
        le=1024,
        description="The number is drawn up to this many pixels off centre, each way (inside the image). The "
        "tiny VLMs learn 1 in a few hundred steps; with 3 the student-sized one read 0.22 after 400 steps, and "
        "anywhere in the image it stayed at chance.",
    )
    eval_size: int = Field(200, ge=1, description="Held-out images used for accuracy.")
    eval_seed: int = Field(12345, description="Seed of the held-out set (kept out of training prompts).")

    @property
    def verifier(self) -> str:
        return "exact"

    @model_validator(mode="after")
    def _number_fits(self) -> VisualDigitsTask:
        width, height = self.max_digits * 6 * self.scale - self.scale, 7 * self.scale
        if width > self.image_size or height > self.image_size:
            raise ValueError(
                f"task: {self.max_digits} digits at scale {self.scale} take {width}x{height} pixels, more than "
                f"image_size {self.image_size}; lower task.scale or task.max_digits, or raise task.image_size"
            )
        return self


# The tasks a mixture draws from (a mixture of mixtures is not one of them).
BuiltinTask = Annotated[
    AdditionTask | ReversalTask | JsonlTask | CapitalsTask | WordProblemsTask | VisualDigitsTask,
    Field(discriminator="kind"),
]
# Tasks the tiny models' character tokenizer can write (opd.tasks.ADDITION_ALPHABET).
TINY_TASKS = ("addition", "reversal")
# Tasks whose prompts carry images (Problem.images): only the tiny vision-language models are built for them.
VISUAL_TASKS = ("visual_digits",)
MIXTURE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def verifier_of(task) -> str:
    """The verifier name of a task that is not a mixture: `exact` for the built-in digit tasks (no verifier
    field: the tiny models are named by a hash of their section), else its `verifier`."""
    return "exact" if task.kind in TINY_TASKS else task.verifier


class MixtureTask(Strict):
    """Prompts drawn from several tasks, each by its weight: `tasks` names each one (the name is the prompt's
    metadata `task`, what `routing.field: task` routes by, and what per-task accuracy is reported under). Each
    task keeps its own held-out set, never a training prompt of any of them; held-out accuracy is reported per task
    and over all. The tasks must share one verifier and one prompt format (chat_template, system_prompt), which
    every actor, scorer and the learner apply to the whole run."""

    kind: Literal["mixture"] = "mixture"
    tasks: dict[str, BuiltinTask] = Field(
        min_length=1,
        description="Task name -> task section (kind: addition | reversal | jsonl | capitals | word_problems | "
        "visual_digits). "
        "The name tags each prompt (metadata `task`) and names its accuracy.",
    )
    weights: dict[str, float] | None = Field(
        None,
        description="Task name -> share of training prompts (normalised; 0 = evaluated only). None: equal shares.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MixtureTask:
        for name in self.tasks:
            if not MIXTURE_NAME.fullmatch(name):
                raise ValueError(
                    f"task.tasks: name {name[:40]!r} must be 1 to 32 characters of a-z, 0-9 and _, starting with a "
                    "letter (it tags prompts and names metrics)"
                )
        if self.weights is not None:
            if set(self.weights) != set(self.tasks):
                raise ValueError(
                    f"task.weights names {sorted(self.weights)} but task.tasks names {sorted(self.tasks)}; "
                    "give one weight per task (or drop task.weights for equal shares)"
                )
            bad = {k: w for k, w in self.weights.items() if not w >= 0 or w == float("inf")}
            if bad or not sum(self.weights.values()) > 0:
                raise ValueError(
                    f"task.weights {self.weights}: each weight must be finite and >= 0, and at least one > 0"
                )
        for what, of in (
            ("verifier", verifier_of),
            ("chat_template", lambda t: t.chat_template),
            ("system_prompt", lambda t: t.system_prompt),
        ):
            seen = {name: of(t) for name, t in self.tasks.items()}
            if len(set(seen.values())) > 1:
                raise ValueError(
                    f"task.tasks: the tasks' {what} differ ({seen}); the tasks of a mixture share one {what} "
                    "(every component applies it to the whole run): make them the same"
                )
        return self

    def shares(self) -> dict[str, float]:
        """Each task's share of training prompts (summing to 1)."""
        raw = self.weights or dict.fromkeys(self.tasks, 1.0)
        total = sum(raw.values())
        return {name: raw[name] / total for name in self.tasks}

    @property
    def verifier(self) -> str:
        return verifier_of(next(iter(self.tasks.values())))

    @property
    def chat_template(self) -> Literal["auto", "none"]:
        return next(iter(self.tasks.values())).chat_template

    @property
    def system_prompt(self) -> str | None:
        return next(iter(self.tasks.values())).system_prompt


def vlm_fits(task) -> bool:
    """Whether the tiny vision-language models (kind: tiny_vlm) are built for `task`: the visual task alone."""
    return task.kind in VISUAL_TASKS


def vlm_build_task(task) -> VisualDigitsTask | None:
    """The visual task a tiny VLM of a run with `task` is built on (SFT'd, evaluated and named by): the task itself
    for visual_digits; for a JSONL task the built-in visual_digits task with its defaults, so a JSONL of digit
    images (scripts/make_visual_jsonl.py writes one) is distilled between the same models a visual_digits run
    builds (as a tiny text model's `sft_task` picks the task its SFT draws from); None where no tiny VLM fits (its
    tokenizer writes only the visual task's characters: a JSONL of other text is for pretrained models)."""
    if task.kind in VISUAL_TASKS:
        return task
    return VisualDigitsTask() if task.kind == "jsonl" else None


def tiny_fits(task) -> bool:
    """Whether the tiny models' character tokenizer can write every prompt and answer of `task`."""
    if task.kind == "mixture":
        return all(t.kind in TINY_TASKS for t in task.tasks.values())
    return task.kind in TINY_TASKS


TaskConfig = Annotated[
    AdditionTask
    | ReversalTask
    | JsonlTask
    | CapitalsTask
    | WordProblemsTask
    | VisualDigitsTask
    | MixtureTask,
    Field(discriminator="kind"),
]
# Every task kind, for code that takes any of them.
AnyTask = (
    AdditionTask | ReversalTask | JsonlTask | CapitalsTask | WordProblemsTask | VisualDigitsTask | MixtureTask
)


def sft_task_problem(sft_task: str | None, task) -> str | None:
    """Why a tiny model's `sft_task` cannot name a task of the run's `task` section, or None when it can (or is
    unset: SFT on the whole task)."""
    if sft_task is None:
        return None
    if task.kind != "mixture":
        return (
            f"{sft_task!r} names a task of a mixture, but task.kind is {task.kind}; drop sft_task (SFT uses the "
            "task section) or make the task a mixture (task.kind: mixture, task.tasks: {name: {...}})"
        )
    if sft_task not in task.tasks:
        return f"{sft_task!r} is not a task of the mixture; name one of {sorted(task.tasks)}"
    return None
