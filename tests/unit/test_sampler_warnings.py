"""A component's log must show its real error: the sampler's per-token forward calls warn nothing.

transformers 5.x deprecates `past_key_values=` in favour of `cache=` and warned on every token, so the tail of a
crashed actor's log was that warning alone. The KV cache must still be used: cached sampling gives the same
logprobs as one full forward over the sampled sequence."""

from __future__ import annotations

import warnings

import torch

from opd.models.sampler import response_logprobs, sample
from tests.scored import tiny_model


def test_sampling_warns_nothing_and_uses_the_cache():
    model = tiny_model(0).eval()
    prompts = [[1, 5, 6], [1, 7]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sample(
            model, prompts, eos_id=2, pad_id=0, max_new_tokens=6, generator=torch.Generator().manual_seed(1)
        )
    full, _, _ = response_logprobs(
        model, [(p, o.response_ids) for p, o in zip(prompts, out, strict=True)], pad_id=0
    )
    for o, ref in zip(out, full, strict=True):
        assert torch.allclose(torch.tensor(o.behaviour_logprobs), ref, atol=1e-4)
