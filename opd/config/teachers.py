"""The teachers and routing sections: several named teachers, each scored by its own pool of scorers, and which
teacher (or weighted mixture of teachers) scores each prompt.

A run without `teachers:` has one teacher, named `default`, made of the `teacher` (model) and `scorer` (pool)
sections, exactly as before. With `teachers:`, each entry names a model and overrides of the `scorer` section
for its own pool (the `scorer` section is then every pool's defaults). `routing` reads one field of each prompt's
metadata (`Trajectory.task`: the built-in task's name, or a JSONL field) and maps its value to teacher weights.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from opd.config.base import Strict

DEFAULT_TEACHER = "default"
# A teacher's name appears in stream names (`<run>:rollouts:<name>`), component names (`scorer-<name>-<i>`),
# metric labels and log lines: short, lower case, no separators that any of those would split on.
TEACHER_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_TEACHERS = 16


def check_teacher_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not TEACHER_NAME.fullmatch(name):
        raise ValueError(
            f"{where}: teacher name {str(name)[:40]!r} must be 1 to 32 characters of a-z, 0-9 and _, starting with "
            "a letter (it is used in stream, component and metric names)"
        )
    return name


class TeacherSpec(Strict):
    """One named teacher: its model and how its scorer pool differs from the `scorer` section."""

    model: dict[str, Any] = Field(
        default_factory=dict,
        description="The teacher's model, as the `teacher` section (kind: tiny | pretrained | pruned, ...); "
        "validated with the run's config.",
    )
    scorer: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the `scorer` section for this teacher's pool (num_scorers, engine, topk, "
        "temperature, context, device, remote, vllm, ...); keys not given come from `scorer`.",
    )
    tokenizer: Literal["same", "different"] | None = Field(
        None,
        description="same: the student's tokenizer (checked); different: another tokenizer family, scored by "
        "aligned text (README: Teachers with another tokenizer). Unset: scorer.tokenizer (same by default). "
        "The pool's scorer.tokenizer.",
    )


Weights = dict[str, float]


class RoutingConfig(Strict):
    """Which teachers score a prompt. A route's weights are normalised to sum to 1; a weight of 0 leaves that
    teacher out (it is not asked). Several teachers in one route are a mixture: each pool scores the trajectory
    and the learner joins the copies by id (see README "Several teachers")."""

    field: str = Field(
        "task",
        min_length=1,
        description="The prompt metadata key whose value picks the route (Trajectory.task: `task` is the built-in "
        "task's name; a JSONL prompt's extra fields are there too).",
    )
    routes: dict[str, Weights] = Field(
        default_factory=dict,
        description="Value of `field` -> {teacher: weight}. A value not listed goes to `default`.",
    )
    default: str | Weights | None = Field(
        None,
        description="The teacher (or {teacher: weight} mixture) for prompts no route matches. None: the only "
        "teacher when there is one; required with several.",
    )
    join_timeout_s: float = Field(
        300.0,
        gt=0,
        description="How long the learner holds a mixture trajectory's scored copies waiting for the other "
        "teachers' copies, from the first copy's arrival.",
    )
    on_join_timeout: Literal["train_present", "dead_letter"] = Field(
        "dead_letter",
        description="When the join times out: train on the teachers present (their weights renormalised; counted "
        "as partial joins) or dead-letter the trajectory with the missing teachers named.",
    )

    @field_validator("routes")
    @classmethod
    def _weights(cls, v: dict[str, Weights]) -> dict[str, Weights]:
        for value, weights in v.items():
            check_weights(weights, f"routing.routes.{value}")
        return v

    @field_validator("default", mode="before")
    @classmethod
    def _default(cls, v: Any) -> Any:
        if isinstance(v, dict):
            check_weights(v, "routing.default")
        return v

    def route(self, metadata: dict[str, Any], teachers: list[str]) -> Weights:
        """The normalised weights of the teachers that score a prompt with this metadata (zero weights dropped).
        `teachers` is the run's teacher names, in order (for the one-teacher default)."""
        value = metadata.get(self.field)
        weights = self.routes.get(str(value)) if value is not None else None
        if weights is None:
            default = self.default if self.default is not None else teachers[0]
            weights = {default: 1.0} if isinstance(default, str) else default
        kept = {name: float(w) for name, w in weights.items() if w > 0}
        total = math.fsum(kept.values())
        return {name: w / total for name, w in kept.items()}

    def widest_route(self) -> int:
        """The most teachers one prompt can be scored by (positive weights in a route or the default); 1 without
        routes."""
        routes = list(self.routes.values())
        if isinstance(self.default, dict):
            routes.append(self.default)
        return max((sum(1 for w in weights.values() if w > 0) for weights in routes), default=1) or 1

    def named(self) -> set[str]:
        """Every teacher a route or the default names (weight 0 included: it was named on purpose)."""
        names = {name for weights in self.routes.values() for name in weights}
        if isinstance(self.default, str):
            names.add(self.default)
        elif isinstance(self.default, dict):
            names |= set(self.default)
        return names

    def reached(self) -> set[str]:
        """The teachers some prompt can be scored by (a positive weight in a route or the default)."""
        out = {name for weights in self.routes.values() for name, w in weights.items() if w > 0}
        if isinstance(self.default, str):
            out.add(self.default)
        elif isinstance(self.default, dict):
            out |= {name for name, w in self.default.items() if w > 0}
        return out


def check_weights(weights: Weights, where: str) -> None:
    if not weights:
        raise ValueError(f"{where}: name at least one teacher with a weight, e.g. {{teacher_a: 1.0}}")
    for name, w in weights.items():
        check_teacher_name(name, where)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}.{name}: weight {w!r} must be a finite number >= 0")
    if math.fsum(weights.values()) <= 0:
        raise ValueError(f"{where}: the weights sum to 0; give at least one teacher a positive weight")
