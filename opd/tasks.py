"""Prompt sources and verifiers.

Actors draw training prompts from here, and the learner and launcher draw the held-out set and the verifier, so
every process agrees on what a problem is and what counts as correct.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from opd.config.task import AdditionTask, JsonlTask


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    prompt: str
    answer: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def verify(answer: str | None, completion: str, mode: str = "exact") -> bool:
    """True when `completion` solves the problem: exact match after stripping, or containment."""
    if answer is None:
        return False
    got = completion.strip()
    return got == answer.strip() if mode == "exact" else answer.strip() in got


# ----------------------------------------------------------------------------------------- addition
ADDITION_ALPHABET = "0123456789+="


def _addition_problem(rng: random.Random, max_digits: int) -> tuple[int, int]:
    da, db = rng.randint(1, max_digits), rng.randint(1, max_digits)
    return rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1), rng.randint(
        10 ** (db - 1) if db > 1 else 0, 10**db - 1
    )


def _as_problem(a: int, b: int) -> Problem:
    return Problem(prompt_id=f"{a}+{b}", prompt=f"{a}+{b}=", answer=str(a + b))


def addition_eval_set(task: AdditionTask) -> list[Problem]:
    rng = random.Random(task.eval_seed)
    seen: dict[str, Problem] = {}
    while len(seen) < task.eval_size:
        p = _as_problem(*_addition_problem(rng, task.max_digits))
        seen.setdefault(p.prompt_id, p)
        if len(seen) >= 10 ** (2 * task.max_digits):
            break
    return list(seen.values())


def addition_stream(task: AdditionTask, seed: int) -> Iterator[Problem]:
    """Endless training problems; held-out problems are skipped so accuracy measures generalisation."""
    held_out = {p.prompt_id for p in addition_eval_set(task)}
    rng = random.Random(seed)
    while True:
        p = _as_problem(*_addition_problem(rng, task.max_digits))
        if p.prompt_id not in held_out:
            yield p


# -------------------------------------------------------------------------------------------- jsonl
def read_jsonl_problems(path: Path) -> list[Problem]:
    problems: list[Problem] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a string field 'prompt'")
            answer = row.get("answer")
            prompt_id = str(row.get("id", f"{path.name}:{lineno}"))
            if not prompt_id or len(prompt_id) > 4096 or not prompt_id.isprintable():
                raise ValueError(
                    f"{path}:{lineno}: 'id' must be 1 to 4096 printable characters (no newline or tab); "
                    "fix it or drop the field to use file:line"
                )
            problems.append(
                Problem(
                    prompt_id=prompt_id,
                    prompt=row["prompt"],
                    answer=None if answer is None else str(answer),
                )
            )
    if not problems:
        raise ValueError(f"{path}: no prompts found")
    return problems


def jsonl_stream(task: JsonlTask, seed: int) -> Iterator[Problem]:
    problems = read_jsonl_problems(task.train_path)
    rng = random.Random(seed)
    while True:
        order = list(problems)
        rng.shuffle(order)
        yield from order


# ------------------------------------------------------------------------------------------- facade
def training_stream(task: AdditionTask | JsonlTask, seed: int) -> Iterator[Problem]:
    return addition_stream(task, seed) if task.kind == "addition" else jsonl_stream(task, seed)


def eval_set(task: AdditionTask | JsonlTask) -> list[Problem]:
    if task.kind == "addition":
        return addition_eval_set(task)
    if task.eval_path is None:
        return []
    return read_jsonl_problems(task.eval_path)[: task.eval_size]


def verifier_mode(task: AdditionTask | JsonlTask) -> str:
    return "exact" if task.kind == "addition" else task.verifier
