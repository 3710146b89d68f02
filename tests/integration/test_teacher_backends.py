"""Teacher backends: the registry that maps the config onto one file per backend, the HF teacher's exact tail mass
(`teacher_tail_logprobs`), and the scorer's retry policy around a teacher that fails on one input."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch

from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.protocol import LOGPROB_FLOOR, Trajectory, decode, encode
from teacher_scorers.backends import BACKENDS, backend_name
from teacher_scorers.backends.hf import HFTeacher
from teacher_scorers.scorer import RetryPolicy, score_with_retries
from tests.conftest import TINY

TOPK = 4
# (prompt, response) ids inside the tiny models' 16-token vocabulary
SEQS = [([1, 5, 6, 9, 10], [7, 8, 2, 11, 12, 13]), ([3, 4], [9, 9, 9, 1]), ([2], [5])]


@pytest.mark.parametrize(
    "overrides, name",
    [
        ([], "hf"),
        (["scorer.engine=vllm"], "vllm"),
        (["scorer.engine=remote", "scorer.remote.url=http://x:1"], "sglang"),
        (["scorer.engine=remote", "scorer.remote.url=http://x:1", "scorer.remote.api=openai"], "openai"),
    ],
)
def test_the_config_names_one_registered_backend(overrides, name):
    """`scorer.engine` and `scorer.remote.api` map onto BACKENDS in one place; each entry names a class that
    exists, and importing its file does not need vllm (imported only when a vLLM teacher starts)."""
    assert backend_name(load_config(TINY, overrides).scorer) == name
    module, attr = BACKENDS[name].split(":")
    assert callable(importlib.import_module(module).__dict__[attr].score)


def _trajs() -> list[Trajectory]:
    return [
        Trajectory(
            run_id="t",
            prompt_id=f"p{i}",
            group_id=f"g{i}",
            sample_index=0,
            prompt_token_ids=np.asarray(p, dtype=np.int32),
            response_token_ids=np.asarray(r, dtype=np.int32),
            behaviour_logprobs=np.full(len(r), -1.0, dtype=np.float32),
            policy_version=0,
        )
        for i, (p, r) in enumerate(SEQS)
    ]


@pytest.fixture(scope="module")
def assets(quick_models):
    return ensure_assets(load_config(TINY, quick_models))


def _teacher(models: list[str], assets, *extra: str) -> HFTeacher:
    return HFTeacher(load_config(TINY, [*models, *extra]), assets)


@torch.no_grad()
def _float64_reference(model: torch.nn.Module, temperature: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k ids and log tail mass per response token, from a float64 copy of the model, one sequence at a time."""
    m64 = copy.deepcopy(model).double()
    out = []
    for p, r in SEQS:
        z = m64(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) - 1 + len(r)] / temperature
        top = z.topk(TOPK, -1).indices
        tail = torch.logsumexp(z.scatter(-1, top, float("-inf")), -1) - torch.logsumexp(z, -1)
        out.append((top.numpy(), tail.numpy()))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_a_peaked_teachers_tail_is_exact_and_survives_the_wire(quick_models, assets, temperature):
    """Sharpened until it keeps under 1e-8 of its mass outside its top 4 (the untrained tiny teacher needs a larger
    factor than a trained one), 1 - sum(exp(top-k)) in float32 is rounding noise, while the scorer's logsumexp
    tail matches a float64 reference."""
    teacher = _teacher(quick_models, assets, f"scorer.topk={TOPK}", f"scorer.temperature={temperature}")
    for _ in range(16):  # logits = lm_head(norm(h)): scaling the final norm scales every logit
        if max(tail.max() for _, tail in _float64_reference(teacher.model, temperature)) < np.log(1e-8):
            break
        with torch.no_grad():
            teacher.model.model.norm.weight.mul_(2.0)
    trajs = _trajs()
    teacher.score(trajs)
    for t, (ref_ids, ref_tail) in zip(trajs, _float64_reference(teacher.model, temperature), strict=True):
        got = decode(encode(t), vocab_size=teacher.vocab_size, require_scored=True)
        assert got.teacher_tail_logprobs.dtype == np.float32
        np.testing.assert_array_equal(got.teacher_tail_logprobs, t.teacher_tail_logprobs)
        np.testing.assert_array_equal(got.teacher_topk_ids, ref_ids)
        assert (ref_tail < np.log(1e-8)).all() and (ref_tail > LOGPROB_FLOOR).all()  # peaked, not floored
        assert np.isfinite(got.teacher_tail_logprobs).all()
        np.testing.assert_allclose(got.teacher_tail_logprobs, ref_tail, rtol=1e-5, atol=1e-4)
        # what the field exists for: the float32 complement is rounding noise (0 or an ulp of 1), off by > 1 nat
        naive = 1.0 - np.exp(got.teacher_topk_logprobs).sum(-1, dtype=np.float32)
        assert (np.abs(np.log(np.maximum(naive, 1e-45)) - ref_tail) > 1.0).all()


def test_tail_completes_the_top_k_and_is_absent_without_one(quick_models, assets):
    trajs = _trajs()
    _teacher(quick_models, assets, f"scorer.topk={TOPK}").score(trajs)
    for t in trajs:
        mass = np.exp(t.teacher_topk_logprobs.astype(np.float64)).sum(-1) + np.exp(t.teacher_tail_logprobs)
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)
    _teacher(quick_models, assets, "scorer.topk=16").score(trajs)  # k = vocabulary: no tail, floored
    assert all((t.teacher_tail_logprobs == LOGPROB_FLOOR).all() for t in trajs)
    trajs = _trajs()
    _teacher(quick_models, assets, "scorer.topk=0").score(trajs)  # no top-k, so no tail either
    assert all(t.teacher_topk_ids is None and t.teacher_tail_logprobs is None for t in trajs)


def test_a_batch_failure_is_isolated_and_not_retried(quick_models, assets):
    """A teacher that raises on one input (an unclassified error, as a model's would be) fails the batch; the
    scorer scores the rest one by one, and does not retry or back off for an error nobody called retryable."""
    teacher = _teacher(quick_models, assets, f"scorer.topk={TOPK}")
    calls: list[int] = []

    def score(batch: list[Trajectory]) -> None:
        calls.append(len(batch))
        if any(t.prompt_id == "p1" for t in batch):
            raise RuntimeError("the teacher fails on p1")
        teacher.score(batch)

    trajs, slept = _trajs(), []
    failures = score_with_retries(score, trajs, RetryPolicy(retries=3, backoff_s=1.0), sleep=slept.append)
    assert failures == {1: "the teacher fails on p1"} and slept == [] and calls == [3, 1, 1, 1]
    assert trajs[1].teacher_logprobs is None
    assert all(t.teacher_logprobs is not None for i, t in enumerate(trajs) if i != 1)
