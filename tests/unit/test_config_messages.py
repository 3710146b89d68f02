"""Load-time errors are shown at the key a user writes, with a way forward even when no spelling is close."""

from __future__ import annotations

import pytest

from opd.config import ConfigError, load_config


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(None, list(overrides))
    return str(exc.value)


def test_a_key_one_section_down_is_suggested():
    err = _error("learner.zero_stage=2")
    assert "learner.zero_stage: unknown key; did you mean learner.deepspeed.zero_stage?" in err


def test_an_unknown_key_with_no_close_match_lists_the_section_keys():
    err = _error("broker.zzz=1")
    line = next(x for x in err.splitlines() if x.strip().startswith("broker.zzz:"))
    assert "broker has:" in line and "max_depth" in line


def test_a_section_check_naming_its_own_key_is_shown_at_that_key():
    err = _error("learner.correction.mode=decoupled", "learner.correction.proximal=none")
    assert "  learner.correction.mode: decoupled needs the proximal policy" in err
    assert "  learner: " not in err
