"""Lag is counted per response token: a streaming actor's trajectory may mix weight versions (`token_versions`),
so the step record's staleness figures and the run's lag histogram count each token at its own lag, while the
drop (`max_staleness`) judges a trajectory by its oldest token."""

from __future__ import annotations

import numpy as np
import pytest

from learner.intake import lag, token_lags
from learner.learner import staleness_figures
from learner.state import Progress
from tests.unit.test_protocol import make


def traj(policy_version: int, versions: list[int] | None = None, length: int = 3):
    n = len(versions) if versions is not None else length
    return make(
        policy_version=policy_version,
        token_versions=None if versions is None else np.array(versions, dtype=np.int32),
        response_token_ids=np.full(n, 7, dtype=np.int32),
        behaviour_logprobs=np.full(n, -0.5, dtype=np.float32),
        teacher_logprobs=None,
        teacher_topk_ids=None,
        teacher_topk_logprobs=None,
    )


def test_each_token_lags_by_the_version_that_sampled_it():
    crossed = traj(4, [4, 4, 5, 6, 6])
    assert token_lags(crossed, 6).tolist() == [2, 2, 1, 0, 0]
    assert lag(crossed, 6) == 2  # the oldest token decides the drop
    no_versions = traj(5, length=4)  # every token is policy_version's
    assert token_lags(no_versions, 6).tolist() == [1, 1, 1, 1]


def test_step_figures_count_tokens_not_trajectories():
    # learner at version 6, max_staleness 2: 5 + 4 + 2 = 11 tokens
    batch = [traj(4, [4, 4, 5, 6, 6]), traj(5, length=4), traj(6, [6, 6])]
    got = staleness_figures(batch, version=6, max_staleness=2)
    assert got["lag_histogram"] == [4, 5, 2]  # tokens at lag 0, 1, 2; per trajectory it would be [1, 1, 1]
    assert got["staleness_mean"] == pytest.approx((2 + 2 + 1 + 0 + 0 + 4 * 1 + 0 + 0) / 11)
    assert got["staleness_max"] == 2
    assert got["versions_per_trajectory"] == pytest.approx((3 + 1 + 1) / 3)
    assert got["mixed_version_trajectories"] == 1


def test_a_weight_newer_than_the_learner_counts_at_lag_zero():
    """After a resume from an older checkpoint, actors may hold newer weights: lag < 0, binned at 0."""
    got = staleness_figures([traj(3, [3, 4])], version=3, max_staleness=1)
    assert got["lag_histogram"] == [2, 0] and got["staleness_mean"] == -0.5 and got["staleness_max"] == 0


def test_the_run_histogram_sums_the_steps_and_an_old_state_still_loads():
    """A state.json written when lag_histogram counted trajectories loads as it is; a resume with a larger
    max_staleness widens it."""
    old = Progress(max_staleness=1, step=3, version=2)
    old.record(["a", "b", "c"], [2, 1], [2, 1, 2], 0.5)
    st = old.to_json({})
    assert st["lag_histogram"] == [2, 1]
    resumed = Progress.from_json(st, max_staleness=2, resumed_from="step-000003")
    step = staleness_figures([traj(2, [2, 3, 4])], version=4, max_staleness=2)["lag_histogram"]
    resumed.record(["d"], step, [2], 0.4)
    assert resumed.lag_histogram == [3, 2, 1] and resumed.max_policy_version == 2
