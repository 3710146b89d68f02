"""benchmarks/harness.py (exact staleness ring) and the --smoke runs of benchmarks/quality.py and staleness.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def smoke_assets(asset_cache):
    from benchmarks.quality import CONFIG, SMOKE_OVERRIDES
    from opd.config import load_config
    from opd.models.builds import ensure_assets

    overrides = [*SMOKE_OVERRIDES, f"run.cache_dir={asset_cache}", "learner.lr=1e-2"]
    cfg = load_config(CONFIG, overrides)
    return cfg, ensure_assets(cfg, log=lambda m: None)


@pytest.mark.parametrize("s", [0, 2])
def test_exact_staleness_ring(smoke_assets, s):
    """The batch trained at step k is sampled by weights version k - s (version 0 before that), exactly."""
    from benchmarks.harness import Harness, clone_state

    cfg, assets = smoke_assets
    h = Harness(cfg, assets, staleness=s, seed=0)
    versions = [clone_state(h.model)]  # learner weights after k updates = version k
    for k in range(6):
        want = max(0, k - s)
        assert h.behaviour_version() == want
        rec = h.step()
        assert rec.step == k + 1
        assert rec.policy_version == want
        assert rec.lag == min(k, s)
        # the sampler really sampled with version `want` (and the versions differ, so this is a real check)
        for name, v in h.sampler.model.state_dict().items():
            assert torch.equal(v, versions[want][name]), name
        versions.append(clone_state(h.model))
        assert len(h.ring) == min(k + 2, s + 1)
    assert any(not torch.equal(versions[0][n], versions[-1][n]) for n in versions[0])
