"""Prompt sources and verifiers.

Actors draw training prompts from here, and the learner and launcher draw the held-out set and the verifier, so
every process agrees on what a problem is and what counts as correct.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from opd import verifiers
from opd.config.task import AdditionTask, JsonlTask

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer. `messages` is the conversation when the prompt came as one (roles
    system/user/assistant, ending with a user turn); empty means the single user turn `prompt`. How it becomes
    token ids is opd.models.prompts' business: `system_prompt` (the task's, for a conversation without its own
    system turn) and `chat_template` (task.chat_template is auto) come from the task."""

    prompt_id: str
    prompt: str
    answer: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    messages: tuple[tuple[str, str], ...] = ()
    system_prompt: str | None = None
    chat_template: bool = True


def verify(answer: str | None, completion: str, mode: str = "exact") -> bool:
    """True when `completion` solves the problem under verifier `mode` (a name of opd.verifiers, or
    `module:function`); kept here so callers need only `opd.tasks`."""
    return verifiers.verify(answer, completion, mode)


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
def _messages(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """A JSONL row's `messages` as (role, content) pairs, or ValueError saying what is wrong and how to fix it."""
    shape = '[{"role": "user", "content": "..."}]'
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list like {shape}")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"{where}: messages[{i}] must be an object with exactly 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}: messages[{i}].role is {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: messages[{i}].content must be a string")
        if role == "system" and i > 0:
            raise ValueError(f"{where}: messages[{i}] is a system turn; only the first turn may be one")
        turns.append((role, content))
    chat = [r for r, _ in turns if r != "system"]
    if not chat or chat[0] != "user" or chat[-1] != "user":
        raise ValueError(
            f"{where}: after an optional system turn the messages must start with a user turn and end with one "
            "(the student answers the last user turn)"
        )
    return tuple(turns)


def _row_prompt(row: object, where: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(prompt text, conversation) of one JSONL row: `prompt` is the raw text, `messages` a chat whose last user
    turn is also the prompt text (what reports and logs show)."""
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise ValueError(
            f"{where}: each line needs a string field 'prompt' or a list 'messages' of "
            '{"role": ..., "content": ...} turns (not both)'
        )
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise ValueError(f"{where}: each line needs a string field 'prompt'")
        return row["prompt"], ()
    turns = _messages(row["messages"], where)
    return turns[-1][1], turns


def read_jsonl_problems(path: Path) -> list[Problem]:
    problems: list[Problem] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            prompt, messages = _row_prompt(row, f"{path}:{lineno}")
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
                    prompt=prompt,
                    answer=None if answer is None else str(answer),
                    messages=messages,
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


def _turns(p: Problem) -> int:
    return sum(role != "system" for role, _ in p.messages)


def _jsonl_file_problems(
    field: str, path: Path, task: JsonlTask, needs_answer: bool
) -> list[tuple[str, str]]:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        return [
            (
                field,
                f"{path} {what} (resolved from {Path.cwd()} to {path.resolve()}); point {field} at a JSONL file "
                'with one {"prompt": "...", "answer": "..."} (or {"messages": [...], "answer": "..."}) object '
                "per line",
            )
        ]
    try:
        problems = read_jsonl_problems(path)
    except ValueError as exc:
        return [(field, f"{exc}; fix that line of the file")]
    except UnicodeDecodeError as exc:
        return [(field, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8")]
    except OSError as exc:
        return [(field, f"{path} cannot be read ({exc.strerror}); check its permissions")]
    if task.chat_template == "none" and (many := next((p for p in problems if _turns(p) > 1), None)):
        return [
            (
                field,
                f"{path}: prompt {many.prompt_id} is a conversation of several turns, which only a chat template "
                "can render; set task.chat_template: auto (with a model that has a template) or give single turns",
            )
        ]
    missing = [p.prompt_id for p in problems if p.answer is None]
    if needs_answer and missing:
        return [
            (
                field,
                f"{path}: {len(missing)} of {len(problems)} held-out prompts have no 'answer' (first: {missing[0]}), "
                "so they could never be scored correct; add an answer to each line",
            )
        ]
    return []


def task_problems(task: AdditionTask | JsonlTask) -> list[tuple[str, str]]:
    """Every problem of the task's files, as (config field, message) pairs, read now rather than by a component
    minutes later: a missing file, a line that is not JSON or has no prompt (named by file and line), held-out
    prompts without an answer. `opd run` and `opd prepare` refuse the config with them before starting anything."""
    if task.kind != "jsonl":
        return []
    found = _jsonl_file_problems("task.train_path", task.train_path, task, needs_answer=False)
    if task.eval_path is not None:
        found += _jsonl_file_problems("task.eval_path", task.eval_path, task, needs_answer=True)
    return found


# ------------------------------------------------------------------------------------------- facade
def _styled(task: AdditionTask | JsonlTask, p: Problem) -> Problem:
    """The task's prompt format, carried by each problem so whoever renders it needs only the tokenizer."""
    return dataclasses.replace(
        p, system_prompt=task.system_prompt, chat_template=task.chat_template == "auto"
    )


def training_stream(task: AdditionTask | JsonlTask, seed: int) -> Iterator[Problem]:
    stream = addition_stream(task, seed) if task.kind == "addition" else jsonl_stream(task, seed)
    return (_styled(task, p) for p in stream)


def eval_set(task: AdditionTask | JsonlTask) -> list[Problem]:
    if task.kind == "addition":
        problems = addition_eval_set(task)
    elif task.eval_path is None:
        return []
    else:
        problems = read_jsonl_problems(task.eval_path)[: task.eval_size]
    return [_styled(task, p) for p in problems]


def verifier_mode(task: AdditionTask | JsonlTask) -> str:
    """The verifier name of the task (a built-in name or `module:function`; see opd/verifiers.py)."""
    return "exact" if task.kind == "addition" else task.verifier
