"""Verifiers (opd/verifiers.py): each built-in one on the cases it exists for, the custom `module:function` one
imported from a module on sys.path, and the load-time refusals naming task.verifier."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest

from opd import tasks, verifiers
from opd.config import JsonlTask, load_config


@pytest.mark.parametrize(
    "answer, completion, expected",
    [
        ("42", "The answer is 42.", True),
        ("42", "42 apples, so 40 left.", False),  # the last number counts, not the first
        ("-7", "5 - 12 = -7", True),
        ("-7", "12-5=7", False),  # a minus between digits is a subtraction, not a sign
        ("7", "12-5=7", True),
        ("-3", "It is \u22123", True),  # Unicode minus
        ("1234.5", "Total: $1,234.50", True),  # thousands commas and trailing zeros
        ("1,000,000", "one million is 1000000", True),
        ("0.5", "half: .5", True),
        ("3", "1,2,3", True),  # a list is not one number with commas
        ("12", "no number here", False),
        ("no number", "42", False),
        ("42", "42.1", False),
    ],
)
def test_last_number(answer, completion, expected):
    assert verifiers.last_number(answer, completion) is expected
    assert tasks.verify(answer, completion, "last_number") is expected


@pytest.mark.parametrize(
    "answer, completion, expected",
    [
        ("42", "so \\boxed{42}", True),
        ("42", "first \\boxed{7} then \\boxed{ 42 }", True),  # the last box, whitespace stripped
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", True),  # nested braces
        ("x + 1", "\\boxed{x  +\n 1}", True),  # whitespace runs collapse
        ("x+1", "\\boxed{x + 1}", False),  # but are not removed
        ("42", "\\boxed{42", False),  # never closed
        ("42", "the answer is 42", False),  # no box
        ("\\boxed{42}", "\\boxed{42}", True),  # an answer written boxed is compared by its content
    ],
)
def test_boxed(answer, completion, expected):
    assert verifiers.boxed(answer, completion) is expected
    assert tasks.verify(answer, completion, "boxed") is expected


def test_exact_and_contains_keep_their_meaning():
    assert tasks.verify("46", " 46 ") and not tasks.verify("46", "46=")
    assert tasks.verify("46", "the answer is 46", "contains") and not tasks.verify("46", "4 6", "contains")
    assert not tasks.verify(None, "46", "last_number")


def _module(tmp_path, monkeypatch, body: str) -> str:
    """A uniquely named module in a temp dir put on sys.path; returns its name."""
    name = f"custom_check_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_custom_verifier_by_import_path(tmp_path, monkeypatch):
    mod = _module(
        tmp_path,
        monkeypatch,
        """
        def check(answer, completion):
            return completion.lower().endswith(answer.lower())
        """,
    )
    task = JsonlTask(train_path=tmp_path / "t.jsonl", verifier=f"{mod}:check")
    mode = tasks.verifier_mode(task)
    assert mode == f"{mod}:check"
    assert tasks.verify("Paris", "The capital is PARIS", mode)
    assert not tasks.verify("Paris", "The capital is Lyon", mode)
    assert mod in sys.modules  # imported once, at load


@pytest.mark.parametrize(
    "body, name, message",
    [
        ("def check(a, c):\n    return True\n", "{mod}:missing", "has no attribute 'missing'"),
        ("check = 3\n", "{mod}:check", "is a int, not a function"),
        ("def check(a):\n    return True\n", "{mod}:check", "cannot be called as f\\(answer, completion\\)"),
        ("def check(a, c):\n    return 1.0\n", "{mod}:check", "returned float"),
        ("def check(a, c):\n    raise KeyError(a)\n", "{mod}:check", "raised on the probe call"),
        ("import not_a_module_anywhere_xyz\n", "{mod}:check", "does not import \\(ModuleNotFoundError"),
        ("", "not_a_module_anywhere_xyz:check", "does not import"),
        ("", "exactly", "neither a built-in verifier"),
        ("", "mod:func:extra", "neither a built-in verifier"),
    ],
)
def test_bad_verifiers_are_refused_at_load_naming_the_field(tmp_path, monkeypatch, body, name, message):
    mod = _module(tmp_path, monkeypatch, body)
    cfg = tmp_path / "run.yaml"
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "q", "answer": "a"}\n')
    spec = name.format(mod=mod)
    models = "student: {kind: pretrained, name_or_path: x}\nteacher: {kind: pretrained, name_or_path: x}\n"
    cfg.write_text(f"task: {{kind: jsonl, train_path: {train}, verifier: '{spec}'}}\n{models}")
    with pytest.raises(ValueError, match="task.verifier") as err:
        load_config(cfg)
    assert err.match(message)
