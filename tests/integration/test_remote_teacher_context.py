"""A teacher behind a server under `scorer.context`: it is sent the full teacher input (the context's ids in place
of the student's system turn, then the student's turn and response) and its scores equal the in-process teacher's.

The server is tests/fake_sglang.py (a real HTTP server speaking SGLang's format) on a tiny ChatML model."""

from __future__ import annotations

import json

import numpy as np

from opd import tasks
from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.prompts import stop_token_id
from opd.protocol import Trajectory
from teacher_scorers.backends import build_teacher
from teacher_scorers.backends.hf import HFTeacher
from teacher_scorers.backends.sglang import SGLangTeacher
from tests.chat_models import chat_trajectory, chatml_model_dir
from tests.fake_sglang import FakeSGLang

CONTEXT = {"system_prompt": "Digits only.", "few_shot": [{"user": "1+1=", "assistant": "2"}]}


def _trajs(tok, problems) -> list[Trajectory]:
    rng = np.random.default_rng(0)
    out = []
    for i, p in enumerate(problems):
        resp = [*rng.integers(6, len(tok), size=3 + i).tolist(), stop_token_id(tok, True)]
        out.append(chat_trajectory(tok, p, resp, i))
    return out


def test_a_remote_teacher_gets_the_context_and_scores_like_the_local_one(tmp_path):
    model = chatml_model_dir(tmp_path / "model")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("3+4=", "hello there", "9+9=")))
    server = FakeSGLang(str(model)).start()
    try:
        base = [
            "task.kind=jsonl",
            f"task.train_path={train}",
            "student.kind=pretrained",
            f"student.name_or_path={model}",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={model}",
            "scorer.topk=3",
            f"scorer.context={json.dumps(CONTEXT)}",
        ]
        remote_cfg = load_config(None, [*base, "scorer.engine=remote", f"scorer.remote.url={server.url}"])
        local_cfg = load_config(None, base)
        assets = ensure_assets(local_cfg, log=lambda *_: None)
        local = HFTeacher(local_cfg, assets)
        remote = build_teacher(remote_cfg, assets)
        assert isinstance(remote, SGLangTeacher)
        stream = tasks.training_stream(local_cfg.task, seed=0)
        problems = [next(stream) for _ in range(3)]
        a, b = _trajs(local.tokenizer, problems), _trajs(local.tokenizer, problems)
        local.score(a)
        remote.score(b)
        sent = [r["body"]["input_ids"] for r in server.requests if r.get("body", {}).get("input_ids")]
        for x, y in zip(a, b, strict=True):
            want = local.prompts.teacher_ids(y.prompt_token_ids.tolist()) + y.response_token_ids.tolist()
            assert want in sent and want[: len(y.prompt_token_ids)] != y.prompt_token_ids.tolist()
            # one padded batch against one sequence per forward: float32 batching noise only
            np.testing.assert_allclose(y.teacher_logprobs, x.teacher_logprobs, atol=1e-4)
            np.testing.assert_array_equal(y.teacher_topk_ids, x.teacher_topk_ids)
        remote.close()
    finally:
        server.stop()
