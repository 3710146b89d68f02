"""The streaming sampler (opd.models.slots) on a tiny random Llama: continuous batching is batch generation with
sequences joining and leaving, weight updates between steps stamp token versions, and the behaviour logprobs of a
sequence that crossed an update are each token's own version's."""

import copy

import pytest
import torch

from opd.models.sampler import response_logprobs, sample
from opd.models.slots import SlotSampler
from tests.scored import VOCAB, tiny_model

PAD, EOS = 0, 2  # tests.scored's tiny Llama
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4, 8], [1, 3], [1, 7, 7, 7, 7, 7, 7, 7, 3], [1, 6, 5]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0).eval()


def sampler(model, **kw) -> SlotSampler:
    args = {"eos_ids": [EOS], "pad_id": PAD, "max_new_tokens": 12, "temperature": 1.0} | kw
    return SlotSampler(model, **args)


def run_stream(slots: SlotSampler, prompts, seeds, max_inflight: int, version=lambda step: 0) -> dict:
    """Admit as slots free (at most max_inflight in flight), step until all end: {key: Sample}."""
    waiting = list(enumerate(prompts))
    done, step = {}, 0
    while waiting or slots.inflight():
        while waiting and slots.inflight() < max_inflight:
            i, p = waiting.pop(0)
            slots.start(str(i), p, seeds[i])
        for key, smp in slots.step(version(step)):
            done[key] = smp
        step += 1
    return done


def test_greedy_streaming_equals_the_batch_sampler(model):
    """Temperature 0 leaves nothing to chance: two at a time with refills gives opd.models.sampler.sample's
    batch output token for token, with the same behaviour logprobs."""
    batch = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=12, temperature=0.0)
    stream = run_stream(sampler(model, temperature=0.0), PROMPTS, list(range(len(PROMPTS))), max_inflight=2)
    for i, b in enumerate(batch):
        s = stream[str(i)]
        assert s.response_ids == b.response_ids
        assert s.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(s.behaviour_logprobs), torch.tensor(b.behaviour_logprobs))


@pytest.mark.parametrize("max_inflight", [1, 2, 5])
def test_continuous_batching_samples_what_batch_generation_samples(model, max_inflight):
    """Per-sequence seeds: which sequences share a step does not change what each samples."""
    prompts = PROMPTS * 3
    seeds = [1000 + i for i in range(len(prompts))]
    whole = run_stream(sampler(model), prompts, seeds, max_inflight=len(prompts))
    refilled = run_stream(sampler(model), prompts, seeds, max_inflight=max_inflight)
    lengths = {len(s.response_ids) for s in whole.values()}
    assert len(lengths) > 1  # sequences end at different steps: slots were really refilled mid-batch
    for key, s in whole.items():
        assert refilled[key].response_ids == s.response_ids
        torch.testing.assert_close(
            torch.tensor(refilled[key].behaviour_logprobs),
            torch.tensor(s.behaviour_logprobs),
            atol=1e-5,
            rtol=0,
        )
        assert s.token_versions == [0] * len(s.response_ids)


def test_distinct_seeds_draw_distinct_samples(model):
    out = run_stream(sampler(model), [PROMPTS[0]] * 8, list(range(8)), max_inflight=8)
    assert len({tuple(s.response_ids) for s in out.values()}) > 1


def perturbed(model, scale: float = 0.5, seed: int = 7):
    """'Version 1': the same architecture with every weight moved, as a large learner step would."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return other


def crossing_run(model, mode: str, update_at: int = 3):
    """Six sequences in flight; after `update_at` steps the weights in the model become version 1 and the
    sampler is told so as the actor's engine tells it (recompute / restart / continue)."""
    live = copy.deepcopy(model)
    v1 = perturbed(model)
    slots = sampler(live, max_new_tokens=10, eos_ids=[VOCAB + 5])  # no EOS: every sequence crosses the update
    for i, p in enumerate(PROMPTS):
        slots.start(str(i), p, 50 + i)
    out, version = {}, 0
    for step in range(40):
        if step == update_at:
            live.load_state_dict(v1.state_dict())
            version = 1
            if mode == "recompute":
                slots.recompute()
            elif mode == "restart":
                slots.restart()
        out.update(slots.step(version))
        if not slots.inflight():
            break
    return out, v1


def per_version_logprobs(model, v1, prompt, smp):
    """Each token's logprob recomputed with the weights of the version that sampled it."""
    seq = [(prompt, smp.response_ids)]
    by_version = {
        0: response_logprobs(model, seq, pad_id=PAD)[0][0],
        1: response_logprobs(v1, seq, pad_id=PAD)[0][0],
    }
    return torch.stack([by_version[v][t] for t, v in enumerate(smp.token_versions)])


def test_recompute_behaviour_logprobs_are_each_tokens_own_version(model):
    out, v1 = crossing_run(model, "recompute")
    for i, p in enumerate(PROMPTS):
        smp = out[str(i)]
        assert smp.token_versions == [0] * 3 + [1] * 7  # the versions held at each step
        torch.testing.assert_close(
            torch.tensor(smp.behaviour_logprobs), per_version_logprobs(model, v1, p, smp), atol=1e-5, rtol=0
        )


def test_continue_keeps_old_keys_and_values_so_later_tokens_are_neither_version(model):
    """The stated consequence of actor.on_new_weights: continue, measured: the tokens sampled before the update
    are version 0's exactly; after it they are sampled with new weights reading keys/values that version 0
    computed, which differs from version 1's recomputation."""
    out, v1 = crossing_run(model, "continue")
    gaps = []
    for i, p in enumerate(PROMPTS):
        smp = out[str(i)]
        assert smp.token_versions == [0] * 3 + [1] * 7
        gap = (torch.tensor(smp.behaviour_logprobs) - per_version_logprobs(model, v1, p, smp)).abs()
        assert gap[:3].max() < 1e-5
        gaps.append(gap[3:].max())
    assert max(gaps) > 1e-3


def test_restart_drops_the_tokens_and_samples_all_under_the_new_version(model):
    out, v1 = crossing_run(model, "restart")
    for i, p in enumerate(PROMPTS):
        smp = out[str(i)]
        assert smp.token_versions == [1] * 10
        torch.testing.assert_close(
            torch.tensor(smp.behaviour_logprobs), per_version_logprobs(model, v1, p, smp), atol=1e-5, rtol=0
        )


def test_abort_drops_everything_in_flight(model):
    slots = sampler(model)
    for i, p in enumerate(PROMPTS):
        slots.start(str(i), p, i)
    slots.step(0)
    slots.start("late", PROMPTS[0], 99)
    assert slots.abort() == len(PROMPTS) + 1
    assert slots.inflight() == 0 and slots.step(0) == []
