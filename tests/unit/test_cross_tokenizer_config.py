"""`tokenizer: same | different` at config load: where it is declared, what it refuses, and no silent fallback."""

from __future__ import annotations

import pytest

from opd.config import ConfigError, load_config
from tests.conftest import REPO

CROSS = str(REPO / "configs" / "cross_tokenizer.yaml")


def test_a_teacher_entry_declares_its_pools_tokenizer():
    cfg = load_config(CROSS, [])
    assert cfg.for_teacher("bpe").scorer.tokenizer == "different"
    assert load_config(None, []).scorer.tokenizer == "same"  # the strict check stays the default


def test_a_tiny_teacher_of_another_tokenizer_must_be_declared():
    with pytest.raises(ConfigError, match=r"bpe-32 but student.tokenizer: char.*set tokenizer: different"):
        load_config(CROSS, ["teachers.bpe.tokenizer=same"])


def test_the_entry_and_its_scorer_overrides_must_agree():
    with pytest.raises(
        ConfigError, match=r"teachers.bpe.tokenizer=different but teachers.bpe.scorer.tokenizer=same"
    ):
        load_config(CROSS, ["teachers.bpe.scorer={tokenizer: same}"])


def test_what_is_not_built_with_another_tokenizer_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"scorer.context with tokenizer: different is not built yet"):
        load_config(CROSS, ["scorer.context={system_prompt: Be exact.}"])
    with pytest.raises(ConfigError, match=r"needs its tokenizer here"):
        load_config(CROSS, ["teachers.bpe.scorer={engine: remote, remote: {url: 'http://127.0.0.1:1'}}"])
