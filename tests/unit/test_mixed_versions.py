"""The importance correction is exact for a sequence whose tokens were sampled by two weight versions.

A streaming actor takes new weights while a sequence is in flight (issue 21), so one trajectory's tokens come from
versions 0 and 1 (`token_versions`). The probability the behaviour policy gave such a sequence is the product of
each token's probability under the weights that sampled it, so the ratio the learner needs is exp(s_t - b_t) with
b_t from the token's own version: per token (`level: token`) or as the sequence's geometric mean (`level:
sequence`). The learner does nothing per version; it is exact because the actor stamps each token's own b_t. These
tests check that on the production path: tokens really sampled by two perturbed copies of the tiny model, b_t from
`response_logprobs` with each token's version, the messages through the protocol, `collate` and the registered
objective in `TorchEngine.step` (what the learner's step calls), against float64 references (tests/unit/
test_loss_reference.py for loss, gradients and metrics; here the importance weights from s and b directly). The
same batch stamped with version 0's logprobs for every token gives other weights, so the checks can fail.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from learner.batching import collate
from learner.engines.torch import TorchEngine
from learner.intake import lag, token_lags
from opd.config import load_config
from opd.models.sampler import response_logprobs
from opd.protocol import Trajectory, decode, encode
from tests.scored import VOCAB, tiny_model
from tests.unit.test_loss_reference import BASE, TAU_S, TAU_T, D, K, check

N, MAX_NEW = 8, 7
CAP = 10.0  # high enough that the weights below are mostly the raw ratios, so a wrong b_t shows
LEARNER_VERSION = 2  # the learner holds tiny_model(0): both behaviour versions are older perturbations of it


def perturbed(scale: float, seed: int) -> torch.nn.Module:
    """A version of the learner's weights from before some updates: tiny_model(0) plus seeded noise."""
    model = tiny_model(0, D)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=D))
    return model


@pytest.fixture(scope="module")
def versions() -> list[torch.nn.Module]:
    return [perturbed(0.1, 10), perturbed(0.05, 11)]  # version 0, version 1 (closer to the learner)


def sample(models, prompt: list[int], token_versions: list[int], gen: torch.Generator) -> list[int]:
    """Each token drawn at TAU_S from the weights of its own version over the whole prefix (what
    `on_new_weights: recompute` gives; under `continue` the prefix's keys/values stay the older weights', and b_t
    is whatever distribution the actor drew from: the learner's ratio is exact for the b_t it is sent)."""
    ids = list(prompt)
    for v in token_versions:
        with torch.no_grad():
            logits = models[v](input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(torch.multinomial(torch.softmax(logits / TAU_S, -1), 1, generator=gen)))
    return ids[len(prompt) :]


def behaviour(models, prompt: list[int], response: list[int], token_versions: list[int]) -> np.ndarray:
    """b_t of each token under the version that sampled it (the actor's convention: raw logits / TAU_S)."""
    per_version = [
        response_logprobs(m, [(prompt, response)], pad_id=0, temperature=TAU_S)[0][0].numpy() for m in models
    ]  # (T,) per version
    return np.array([per_version[v][t] for t, v in enumerate(token_versions)], dtype=np.float32)


@pytest.fixture(scope="module")
def mixed(versions) -> list[Trajectory]:
    """N trajectories: most switch from version 0 to 1 mid-response, one is all version 0, one all version 1."""
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(N):
        P, T = int(rng.integers(2, 5)), int(rng.integers(3, MAX_NEW + 1))
        switch = {0: T, 1: 0}.get(i, int(rng.integers(1, T)))  # first token sampled by version 1
        tv = [0] * switch + [1] * (T - switch)
        prompt = [1, *rng.integers(3, VOCAB, size=P - 1).tolist()]
        response = sample(versions, prompt, tv, gen)
        teacher = torch.log_softmax(torch.tensor(rng.normal(scale=2.0, size=(T, VOCAB))) / TAU_T, -1)
        top_lp, top_ids = teacher.topk(K, -1)
        t = Trajectory(
            run_id="mixed",
            prompt_id=f"p{i // 2}",
            group_id=f"g{i // 2}",
            sample_index=i % 2,
            prompt_token_ids=np.array(prompt, dtype=np.int32),
            response_token_ids=np.array(response, dtype=np.int32),
            behaviour_logprobs=behaviour(versions, prompt, response, tv),
            policy_version=tv[0],
            token_versions=np.array(tv, dtype=np.int32),
            behaviour_temperature=TAU_S,
            teacher_logprobs=teacher[torch.arange(T), response].numpy().astype(np.float32),
            teacher_topk_ids=top_ids.numpy().astype(np.int32),
            teacher_topk_logprobs=top_lp.numpy().astype(np.float32),
            teacher_tail_logprobs=torch.logsumexp(teacher.scatter(-1, top_ids, -math.inf), -1)
            .numpy()
            .astype(np.float32),
            teacher_temperature=TAU_T,
            reward=float(rng.integers(0, 2)),
        )
        out.append(decode(encode(t), vocab_size=VOCAB, require_scored=True))  # as the learner receives it
    assert sum(len(set(t.token_versions.tolist())) > 1 for t in out) == N - 2
    return out


def stamped_with_version_0(versions, trajs: list[Trajectory]) -> list[Trajectory]:
    """The same tokens with every b_t from version 0: what an actor that ignored its in-flight update would send."""
    return [
        replace(
            t,
            behaviour_logprobs=behaviour(
                versions,
                t.prompt_token_ids.tolist(),
                t.response_token_ids.tolist(),
                [0] * len(t.token_versions),
            ),
        )
        for t in trajs
    ]


def learner_logprobs(t: Trajectory) -> np.ndarray:
    """s_t in float64 from the learner's weights (tiny_model(0)), one sequence alone."""
    ids = torch.tensor([[*t.prompt_token_ids.tolist(), *t.response_token_ids.tolist()]])
    P, T = len(t.prompt_token_ids), len(t.response_token_ids)
    with torch.no_grad():
        logp = torch.log_softmax(
            tiny_model(0, D)(input_ids=ids).logits[0, P - 1 : P - 1 + T].double() / TAU_S, -1
        )
    return logp[torch.arange(T), torch.tensor(t.response_token_ids.tolist())].numpy()


def reference_weights(trajs: list[Trajectory], level: str) -> tuple[float, float]:
    """(importance_weight, clip_fraction) of `tis` in float64: token-mean of min(r_t, CAP), r_t = exp(s_t - b_t)
    (token level) or exp(mean_u(s_u - b_u)) of its sequence (sequence level)."""
    weights, clipped = [], []
    for t in trajs:
        lr = learner_logprobs(t) - t.behaviour_logprobs.astype(np.float64)
        r = np.exp(lr) if level == "token" else np.full(len(lr), math.exp(lr.mean()))
        weights += np.minimum(r, CAP).tolist()
        clipped += (r > CAP).tolist()
    return sum(weights) / len(weights), sum(clipped) / len(clipped)


def engine_record(trajs: list[Trajectory], level: str) -> dict[str, float]:
    over = [
        "learner.correction.mode=tis",
        f"learner.correction.level={level}",
        f"learner.correction.cap={CAP}",
    ]
    engine = TorchEngine(tiny_model(0, D), load_config(None, BASE + over))
    return engine.step(collate(copy.deepcopy(trajs), 0))


def test_the_fixture_samples_each_token_with_its_own_version(versions, mixed):
    """b_t is each token's logprob under its version: the two versions disagree on the switched tokens (so which
    one stamped b_t matters), and the learner judges the whole sequence by its oldest token."""
    for t in mixed:
        tv = t.token_versions.tolist()
        prompt, response = t.prompt_token_ids.tolist(), t.response_token_ids.tolist()
        np.testing.assert_array_equal(t.behaviour_logprobs, behaviour(versions, prompt, response, tv))
        assert lag(t, LEARNER_VERSION) == LEARNER_VERSION - tv[0]
        assert token_lags(t, LEARNER_VERSION).tolist() == [LEARNER_VERSION - v for v in tv]
    v0 = stamped_with_version_0(versions, mixed)
    on_v1 = np.concatenate([t.token_versions == 1 for t in mixed])
    gap = np.abs(
        np.concatenate([t.behaviour_logprobs for t in mixed])
        - np.concatenate([t.behaviour_logprobs for t in v0])
    )
    assert gap[~on_v1].max() == 0 and gap[on_v1].min() > 0 and gap[on_v1].mean() > 0.05


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_weights_are_the_ratio_to_each_tokens_own_version(versions, mixed, level):
    got = engine_record(mixed, level)
    want, want_clipped = reference_weights(mixed, level)
    assert got["importance_weight"] == pytest.approx(want, rel=1e-6)
    assert got["clip_fraction"] == pytest.approx(want_clipped, abs=1e-12)
    # b_t all from version 0 would give other weights: the reference tells them apart, and the learner follows
    # whichever b_t the message carries
    wrong = stamped_with_version_0(versions, mixed)
    want_wrong, _ = reference_weights(wrong, level)
    assert abs(want_wrong - want) > 1e-2 * want
    assert engine_record(wrong, level)["importance_weight"] == pytest.approx(want_wrong, rel=1e-6)


PG = ["learner.loss=reverse_kl_pg"]
CASES = {
    "tis-token": [*PG, "learner.correction.mode=tis"],
    "tis-sequence": [*PG, "learner.correction.mode=tis", "learner.correction.level=sequence"],
    "ppo-token": [*PG, "learner.correction.mode=ppo_clip"],
    "ppo-sequence": [*PG, "learner.correction.mode=ppo_clip", "learner.correction.level=sequence"],
    "decoupled-sequence": [
        *PG,
        "learner.correction.mode=decoupled",
        "learner.correction.level=sequence",
        "learner.minibatches=2",
    ],
    "mask-token": [*PG, "learner.correction.mode=mask"],
    "topk-tis-sequence": ["learner.loss=topk_forward_kl", "learner.correction.level=sequence"],
    "hybrid-tis-token": ["learner.loss=hybrid", "learner.hybrid.distill=topk_forward_kl"],
}


@pytest.mark.parametrize("case", CASES)
def test_loss_gradient_and_metrics_match_the_float64_reference(mixed, case):
    """The whole step (loss, each optimiser step's gradient, correction metrics) on mixed-version sequences."""
    check(CASES[case], mixed)
