"""Load-time errors a newcomer can act on: an unknown key names the key meant, and locations are the dotted keys a
user writes (no variant name such as `pretrained` in the middle)."""

from __future__ import annotations

import pytest

from opd.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["learner.max_stepz=3"], "learner.max_stepz: unknown key; did you mean learner.max_steps?"),
        (["lerner.max_steps=3"], "lerner: unknown key; did you mean learner?"),
        (["scorer.remote.urll=x"], "scorer.remote.urll: unknown key; did you mean scorer.remote.url?"),
        (
            ["task.kind=jsonl", "task.train_pth=x"],
            "task.train_pth: unknown key; did you mean task.train_path?",
        ),
        (["broker.type=redis", "broker.urll=x"], "broker.urll: unknown key; did you mean broker.url?"),
    ],
)
def test_unknown_key_names_the_key_meant(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_a_key_of_the_other_kind_names_that_kind():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.name_or_path=/m"])
    assert "student.name_or_path: unknown key for student.kind: tiny" in str(err.value)
    assert "set student.kind=pretrained" in str(err.value)


def test_no_close_key_keeps_the_plain_message():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.zzzzzz=1"])
    assert "learner.zzzzzz: unknown key; check the spelling" in str(err.value)
    assert "did you mean" not in str(err.value)


def test_locations_are_the_keys_a_user_writes():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.kind=pretrained", "teacher.kind=pretrained", "teacher.name_or_path=t"])
    assert "  student.name_or_path: Field required" in str(err.value)
    assert "pretrained.name_or_path" not in str(err.value)


def test_a_cross_section_error_is_shown_at_its_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.kind=pretrained", "student.name_or_path=/nonexistent/model"])
    assert "\n  teacher.kind: tiny while the other model is pretrained" in str(err.value)
    assert "<root>" not in str(err.value)
