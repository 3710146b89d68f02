"""The vLLM engines' config and plumbing that need no vllm: they run in the main suite."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from opd.config import ConfigError, load_config
from tests.conftest import REPO, TINY


def test_engine_vllm_is_accepted_with_its_keys():
    cfg = load_config(
        TINY,
        [
            "actor.engine=vllm",
            "scorer.engine=vllm",
            "actor.vllm.cpu_kv_cache_gb=2",
            "actor.keep_kv_cache=true",
        ],
    )
    assert cfg.actor.engine == "vllm" and cfg.scorer.engine == "vllm"
    assert cfg.actor.vllm.cpu_kv_cache_gb == 2 and cfg.actor.keep_kv_cache
    assert cfg.scorer.vllm.enforce_eager  # the default: start in seconds, no graph capture


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor.vllm.cpu_kv_cache_gb=0.5"], "cpu_kv_cache_gb"),
        (["scorer.vllm.gpu_memory_utilization=1.5"], "gpu_memory_utilization"),
        (["actor.vllm.dtype=float64"], "dtype"),
    ],
)
def test_bad_vllm_settings_are_refused_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_reference_yaml_lists_the_vllm_keys_at_their_defaults():
    ref = yaml.safe_load((REPO / "configs" / "reference.yaml").read_text())
    assert ref["actor"]["engine"] == "hf" and ref["actor"]["keep_kv_cache"] is False
    assert ref["actor"]["vllm"]["cpu_kv_cache_gb"] == 1 and ref["scorer"]["vllm"]["dtype"] == "auto"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_missing_vllm_is_reported_with_the_install_command():
    from opd.config import VLLMEngineConfig
    from opd.models.vllm_support import make_llm

    with pytest.raises(ImportError, match="setup_vllm_env.sh"):
        make_llm(VLLMEngineConfig(), "unused", dtype="float32", device="cpu", seed=0)
