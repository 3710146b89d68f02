"""vLLM with padded vocabularies (opd.models.vocab): the vLLM teacher, and vLLM sampling once its logits are cut
with `limit_vllm_vocab`, against the Hugging Face path over the tokenizer's real ids (which
tests/unit/test_padded_vocab.py checks against float64 references).

The models are tiny Llamas of one 17-id tokenizer with 24 (student) and 32 (teacher) embedding rows and large
logits on the padding rows, so a distribution over all rows is dominated by padding. Run in the vLLM tier
(`.venv-vllm/bin/python -m pytest -m vllm tests/e2e/test_vllm_padded_vocab.py`); skipped without vllm.
Tolerance as in test_vllm.py (float32 on both sides, different kernels).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from opd.config import load_config
from opd.models.builds import Assets, ModelAsset, load_asset
from opd.models.loading import encode_prompt
from opd.models.sampler import response_logprobs
from opd.models.vllm_support import make_llm
from opd.models.vocab import limit_vllm_vocab, real_vocab
from opd.protocol import Trajectory
from tests.conftest import TINY
from tests.padded_models import V, padded_tokenizer, save_padded

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh and use .venv-vllm")
pytestmark = pytest.mark.vllm

ATOL = 1e-4
K, TAU = 3, 1.3


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("padded-vllm")
    tok = padded_tokenizer()
    # head_dim 32: a size vLLM's CPU attention supports
    student = save_padded(root / "student", tok, 0, 24, resize=False, hidden=128, heads=4)
    teacher = save_padded(root / "teacher", tok, 1, 32, resize=True, hidden=128, heads=4)
    return Assets(ModelAsset(student, student, "float32"), ModelAsset(teacher, teacher, "float32"))


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY, ["scorer.engine=vllm", f"scorer.topk={K}", f"scorer.temperature={TAU}"])


def _trajectories(tok) -> list[Trajectory]:
    rng = np.random.default_rng(0)
    out = []
    for i, text in enumerate(["12+3=", "7+45=", "9+9=", "1+1="]):
        r = rng.integers(3, V, size=int(rng.integers(1, 7)))
        out.append(
            Trajectory(
                run_id="t",
                prompt_id=str(i),
                group_id=str(i),
                sample_index=0,
                prompt_token_ids=np.asarray(encode_prompt(tok, text), dtype=np.int32),
                response_token_ids=r.astype(np.int32),
                behaviour_logprobs=np.zeros(len(r), dtype=np.float32),
                policy_version=0,
            )
        )
    return out


def test_the_vllm_teacher_scores_over_the_real_vocabulary(cfg, assets):
    from teacher_scorers.backends.hf import HFTeacher
    from teacher_scorers.backends.vllm import VLLMTeacher

    hf_cfg = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"engine": "hf"})})
    hf, vl = HFTeacher(hf_cfg, assets), VLLMTeacher(cfg, assets)
    assert vl.vocab_size == hf.vocab_size == V
    trajs = _trajectories(hf.tokenizer)
    h_trajs, v_trajs = copy.deepcopy(trajs), copy.deepcopy(trajs)
    hf.score(h_trajs)
    vl.score(v_trajs)
    for h, v in zip(h_trajs, v_trajs, strict=True):
        assert int(v.teacher_topk_ids.max()) < V
        np.testing.assert_array_equal(v.teacher_topk_ids, h.teacher_topk_ids)
        np.testing.assert_allclose(v.teacher_logprobs, h.teacher_logprobs, atol=ATOL)
        np.testing.assert_allclose(v.teacher_topk_logprobs, h.teacher_topk_logprobs, atol=ATOL)
    vl.llm = None


def test_vllm_sampling_after_the_cut_is_over_the_real_vocabulary(cfg, assets):
    """What the vLLM actor gets by calling `limit_vllm_vocab` after building its engine: samples never in the
    padding, and processed logprobs equal to the HF sampler's over the real vocabulary."""
    from vllm import SamplingParams

    model, tok = load_asset(assets.student)
    llm = make_llm(
        cfg.actor.vllm, assets.student.path, dtype="float32", device="cpu", seed=0,
        logprobs_mode="processed_logprobs",
    )  # fmt: skip
    llm.collective_rpc(limit_vllm_vocab, args=(real_vocab(model),))
    prompts = [t.prompt_token_ids.tolist() for t in _trajectories(tok)]
    params = SamplingParams(
        temperature=TAU, max_tokens=6, logprobs=0, seed=1, detokenize=False, ignore_eos=True
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seqs = [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs, strict=True)]
    assert all(max(r) < V for _, r in seqs)
    want, _, _ = response_logprobs(model, seqs, pad_id=tok.pad_token_id, temperature=TAU)
    for o, (_, r), w in zip(outs, seqs, want, strict=True):
        got = [pos[t].logprob for t, pos in zip(r, o.outputs[0].logprobs, strict=True)]
        np.testing.assert_allclose(got, w.numpy(), atol=ATOL)
