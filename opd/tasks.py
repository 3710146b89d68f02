"""Prompt sources and verifiers.

Actors draw training prompts from here, and the learner and launcher draw the held-out set and the verifier, so
every process agrees on what a problem is and what counts as correct.

Task kinds: `addition` (the tiny demo's `a+b=`) and `reversal` (`1234=` -> `4321`, in the same characters, so the
tiny models can learn both), `jsonl` (your files), two generated for real instruct models with no download:
`capitals` and `word_problems`, each with a seeded held-out split that training never draws from, `visual_digits`
(a PNG of a number, `<image>What number?`, for the tiny vision-language models), and `mixture`: prompts drawn from
several of those by weight, each tagged with its task's name (`Problem.metadata["task"]`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from opd import verifiers
from opd.config.task import (
    AdditionTask,
    AnyTask,
    CapitalsTask,
    JsonlTask,
    MixtureTask,
    ReversalTask,
    VisualDigitsTask,
    WordProblemsTask,
    verifier_of,
)

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
    # Encoded images (PNG or JPEG bytes, never decoded arrays), one per IMAGE_TOKEN of the prompt, in order.
    images: tuple[bytes, ...] = ()


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


# ----------------------------------------------------------------------------------------- reversal
def _reversal_problem(rng: random.Random, task: ReversalTask) -> Problem:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(task.min_digits, task.max_digits)))
    return Problem(prompt_id=f"rev:{digits}", prompt=f"{digits}=", answer=digits[::-1])


def reversal_eval_set(task: ReversalTask) -> list[Problem]:
    rng = random.Random(task.eval_seed)
    distinct = sum(10**n for n in range(task.min_digits, task.max_digits + 1))
    # at most half of all strings: training keeps the other half (short strings alone would all be held out)
    want = min(task.eval_size, distinct // 2)
    seen: dict[str, Problem] = {}
    while len(seen) < want:
        p = _reversal_problem(rng, task)
        seen.setdefault(p.prompt_id, p)
    return list(seen.values())


def reversal_stream(task: ReversalTask, seed: int) -> Iterator[Problem]:
    """Endless training strings; held-out ones are skipped so accuracy measures generalisation."""
    held_out = {p.prompt_id for p in reversal_eval_set(task)}
    rng = random.Random(seed)
    while True:
        p = _reversal_problem(rng, task)
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


ROW_FIELDS = ("prompt", "messages", "answer", "id")
MAX_ROW_METADATA = 32  # extra fields kept per row: they travel in every trajectory (Trajectory.task)
MAX_METADATA_CHARS = 1024


def _row_metadata(row: dict) -> dict[str, str]:
    """A JSONL row's other scalar fields as strings (a `topic` column, say: what `routing.field` can route by);
    the first MAX_ROW_METADATA of them no longer than MAX_METADATA_CHARS, since each one travels with every
    trajectory of the prompt."""
    found = {
        k: json.dumps(v) if isinstance(v, bool) else str(v)
        for k, v in row.items()
        if k not in ROW_FIELDS and isinstance(v, str | int | float | bool)
    }
    kept = {k: v for k, v in found.items() if len(k) <= 64 and len(v) <= MAX_METADATA_CHARS}
    return dict(list(kept.items())[:MAX_ROW_METADATA])


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
                    metadata=_row_metadata(row),
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


def task_problems(task: AnyTask) -> list[tuple[str, str]]:
    """Every problem of the task's files, as (config field, message) pairs, read now rather than by a component
    minutes later: a missing file, a line that is not JSON or has no prompt (named by file and line), held-out
    prompts without an answer. `opd run` and `opd prepare` refuse the config with them before starting anything."""
    if task.kind == "mixture":
        return [
            (f"task.tasks.{name}.{key.removeprefix('task.')}", msg)
            for name, sub in task.tasks.items()
            for key, msg in task_problems(sub)
        ]
    if task.kind != "jsonl":
        return []
    found = _jsonl_file_problems("task.train_path", task.train_path, task, needs_answer=False)
    if task.eval_path is not None:
        found += _jsonl_file_problems("task.eval_path", task.eval_path, task, needs_answer=True)
    return found


# ----------------------------------------------------------------------------------------- capitals
# (country as asked, capital). Kept: capitals with one accepted English name in plain ASCII (so `contains` needs no
# accent or spelling rules), not contained in their country's name ("Tunis"/"Tunisia" would verify a wrong answer)
# and not in one another ("Kingston"/"Kingstown"). Left out: disputed or split capitals (Bolivia, South Africa,
# the Netherlands, Israel, Sri Lanka, Benin, Tanzania, Ivory Coast), renamed or variously spelled ones (Kazakhstan,
# Ukraine, Myanmar, Mongolia, Yemen, Chad), city-states, and names that are also other places (Georgia).
CAPITALS: tuple[tuple[str, str], ...] = (
    # Europe
    ("Albania", "Tirana"), ("Andorra", "Andorra la Vella"), ("Armenia", "Yerevan"), ("Austria", "Vienna"),
    ("Azerbaijan", "Baku"), ("Belarus", "Minsk"), ("Belgium", "Brussels"), ("Bosnia and Herzegovina", "Sarajevo"),
    ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"), ("Cyprus", "Nicosia"), ("the Czech Republic", "Prague"),
    ("Denmark", "Copenhagen"), ("Estonia", "Tallinn"), ("Finland", "Helsinki"), ("France", "Paris"),
    ("Germany", "Berlin"), ("Greece", "Athens"), ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Italy", "Rome"),
    ("Latvia", "Riga"), ("Liechtenstein", "Vaduz"), ("Lithuania", "Vilnius"), ("Malta", "Valletta"),
    ("Montenegro", "Podgorica"), ("North Macedonia", "Skopje"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"), ("Romania", "Bucharest"), ("Russia", "Moscow"), ("Serbia", "Belgrade"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Spain", "Madrid"), ("Sweden", "Stockholm"),
    ("Switzerland", "Bern"), ("the United Kingdom", "London"),
    # Asia
    ("Afghanistan", "Kabul"), ("Bahrain", "Manama"), ("Bangladesh", "Dhaka"), ("Bhutan", "Thimphu"),
    ("Brunei", "Bandar Seri Begawan"), ("Cambodia", "Phnom Penh"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Japan", "Tokyo"), ("Jordan", "Amman"),
    ("Kuwait", "Kuwait City"), ("Kyrgyzstan", "Bishkek"), ("Laos", "Vientiane"), ("Lebanon", "Beirut"),
    ("Malaysia", "Kuala Lumpur"), ("Nepal", "Kathmandu"), ("North Korea", "Pyongyang"), ("Oman", "Muscat"),
    ("Pakistan", "Islamabad"), ("the Philippines", "Manila"), ("Qatar", "Doha"), ("Saudi Arabia", "Riyadh"),
    ("South Korea", "Seoul"), ("Syria", "Damascus"), ("Tajikistan", "Dushanbe"), ("Thailand", "Bangkok"),
    ("East Timor", "Dili"), ("Turkey", "Ankara"), ("Turkmenistan", "Ashgabat"),
    ("the United Arab Emirates", "Abu Dhabi"), ("Uzbekistan", "Tashkent"), ("Vietnam", "Hanoi"),
    # Africa
    ("Algeria", "Algiers"), ("Angola", "Luanda"), ("Botswana", "Gaborone"), ("Burkina Faso", "Ouagadougou"),
    ("Cape Verde", "Praia"), ("the Central African Republic", "Bangui"), ("Comoros", "Moroni"),
    ("the Democratic Republic of the Congo", "Kinshasa"), ("the Republic of the Congo", "Brazzaville"),
    ("Egypt", "Cairo"), ("Equatorial Guinea", "Malabo"), ("Eritrea", "Asmara"), ("Ethiopia", "Addis Ababa"),
    ("Gabon", "Libreville"), ("the Gambia", "Banjul"), ("Ghana", "Accra"), ("Guinea", "Conakry"),
    ("Kenya", "Nairobi"), ("Lesotho", "Maseru"), ("Liberia", "Monrovia"), ("Libya", "Tripoli"),
    ("Madagascar", "Antananarivo"), ("Malawi", "Lilongwe"), ("Mali", "Bamako"), ("Mauritania", "Nouakchott"),
    ("Mauritius", "Port Louis"), ("Morocco", "Rabat"), ("Mozambique", "Maputo"), ("Namibia", "Windhoek"),
    ("Niger", "Niamey"), ("Nigeria", "Abuja"), ("Rwanda", "Kigali"), ("Senegal", "Dakar"),
    ("Seychelles", "Victoria"), ("Sierra Leone", "Freetown"), ("Somalia", "Mogadishu"), ("South Sudan", "Juba"),
    ("Sudan", "Khartoum"), ("Uganda", "Kampala"), ("Zambia", "Lusaka"), ("Zimbabwe", "Harare"),
    # Americas
    ("Argentina", "Buenos Aires"), ("the Bahamas", "Nassau"), ("Barbados", "Bridgetown"), ("Belize", "Belmopan"),
    ("Canada", "Ottawa"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Dominica", "Roseau"),
    ("the Dominican Republic", "Santo Domingo"), ("Ecuador", "Quito"), ("El Salvador", "San Salvador"),
    ("Guatemala", "Guatemala City"), ("Guyana", "Georgetown"), ("Haiti", "Port-au-Prince"),
    ("Honduras", "Tegucigalpa"), ("Jamaica", "Kingston"), ("Mexico", "Mexico City"), ("Nicaragua", "Managua"),
    ("Panama", "Panama City"), ("Peru", "Lima"), ("Saint Lucia", "Castries"), ("Saint Kitts and Nevis", "Basseterre"),
    ("Suriname", "Paramaribo"), ("Trinidad and Tobago", "Port of Spain"), ("the United States", "Washington"),
    ("Uruguay", "Montevideo"), ("Venezuela", "Caracas"),
    # Oceania
    ("Australia", "Canberra"), ("Fiji", "Suva"), ("Kiribati", "Tarawa"), ("the Marshall Islands", "Majuro"),
    ("Micronesia", "Palikir"), ("New Zealand", "Wellington"), ("Papua New Guinea", "Port Moresby"),
    ("Samoa", "Apia"), ("the Solomon Islands", "Honiara"), ("Tuvalu", "Funafuti"), ("Vanuatu", "Port Vila"),
)  # fmt: skip


def _capital_problem(country: str, capital: str) -> Problem:
    return Problem(
        prompt_id=f"capital:{country}", prompt=f"What is the capital of {country}?", answer=capital
    )


def _held_out_share(items: list, fraction: float, rng: random.Random) -> list:
    """A seeded `fraction` of `items` (at least one, never all) in a seeded order, chosen from a sorted copy so it
    depends on the seed and the items, not on their order."""
    order = sorted(items)
    rng.shuffle(order)
    k = min(len(order) - 1, max(1, round(len(order) * fraction)))
    return order[:k]


def capitals_split(task: CapitalsTask) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs) of CAPITALS, disjoint, the same for the same eval_seed and eval_fraction;
    the held-out ones in a seeded order, so a smaller eval_size takes countries from every continent."""
    held = _held_out_share(list(CAPITALS), task.eval_fraction, random.Random(task.eval_seed))
    return [c for c in CAPITALS if c not in held], held


def capitals_eval_set(task: CapitalsTask) -> list[Problem]:
    return [_capital_problem(*c) for c in capitals_split(task)[1][: task.eval_size]]


def capitals_stream(task: CapitalsTask, seed: int) -> Iterator[Problem]:
    """Endless training questions: every training country once per round, in a new seeded order each round."""
    train = capitals_split(task)[0]
    rng = random.Random(seed)
    while True:
        order = list(train)
        rng.shuffle(order)
        yield from (_capital_problem(*c) for c in order)


# ------------------------------------------------------------------------------------ word problems
# Templates per operation; {n} is a name, {a} and {b} one-digit numbers. The answer is a+b, a-b or a*b.
WORD_PROBLEMS: dict[str, tuple[str, ...]] = {
    "+": (
        "{n} has {a} apples. {n} buys {b} more apples. How many apples does {n} have now?",
        "There are {a} birds on a tree. {b} more birds land on the tree. How many birds are on the tree now?",
        "{n} read {a} pages in the morning and {b} pages in the evening. How many pages did {n} read in all?",
        "A box has {a} red balls and {b} blue balls. How many balls are in the box?",
        "{n} had {a} stickers and got {b} more from a friend. How many stickers does {n} have now?",
        "On Monday {n} walked {a} kilometres and on Tuesday {b} kilometres. How many kilometres did {n} walk?",
    ),
    "-": (
        "{n} has {a} cookies and eats {b} of them. How many cookies are left?",
        "There are {a} cars in a parking lot. {b} cars drive away. How many cars are still in the parking lot?",
        "{n} had {a} balloons. {b} balloons popped. How many balloons does {n} have left?",
        "A shelf holds {a} books. {n} takes {b} books off the shelf. How many books are on the shelf now?",
        "{n} had {a} dollars and spent {b} dollars on lunch. How many dollars does {n} have left?",
        "There were {a} fish in a pond. {b} fish were caught. How many fish are in the pond now?",
    ),
    "*": (
        "There are {a} boxes with {b} pencils in each box. How many pencils are there in all?",
        "{n} buys {a} packs of gum. Each pack has {b} pieces. How many pieces of gum does {n} have?",
        "A garden has {a} rows of plants with {b} plants in each row. How many plants are in the garden?",
        "Each of {a} children has {b} marbles. How many marbles do the children have together?",
        "{n} reads {b} pages every day for {a} days. How many pages does {n} read?",
        "A table has {a} plates and each plate holds {b} grapes. How many grapes are on the table?",
    ),
}
WORD_PROBLEM_NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Kate")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _number_pairs(op: str) -> list[tuple[int, int]]:
    """One-digit operands from 2 (no "1 apples"); a subtraction leaves at least 1."""
    return [(a, b) for a in range(2, 10) for b in range(2, 10) if op != "-" or b < a]


@dataclass(frozen=True)
class WordProblemSplit:
    """Per operation: the training and held-out template indices and number pairs."""

    train_templates: dict[str, list[int]]
    held_templates: dict[str, list[int]]
    train_pairs: dict[str, list[tuple[int, int]]]
    held_pairs: dict[str, list[tuple[int, int]]]


def word_problems_split(task: WordProblemsTask) -> WordProblemSplit:
    rng = random.Random(task.eval_seed)
    split = WordProblemSplit({}, {}, {}, {})
    for op, templates in WORD_PROBLEMS.items():
        held_t = set(_held_out_share(list(range(len(templates))), task.eval_fraction, rng))
        held_p = set(_held_out_share(_number_pairs(op), task.eval_fraction, rng))
        split.train_templates[op] = [i for i in range(len(templates)) if i not in held_t]
        split.held_templates[op] = sorted(held_t)
        split.train_pairs[op] = [p for p in _number_pairs(op) if p not in held_p]
        split.held_pairs[op] = [p for p in _number_pairs(op) if p in held_p]
    return split


def _word_problem(op: str, t: int, name: str, a: int, b: int) -> Problem:
    text = WORD_PROBLEMS[op][t].format(n=name, a=a, b=b)
    return Problem(prompt_id=f"word:{op}{t}:{name}:{a}:{b}", prompt=text, answer=str(_APPLY[op](a, b)))


def word_problems_eval_set(task: WordProblemsTask) -> list[Problem]:
    """Held-out problems: a held-out template with any pair, or a training template with a held-out pair; each
    (template, pair) once with a seeded name, in a seeded order, the first eval_size of them."""
    split, rng = word_problems_split(task), random.Random(task.eval_seed + 1)
    pool = []
    for op, templates in WORD_PROBLEMS.items():
        for t in range(len(templates)):
            pairs = _number_pairs(op) if t in split.held_templates[op] else split.held_pairs[op]
            pool += [(op, t, rng.choice(WORD_PROBLEM_NAMES), a, b) for a, b in pairs]
    rng.shuffle(pool)
    return [_word_problem(*spec) for spec in pool[: task.eval_size]]


def word_problems_stream(task: WordProblemsTask, seed: int) -> Iterator[Problem]:
    """Endless training problems: an operation, a training template and a training pair, drawn with `seed`."""
    split, rng = word_problems_split(task), random.Random(seed)
    ops = list(WORD_PROBLEMS)
    while True:
        op = rng.choice(ops)
        a, b = rng.choice(split.train_pairs[op])
        yield _word_problem(op, rng.choice(split.train_templates[op]), rng.choice(WORD_PROBLEM_NAMES), a, b)


# ------------------------------------------------------------------------------------ visual digits
IMAGE_TOKEN = (
    "<image>"  # an image's place in a prompt's text (one per image; a processor expands it to many ids)
)
VISUAL_QUESTION = "What number?"
# A 5x7 dot font for the digits, as rows of 5 bits: drawn by code, so no font file (whose glyphs vary with the
# Pillow build) decides the pixels.
DIGIT_FONT: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}
VISUAL_ALPHABET = "".join(
    sorted(set(ADDITION_ALPHABET + VISUAL_QUESTION))
)  # every character of prompts/answers


@dataclass(frozen=True)
class DigitImage:
    """What decides one image of the visual task: the number, its top-left corner, ink and background levels."""

    number: str
    x: int
    y: int
    ink: int
    background: int

    @property
    def prompt_id(self) -> str:
        return f"vd:{self.number}:{self.x}:{self.y}:{self.ink}:{self.background}"


def _near_centre(rng: random.Random, room: int, jitter: int) -> int:
    """A corner coordinate within `jitter` pixels of centring the number in `room` spare pixels (kept inside)."""
    centre = room // 2
    return rng.randint(max(0, centre - jitter), min(room, centre + jitter))


def _digit_image(rng: random.Random, task: VisualDigitsTask) -> DigitImage:
    n = rng.randint(1, task.max_digits)
    number = str(rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1))
    width, height = len(number) * 6 * task.scale - task.scale, 7 * task.scale
    return DigitImage(
        number=number,
        x=_near_centre(rng, task.image_size - width, task.jitter),
        y=_near_centre(rng, task.image_size - height, task.jitter),
        ink=rng.randint(160, 255),
        background=rng.randint(0, 80),
    )


def draw_digits(spec: DigitImage, task: VisualDigitsTask) -> bytes:
    """The image of `spec` as PNG bytes: grayscale, image_size square, each font dot a scale x scale square."""
    from PIL import Image, ImageDraw  # only the visual task needs Pillow

    img = Image.new("L", (task.image_size, task.image_size), spec.background)
    draw = ImageDraw.Draw(img)
    s = task.scale
    for k, digit in enumerate(spec.number):
        left = spec.x + k * 6 * s
        for row, bits in enumerate(DIGIT_FONT[digit]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    x0, y0 = left + col * s, spec.y + row * s
                    draw.rectangle((x0, y0, x0 + s - 1, y0 + s - 1), fill=spec.ink)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _visual_problem(spec: DigitImage, task: VisualDigitsTask) -> Problem:
    return Problem(
        prompt_id=spec.prompt_id,
        prompt=IMAGE_TOKEN + VISUAL_QUESTION,
        answer=spec.number,
        images=(draw_digits(spec, task),),
    )


def _visual_eval_specs(task: VisualDigitsTask) -> list[DigitImage]:
    rng = random.Random(task.eval_seed)
    seen: dict[str, DigitImage] = {}
    while len(seen) < task.eval_size:  # millions of distinct images: the loop ends
        spec = _digit_image(rng, task)
        seen.setdefault(spec.prompt_id, spec)
    return list(seen.values())


def visual_digits_eval_set(task: VisualDigitsTask) -> list[Problem]:
    return [_visual_problem(spec, task) for spec in _visual_eval_specs(task)]


def visual_digits_stream(task: VisualDigitsTask, seed: int) -> Iterator[Problem]:
    """Endless training images; held-out ones (the same number, place and levels) are skipped."""
    held_out = {spec.prompt_id for spec in _visual_eval_specs(task)}
    rng = random.Random(seed)
    while True:
        spec = _digit_image(rng, task)
        if spec.prompt_id not in held_out:
            yield _visual_problem(spec, task)


# ------------------------------------------------------------------------------------------ mixture
def _tagged(name: str, p: Problem) -> Problem:
    return dataclasses.replace(p, metadata={**p.metadata, "task": name})


def mixture_eval_set(task: MixtureTask) -> list[Problem]:
    """Every task's held-out set, each problem tagged with its task's name, interleaved one task after another
    (an evaluation cut short by its budget still covers every task); a prompt held out by two tasks once."""
    sets = [[_tagged(name, p) for p in eval_set(sub)] for name, sub in task.tasks.items()]
    seen: dict[str, Problem] = {}
    for i in range(max(map(len, sets), default=0)):
        for problems in sets:
            if i < len(problems):
                seen.setdefault(problems[i].prompt_id, problems[i])
    return list(seen.values())


def mixture_stream(task: MixtureTask, seed: int) -> Iterator[Problem]:
    """Endless training problems: a task drawn by its share, then that task's next problem, tagged with its name.
    A prompt held out by any task of the mixture is skipped (two tasks may make the same prompt)."""
    held_out = {p.prompt_id for p in mixture_eval_set(task)}
    shares = task.shares()
    names = [n for n in task.tasks if shares[n] > 0]
    weights = [shares[n] for n in names]
    streams = {n: training_stream(task.tasks[n], seed * 1009 + i) for i, n in enumerate(task.tasks)}
    rng = random.Random(seed)
    while True:
        name = rng.choices(names, weights)[0]
        p = next(streams[name])
        if p.prompt_id not in held_out:
            yield _tagged(name, p)


def subtask(task: AnyTask, name: str) -> AnyTask:
    """The task named `name` of a mixture (ValueError naming the choices otherwise)."""
    if task.kind != "mixture" or name not in task.tasks:
        choices = sorted(task.tasks) if task.kind == "mixture" else []
        raise ValueError(f"no task named {name!r} in the task section (its tasks: {choices})")
    return task.tasks[name]


def task_names(task: AnyTask) -> list[str]:
    """The tags a task's problems carry (`metadata["task"]`): a mixture's task names, else none."""
    return list(task.tasks) if task.kind == "mixture" else []


# ------------------------------------------------------------------------------------------- facade
def _styled(task: AnyTask, p: Problem) -> Problem:
    """The task's prompt format, carried by each problem so whoever renders it needs only the tokenizer."""
    return dataclasses.replace(
        p, system_prompt=task.system_prompt, chat_template=task.chat_template == "auto"
    )


def _stream(task: AnyTask, seed: int) -> Iterator[Problem]:
    if task.kind == "addition":
        return addition_stream(task, seed)
    if task.kind == "reversal":
        return reversal_stream(task, seed)
    if task.kind == "capitals":
        return capitals_stream(task, seed)
    if task.kind == "word_problems":
        return word_problems_stream(task, seed)
    if task.kind == "visual_digits":
        return visual_digits_stream(task, seed)
    return jsonl_stream(task, seed)


def training_stream(task: AnyTask, seed: int) -> Iterator[Problem]:
    if task.kind == "mixture":
        return mixture_stream(task, seed)  # each task styles its own problems
    return (_styled(task, p) for p in _stream(task, seed))


def eval_set(task: AnyTask) -> list[Problem]:
    if task.kind == "mixture":
        return mixture_eval_set(task)
    if task.kind == "addition":
        problems = addition_eval_set(task)
    elif task.kind == "reversal":
        problems = reversal_eval_set(task)
    elif task.kind == "capitals":
        problems = capitals_eval_set(task)
    elif task.kind == "word_problems":
        problems = word_problems_eval_set(task)
    elif task.kind == "visual_digits":
        problems = visual_digits_eval_set(task)
    elif task.eval_path is None:
        return []
    else:
        problems = read_jsonl_problems(task.eval_path)[: task.eval_size]
    return [_styled(task, p) for p in problems]


def verifier_mode(task: AnyTask) -> str:
    """The verifier name of the task (a built-in name or `module:function`; see opd/verifiers.py); a mixture's
    tasks share one."""
    return task.verifier if task.kind == "mixture" else verifier_of(task)
