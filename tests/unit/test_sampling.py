"""The actor's sampler and the scorer's logprobs on a tiny random Llama: conventions, top-p, top-k, buckets."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.models.sampler import response_logprobs, sample, top_p_filter
from opd.protocol import Trajectory
from teacher_scorers.scorer import length_buckets

PAD, EOS, VOCAB = 0, 2, 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4, 8]]  # different lengths: left padding is exercised


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_behaviour_logprobs_are_raw_logits_at_the_sampling_temperature(model, temperature, top_p):
    """What the learner recomputes from the same weights (no top-p renormalisation, no padding effects)."""
    g = torch.Generator().manual_seed(1)
    out = sample(
        model,
        PROMPTS * 4,
        eos_id=EOS,
        pad_id=PAD,
        max_new_tokens=6,
        temperature=temperature,
        top_p=top_p,
        generator=g,
    )
    seqs = [(p, o.response_ids) for p, o in zip(PROMPTS * 4, out, strict=True)]
    recomputed, _, _ = response_logprobs(model, seqs, pad_id=PAD, temperature=temperature)
    for o, r in zip(out, recomputed, strict=True):
        np.testing.assert_allclose(o.behaviour_logprobs, r.numpy(), atol=2e-5)
        assert o.finish_reason == ("stop" if o.response_ids[-1] == EOS else "length")
        assert EOS not in o.response_ids[:-1]  # nothing is generated after EOS


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = top_p_filter(probs, 0.7)
    assert torch.equal(kept > 0, torch.tensor([[True, True, False, False]]))
    assert torch.equal(top_p_filter(probs, 1.0) > 0, probs > 0)


def test_greedy_is_deterministic_and_sampling_is_seeded(model):
    a = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=5, temperature=0.0)
    b = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=5, temperature=0.0)
    assert [x.response_ids for x in a] == [x.response_ids for x in b]
    s1 = sample(
        model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=5, generator=torch.Generator().manual_seed(3)
    )
    s2 = sample(
        model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=5, generator=torch.Generator().manual_seed(3)
    )
    assert [x.response_ids for x in s1] == [x.response_ids for x in s2]


def test_teacher_topk_matches_the_full_distribution(model):
    seqs = [([1, 5, 6], [7, 8, 2]), ([1, 9, 9, 9, 9], [3])]
    sampled, ids, lps = response_logprobs(model, seqs, pad_id=PAD, temperature=1.0, topk=4)
    for (p, r), s, i, lp in zip(seqs, sampled, ids, lps, strict=True):
        with torch.no_grad():
            full = torch.log_softmax(
                model(torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) - 1 + len(r)], -1
            )
        ref_lp, ref_ids = full.topk(4, dim=-1)
        assert torch.equal(i, ref_ids) and i.shape == (len(r), 4)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(s, full.gather(-1, torch.tensor(r)[:, None])[:, 0], atol=1e-5, rtol=0)


def _traj(p, r):
    return Trajectory(
        run_id="r",
        prompt_id="p",
        group_id="g",
        sample_index=0,
        policy_version=0,
        prompt_token_ids=np.ones(p, dtype=np.int32),
        response_token_ids=np.ones(r, dtype=np.int32),
        behaviour_logprobs=np.zeros(r, dtype=np.float32),
    )


def test_length_buckets_respect_the_token_budget_and_keep_everything():
    trajs = [_traj(p, r) for p, r in [(3, 2), (10, 30), (4, 1), (5, 5), (20, 20), (2, 2)]]
    buckets = length_buckets(trajs, max_tokens=40)
    assert sorted(id(t) for b in buckets for t in b) == sorted(id(t) for t in trajs)
    for b in buckets:
        longest = max(len(t.prompt_token_ids) + len(t.response_token_ids) for t in b)
        assert len(b) == 1 or len(b) * longest <= 40


def test_a_response_stops_at_whichever_of_several_stop_ids_comes_first(model):
    """A chat model's end of turn and its EOS are two ids: sampling stops at either and keeps it."""
    greedy = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=6, temperature=0.0)
    second = next(t for t in greedy[0].response_ids[1:] if t not in (EOS, greedy[0].response_ids[0]))
    cut = greedy[0].response_ids.index(second) + 1
    out = sample(model, PROMPTS, eos_id=(EOS, second), pad_id=PAD, max_new_tokens=6, temperature=0.0)
    assert out[0].response_ids == greedy[0].response_ids[:cut] and out[0].finish_reason == "stop"
    for o in out:  # nothing after the first stop id, whichever it is
        assert not {EOS, second} & set(o.response_ids[:-1])
        assert (o.finish_reason == "stop") == (o.response_ids[-1] in (EOS, second))
