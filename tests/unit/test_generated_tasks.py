"""The generated real-model tasks (capitals, word problems): a held-out split that is disjoint and fixed by its
seed, answers that verify against their own correct completion (and not against a wrong one), endless seeded
training streams, and the config fields the SmolLM2 demos rely on."""

import itertools
import re

import pytest

from opd import tasks
from opd.config import CapitalsTask, ConfigError, WordProblemsTask, load_config


def _take(stream, n):
    return list(itertools.islice(stream, n))


# ------------------------------------------------------------------------------------------ capitals
def test_capitals_list_is_large_unique_and_unambiguous_under_contains():
    countries = [c for c, _ in tasks.CAPITALS]
    capitals = [c for _, c in tasks.CAPITALS]
    assert len(tasks.CAPITALS) >= 150
    assert len(set(countries)) == len(countries) and len(set(capitals)) == len(capitals)
    assert all(c.isascii() for c in capitals)
    for country, capital in tasks.CAPITALS:
        # a capital inside its own question ("Tunis" in "Tunisia") would verify any answer that repeats the question
        assert capital.lower() not in f"What is the capital of {country}?".lower(), country
    for a, b in itertools.permutations(capitals, 2):
        assert a not in b, (a, b)  # "Kingston" in "Kingstown": a wrong answer would verify


def test_capitals_split_is_disjoint_seeded_and_sized():
    task = CapitalsTask()
    train, held = tasks.capitals_split(task)
    assert not set(train) & set(held) and set(train) | set(held) == set(tasks.CAPITALS)
    assert len(held) == round(len(tasks.CAPITALS) * 0.25)
    assert tasks.capitals_split(CapitalsTask()) == (train, held)
    other = tasks.capitals_split(CapitalsTask(eval_seed=7))[1]
    assert set(other) != set(held)
    assert len(tasks.capitals_split(CapitalsTask(eval_fraction=0.5))[1]) == round(len(tasks.CAPITALS) / 2)
    evals = tasks.eval_set(task)
    assert [p.answer for p in evals] == [c for _, c in held]
    assert [p.answer for p in tasks.eval_set(CapitalsTask(eval_size=5))] == [c for _, c in held[:5]]


def test_capitals_stream_is_endless_seeded_and_never_asks_a_held_out_country():
    task = CapitalsTask()
    train, held = tasks.capitals_split(task)
    held_ids = {p.prompt_id for p in tasks.eval_set(task)}
    drawn = _take(tasks.training_stream(task, seed=3), 4 * len(train) + 5)
    assert len(drawn) == 4 * len(train) + 5
    assert not {p.prompt_id for p in drawn} & held_ids
    # every round asks each training country once
    assert sorted(p.answer for p in drawn[: len(train)]) == sorted(c for _, c in train)
    again = _take(tasks.training_stream(task, seed=3), 50)
    assert [p.prompt_id for p in again] == [p.prompt_id for p in drawn[:50]]
    assert [p.prompt_id for p in _take(tasks.training_stream(task, seed=4), 50)] != [
        p.prompt_id for p in again
    ]


def test_every_capital_verifies_its_own_answer_and_not_another_country():
    task = CapitalsTask()
    mode = tasks.verifier_mode(task)
    assert mode == "contains"
    problems = tasks.eval_set(CapitalsTask(eval_fraction=0.9, eval_size=1000))
    problems += _take(tasks.training_stream(task, seed=0), len(tasks.CAPITALS))
    for i, p in enumerate(problems):
        country = re.fullmatch(r"What is the capital of (.+)\?", p.prompt).group(1)
        assert tasks.verify(p.answer, f"The capital of {country} is {p.answer}.", mode)
        wrong = problems[i - 1].answer
        assert not tasks.verify(p.answer, f"The capital of {country} is {wrong}.", mode)


# ------------------------------------------------------------------------------------- word problems
def _numbers(prompt):
    return [int(n) for n in re.findall(r"\d+", prompt)]


def test_word_problem_split_holds_out_templates_and_pairs_of_every_operation():
    split = tasks.word_problems_split(WordProblemsTask())
    for op, templates in tasks.WORD_PROBLEMS.items():
        assert split.held_templates[op] and split.train_templates[op]
        assert not set(split.held_templates[op]) & set(split.train_templates[op])
        assert sorted(split.held_templates[op] + split.train_templates[op]) == list(range(len(templates)))
        assert split.held_pairs[op] and not set(split.held_pairs[op]) & set(split.train_pairs[op])
        assert all(0 < a < 10 and 0 < b < 10 for a, b in split.held_pairs[op] + split.train_pairs[op])
    assert tasks.word_problems_split(WordProblemsTask()) == split
    assert tasks.word_problems_split(WordProblemsTask(eval_seed=1)) != split


def test_word_problem_eval_set_is_deterministic_and_disjoint_from_training():
    task = WordProblemsTask()
    evals = tasks.eval_set(task)
    assert len(evals) == 200 and len({p.prompt_id for p in evals}) == 200
    assert [p.prompt for p in tasks.eval_set(WordProblemsTask())] == [p.prompt for p in evals]
    assert {p.prompt_id.split(":")[1][0] for p in evals} == {"+", "-", "*"}
    train = _take(tasks.training_stream(task, seed=0), 3000)
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    # disjoint by construction, not by luck: no training problem uses a held-out template or a held-out pair
    split = tasks.word_problems_split(task)
    for p in train:
        op, t = p.prompt_id.split(":")[1][0], int(p.prompt_id.split(":")[1][1:])
        a, b = (int(x) for x in p.prompt_id.split(":")[3:])
        assert t in split.train_templates[op] and (a, b) in split.train_pairs[op]
    everything = tasks.eval_set(WordProblemsTask(eval_size=10_000))
    assert len(everything) < 10_000 and not {p.prompt for p in train} & {p.prompt for p in everything}


def test_word_problem_stream_is_endless_and_seeded():
    task = WordProblemsTask()
    a = [p.prompt for p in _take(tasks.training_stream(task, seed=5), 5000)]
    assert len(a) == 5000 and len(set(a)) > 1000
    assert [p.prompt for p in _take(tasks.training_stream(task, seed=5), 100)] == a[:100]
    assert [p.prompt for p in _take(tasks.training_stream(task, seed=6), 100)] != a[:100]


def test_every_word_problem_answer_verifies_and_is_the_arithmetic():
    task = WordProblemsTask()
    mode = tasks.verifier_mode(task)
    assert mode == "last_number"
    problems = tasks.eval_set(task) + _take(tasks.training_stream(task, seed=0), 300)
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in problems:
        op = p.prompt_id.split(":")[1][0]
        a, b = (int(x) for x in p.prompt_id.split(":")[3:])
        assert sorted(_numbers(p.prompt)) == sorted([a, b])
        assert p.answer == str(apply[op](a, b)) and int(p.answer) >= 1
        assert tasks.verify(p.answer, f"{a} {op} {b} = {p.answer}. The answer is {p.answer}.", mode)
        assert not tasks.verify(p.answer, f"The answer is {int(p.answer) + 1}.", mode)


# -------------------------------------------------------------------------------------------- config
PRETRAINED = [
    "student.kind=pretrained",
    "student.name_or_path=/models/s",
    "teacher.kind=pretrained",
    "teacher.name_or_path=/models/t",
]


def test_generated_tasks_load_from_config_with_their_prompt_format():
    cfg = load_config(
        None,
        [
            "task.kind=capitals",
            "task.system_prompt=Answer with the city only.",
            "task.eval_fraction=0.3",
            *PRETRAINED,
        ],
    )
    assert isinstance(cfg.task, CapitalsTask) and cfg.task.verifier == "contains"
    p = tasks.eval_set(cfg.task)[0]
    assert p.system_prompt == "Answer with the city only." and p.chat_template
    assert next(tasks.training_stream(cfg.task, seed=0)).system_prompt == "Answer with the city only."
    assert tasks.task_problems(cfg.task) == []
    wp = WordProblemsTask(chat_template="none", verifier="exact")
    assert not tasks.eval_set(wp)[0].chat_template and tasks.verifier_mode(wp) == "exact"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["task.kind=capitals", "task.eval_fraction=1"], "task.eval_fraction"),
        (["task.kind=word_problems", "task.eval_fraction=0"], "task.eval_fraction"),
        (["task.kind=word_problems", "task.verifier=nope"], "task.verifier"),
        (["task.kind=capitals", "task.system_prompt=' '"], "task.system_prompt is blank"),
        (["task.kind=capitals", "task.max_digits=2"], "task.max_digits"),
    ],
)
def test_bad_generated_task_settings_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(None, [*overrides, *PRETRAINED])


def test_tiny_models_are_refused_with_a_generated_task():
    with pytest.raises(ConfigError, match="tiny models are built for the built-in task only"):
        load_config(None, ["task.kind=capitals"])
