"""The vLLM actor engine (actors/engines/vllm.py) on a student whose embedding is padded beyond its tokenizer: it
samples only real token ids and its behaviour logprobs are the HF sampler's over the real vocabulary, before and
after a weight push (the learner's and the scorer's distributions are over the same ids: tests/unit/
test_padded_vocab.py, tests/e2e/test_vllm_padded_vocab.py).

The student is a tiny Llama of the 17-id tokenizer with 24 output rows whose 7 padding rows carry large logits, so
sampling over every row would pick padding nearly always. Run in the vLLM tier
(`.venv-vllm/bin/python -m pytest -m vllm tests/e2e/test_vllm_padded_actor.py`); skipped without vllm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.config import load_config
from opd.models.builds import Assets, ModelAsset
from opd.models.loading import encode_prompt
from opd.models.sampler import response_logprobs
from opd.models.vocab import embedding_rows
from tests.conftest import TINY
from tests.padded_models import V, padded_tokenizer, save_padded

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh and use .venv-vllm")
pytestmark = pytest.mark.vllm

ATOL = 1e-4  # as tests/e2e/test_vllm.py: float32 on both sides, different kernels
TAU = 1.3
ROWS = 24


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from actors.engines.vllm import VLLMEngine

    root = tmp_path_factory.mktemp("padded-actor")
    # head_dim 32: a size vLLM's CPU attention supports
    student = save_padded(root / "student", padded_tokenizer(), 0, ROWS, resize=False, hidden=128, heads=4)
    asset = ModelAsset(student, student, "float32")
    cfg = load_config(
        TINY, ["actor.engine=vllm", f"sampling.temperature={TAU}", "sampling.max_new_tokens=6", "run.seed=1"]
    )
    eng = VLLMEngine(cfg, Assets(asset, asset))
    yield eng
    eng.close()


def _prompts(tok) -> list[list[int]]:
    return [encode_prompt(tok, text) for text in ("12+3=", "7+45=", "9+9=", "1+1=") for _ in range(4)]


def _check(engine, model) -> list:
    """Sample a batch; every id real, and each behaviour logprob equal to HF's over the real vocabulary."""
    prompts = _prompts(engine.tokenizer)
    samples = engine.sample(prompts, torch.Generator().manual_seed(0))
    seqs = [(p, s.response_ids) for p, s in zip(prompts, samples, strict=True)]
    padding = sorted({t for _, r in seqs for t in r if t >= V})
    assert padding == [], f"the vLLM actor sampled padding ids {padding} (the tokenizer has {V})"
    want, _, _ = response_logprobs(model, seqs, pad_id=engine.tokenizer.pad_token_id, temperature=TAU)
    for s, w in zip(samples, want, strict=True):
        np.testing.assert_allclose(s.behaviour_logprobs, w.numpy(), atol=ATOL, rtol=0)
    return seqs


def test_the_vllm_actor_samples_over_the_real_vocabulary(engine):
    assert embedding_rows(engine.model) == ROWS and engine.vocab == V
    # the premise: over all rows, padding holds most of the mass at the first response position
    prompt = _prompts(engine.tokenizer)[0]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1] / TAU
    assert float(torch.softmax(logits, -1)[V:].sum()) > 0.5
    seqs = _check(engine, engine.model)
    assert sum(len(r) for _, r in seqs) >= len(seqs)


def test_the_cut_holds_after_a_weight_push(engine):
    """A push loads new tensors into vLLM's model; the cut (in its logits processor) must still apply."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pushes = engine.pushes
    engine.sync_weights(engine.version + 1)
    assert engine.pushes == pushes + 1
    _check(engine, engine.model)  # the HF reference with the pushed weights
