"""Issue 18's tasks: the built-in digit reversal (the second task the tiny character models can learn, in the
addition task's characters) and task mixtures (prompts drawn from several tasks by weight, each tagged with its
task's name, what `routing.field: task` routes by, with one held-out set per task that training never draws)."""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import pytest
import yaml

from opd import tasks
from opd.config import ConfigError, load_config
from opd.config.task import MixtureTask, ReversalTask
from opd.models.builds import recipe

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "two_teachers.yaml"


def _mixture(**over) -> MixtureTask:
    raw = {
        "tasks": {
            "addition": {"kind": "addition", "max_digits": 2, "eval_size": 50},
            "reversal": {"kind": "reversal", "eval_size": 50},
        },
        **over,
    }
    return MixtureTask.model_validate(raw)


def test_reversal_problems_reverse_their_digits_in_the_addition_alphabet():
    task = ReversalTask(min_digits=2, max_digits=5)
    problems = list(itertools.islice(tasks.training_stream(task, seed=3), 500))
    for p in problems:
        digits = p.prompt.removesuffix("=")
        assert p.prompt == f"{digits}=" and p.answer == digits[::-1]
        assert 2 <= len(digits) <= 5 and set(p.prompt) <= set(tasks.ADDITION_ALPHABET)
    assert {len(p.answer) for p in problems} == {2, 3, 4, 5}
    assert any(p.answer.startswith("0") for p in problems)  # leading zeros are kept: `120=` gives `021`
    assert tasks.verifier_mode(task) == "exact"
    assert tasks.verify("021", "021", "exact") and not tasks.verify("021", "21", "exact")


def test_reversal_held_out_set_is_seeded_and_never_trained_on():
    task = ReversalTask(min_digits=2, max_digits=3, eval_size=100)
    held = tasks.eval_set(task)
    assert [p.prompt_id for p in held] == [p.prompt_id for p in tasks.eval_set(task)]
    assert len({p.prompt_id for p in held}) == 100
    trained = {p.prompt_id for p in itertools.islice(tasks.training_stream(task, seed=0), 5000)}
    assert trained and not trained & {p.prompt_id for p in held}
    # asked for more than half of all strings: half stay for training
    small = ReversalTask(min_digits=1, max_digits=1, eval_size=200)
    assert len(tasks.eval_set(small)) == 5


def test_reversal_refuses_min_above_max():
    with pytest.raises(ConfigError, match="min_digits"):
        load_config(None, ["task.kind=reversal", "task.min_digits=5", "task.max_digits=3"])


def test_mixture_tags_each_prompt_with_its_task_and_draws_by_weight():
    task = _mixture(weights={"addition": 1, "reversal": 3})
    drawn = list(itertools.islice(tasks.training_stream(task, seed=0), 4000))
    counts = collections.Counter(p.metadata["task"] for p in drawn)
    assert set(counts) == {"addition", "reversal"}
    assert 0.7 < counts["reversal"] / len(drawn) < 0.8
    for p in drawn:
        assert ("+" in p.prompt) == (p.metadata["task"] == "addition")
    again = list(itertools.islice(tasks.training_stream(task, seed=0), 50))
    assert again == drawn[:50]  # seeded
    only = _mixture(weights={"addition": 0, "reversal": 1})  # weight 0: evaluated only
    drawn = itertools.islice(tasks.training_stream(only, seed=0), 300)
    assert {p.metadata["task"] for p in drawn} == {"reversal"}
    assert {p.metadata["task"] for p in tasks.eval_set(only)} == {"addition", "reversal"}


def test_mixture_eval_set_is_each_tasks_held_out_set_tagged_and_interleaved():
    task = _mixture()
    held = tasks.eval_set(task)
    assert [p.metadata["task"] for p in held[:6]] == [
        "addition",
        "reversal",
    ] * 3  # a cut evaluation sees both
    for name, sub in task.tasks.items():
        own = [p for p in held if p.metadata["task"] == name]
        assert [(p.prompt_id, p.answer) for p in own] == [
            (p.prompt_id, p.answer) for p in tasks.eval_set(sub)
        ]
    trained = {p.prompt_id for p in itertools.islice(tasks.training_stream(task, seed=1), 5000)}
    assert not trained & {p.prompt_id for p in held}


def test_a_prompt_held_out_by_one_task_is_never_trained_by_another():
    # 1-digit sums are a subset of 2-digit ones: the 2-digit task must not train on the 1-digit task's held-out set
    task = MixtureTask.model_validate(
        {
            "tasks": {
                "small": {"kind": "addition", "max_digits": 1, "eval_size": 40},
                "big": {"kind": "addition", "max_digits": 2, "eval_size": 40},
            }
        }
    )
    small_held = {p.prompt_id for p in tasks.eval_set(task.tasks["small"])}
    big_trained = {p.prompt_id for p in itertools.islice(tasks.training_stream(task.tasks["big"], 0), 8000)}
    assert small_held & big_trained  # alone, the big task would train on them
    mixed = {p.prompt_id for p in itertools.islice(tasks.training_stream(task, seed=0), 8000)}
    assert mixed and not mixed & small_held
    assert len(tasks.eval_set(task)) == len({p.prompt_id for p in tasks.eval_set(task)})  # each prompt once


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tasks": {}}, "at least 1"),
        ({"tasks": {"Add": {"kind": "addition"}}}, "name 'Add'"),
        ({"tasks": {"a": {"kind": "addition"}}, "weights": {"b": 1}}, "one weight per task"),
        ({"tasks": {"a": {"kind": "addition"}}, "weights": {"a": -1}}, "finite and >= 0"),
        ({"tasks": {"a": {"kind": "addition"}}, "weights": {"a": 0}}, "at least one > 0"),
        ({"tasks": {"a": {"kind": "addition"}, "c": {"kind": "capitals"}}}, "verifier differ"),
        ({"tasks": {"m": {"kind": "mixture", "tasks": {"a": {"kind": "addition"}}}}}, "kind"),
    ],
)
def test_bad_mixtures_are_refused_naming_the_fix(raw, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": {"kind": "mixture", **raw}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_tiny_models_take_reversal_and_digit_mixtures_but_not_others():
    assert load_config(None, ["task.kind=reversal"]).task.kind == "reversal"
    with pytest.raises(ConfigError, match="tiny models are built for the built-in task only"):
        load_config(
            None,
            ["task={kind: mixture, tasks: {a: {kind: addition}, w: {kind: word_problems, verifier: exact}}}"],
        )


def test_sft_task_must_name_a_task_of_the_mixture():
    with pytest.raises(ConfigError, match="student.sft_task: 'reversal' names a task of a mixture"):
        load_config(None, ["student.sft_task=reversal"])
    with pytest.raises(ConfigError, match=r"teachers.adder.model.sft_task: 'subtraction' is not a task"):
        load_config(DEMO, ["teachers.adder.model.sft_task=subtraction"])


def test_demo_config_routes_each_task_to_its_expert():
    cfg = load_config(DEMO)
    pools = cfg.teacher_pools()
    assert {name: p.model.sft_task for name, p in pools.items()} == {
        "adder": "addition",
        "reverser": "reversal",
    }
    assert set(tasks.task_names(cfg.task)) == {"addition", "reversal"}
    names = list(pools)
    for p in itertools.islice(tasks.training_stream(cfg.task, seed=0), 20):
        expert = "adder" if p.metadata["task"] == "addition" else "reverser"
        assert cfg.routing.route(p.metadata, names) == {expert: 1.0}
    assert cfg.unreached_teachers() == []
    # every answer fits the sampled length (with its end-of-sequence token)
    assert max(len(p.answer) for p in tasks.eval_set(cfg.task)) < cfg.sampling.max_new_tokens


def test_expert_recipe_differs_by_sft_task_and_unset_keeps_the_old_names():
    cfg = load_config(DEMO)
    adder, reverser = (cfg.for_teacher(n) for n in ("adder", "reverser"))
    other = adder.teacher.model_copy(update={"sft_task": "reversal"})  # only sft_task differs
    assert recipe("teacher", adder.teacher, adder) != recipe("teacher", other, adder)
    same = reverser.teacher.model_copy(update={"sft_task": "addition", "sft_steps": adder.teacher.sft_steps})
    assert recipe("teacher", adder.teacher, adder) == recipe("teacher", same, reverser)
    plain = load_config(None)
    assert "sft_task" not in recipe("teacher", plain.teacher, plain)[2]  # shipped models keep their names


def test_a_mixtures_jsonl_files_are_checked_by_their_task_name(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text('{"prompt": "2+2=", "answer": "4", "topic": "sums"}\n')
    task = MixtureTask.model_validate(
        {
            "tasks": {
                "mine": {"kind": "jsonl", "train_path": str(good), "eval_path": str(tmp_path / "nope.jsonl")},
                "addition": {"kind": "addition"},
            }
        }
    )
    ((field, message),) = tasks.task_problems(task)
    assert field == "task.tasks.mine.eval_path" and "does not exist" in message
    mine = task.tasks["mine"].model_copy(update={"eval_path": None})
    only_mine = task.model_copy(
        update={"tasks": {**task.tasks, "mine": mine}, "weights": {"mine": 1, "addition": 0}}
    )
    p = next(tasks.training_stream(only_mine, 0))
    # the mixture's tag, and the row's own fields (what routing.field can name)
    assert p.metadata == {"topic": "sums", "task": "mine"} and p.prompt == "2+2="


def test_jsonl_rows_other_scalar_fields_are_prompt_metadata(tmp_path):
    path = tmp_path / "t.jsonl"
    many = {f"f{i}": i for i in range(40)}
    rows = [
        {"prompt": "a", "answer": "1", "id": "x", "topic": "sums", "hard": True, "level": 3, "tags": ["no"]},
        {"prompt": "b", "long": "y" * 2000, **many},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = tasks.read_jsonl_problems(path)
    assert first.metadata == {"topic": "sums", "hard": "true", "level": "3"}  # lists are not metadata
    assert "long" not in second.metadata and len(second.metadata) == 32
