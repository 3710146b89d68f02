"""Context distillation: the teacher scores the student's response ids after a context the student never saw.

References go through the model directly: a forward of the teacher on its full conversation rendered by the chat
template (context turns, the student's turn, the response) must give the logprobs the scorer attached."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from opd import tasks
from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.loading import build_char_tokenizer, encode_prompt
from opd.models.prompts import TeacherPrompts, conversation, render_ids, stop_token_id
from opd.protocol import Trajectory
from teacher_scorers.backends import PartlyScored
from teacher_scorers.backends.hf import HFTeacher
from tests.chat_models import chat_trajectory, chatml_model_dir

CONTEXT = '{system_prompt: "Answer with digits.", few_shot: [{user: "1+1=", assistant: "2"}, {user: "2+5=", assistant: "7"}]}'
FEW_SHOT_ONLY = '{few_shot: [{user: "4+4=", assistant: "8"}]}'
PROMPTS = ["3+4=", "12+9=", "what is 5+5?", "hello", "9+9+9=", " spaced"]


def _setup(tmp_path, *extra):
    model = chatml_model_dir(tmp_path / "model")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = load_config(
        None,
        [
            "task.kind=jsonl",
            f"task.train_path={train}",
            "student.kind=pretrained",
            f"student.name_or_path={model}",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={model}",
            "scorer.topk=5",
            *extra,
        ],
    )
    return cfg, ensure_assets(cfg, log=lambda *_: None)


def _trajectories(tok, problems, seed=0) -> list[Trajectory]:
    """Student prompts as the actor renders them, and random responses ended by the end-of-turn token."""
    rng = np.random.default_rng(seed)
    end = stop_token_id(tok, True)
    out = []
    for i, p in enumerate(problems):
        response = [*rng.integers(6, len(tok), size=int(rng.integers(1, 9))).tolist(), end]
        out.append(chat_trajectory(tok, p, response, i))
    return out


def _teacher_conversation(cfg, p) -> list[dict[str, str]]:
    """What the teacher should read, written out as messages: the context's system turn, the few-shot turns,
    then the student's own turns (without its system turn, which the context replaces)."""
    ctx, own = cfg.scorer.context, [m for m in conversation(p) if m["role"] == "system"]
    # the context's system turn replaces the student's; without one the student's stays (the template's default
    # when the task has none: the template writes it before the first turn)
    msgs = [{"role": "system", "content": ctx.system_prompt}] if ctx.system_prompt is not None else own
    for shot in ctx.few_shot:
        msgs += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
    return msgs + [m for m in conversation(p) if m["role"] != "system"]


@torch.no_grad()
def _direct(model, ids: list[int], response: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids + response])).logits[0]
    rows = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(response)].float(), -1)
    return rows.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("system_prompt", [None, "Task system."])
@pytest.mark.parametrize("context", [CONTEXT, FEW_SHOT_ONLY], ids=["system+shots", "shots"])
def test_context_distilled_scores_equal_a_direct_forward_on_the_teachers_full_conversation(
    tmp_path, system_prompt, context
):
    extra = [f"scorer.context={context}"] + ([f"task.system_prompt={system_prompt}"] if system_prompt else [])
    cfg, assets = _setup(tmp_path, *extra)
    teacher = HFTeacher(cfg, assets)
    tok, problems = teacher.tokenizer, _problems(cfg)
    trajs = _trajectories(tok, problems)
    student_prompts = [t.prompt_token_ids.copy() for t in trajs]
    responses = [t.response_token_ids.copy() for t in trajs]
    teacher.score(trajs)
    assert teacher.kv is not None  # the shared context was cached, and the scores below went through it
    for p, t, sp, resp in zip(problems, trajs, student_prompts, responses, strict=True):
        full = render_ids(tok, _teacher_conversation(cfg, p))
        # the student's trajectory is untouched: its own prompt and exactly its response ids
        assert np.array_equal(t.prompt_token_ids, sp) and np.array_equal(t.response_token_ids, resp)
        # the teacher's prompt differs from the student's (the context), its response ids do not
        assert teacher.prompts.teacher_ids(sp.tolist()) == full != sp.tolist()
        want = _direct(teacher.model, full, resp.tolist())
        np.testing.assert_allclose(t.teacher_logprobs, want.numpy(), atol=1e-5)
        # and it is not what the teacher says without the context
        assert (
            np.abs(t.teacher_logprobs - _direct(teacher.model, sp.tolist(), resp.tolist()).numpy()).max()
            > 1e-3
        )


def _problems(cfg):
    stream = tasks.training_stream(cfg.task, seed=0)
    return [next(stream) for _ in PROMPTS]


@pytest.mark.parametrize("context", [True, False])
def test_reusing_the_prefix_kv_cache_gives_the_same_scores(tmp_path, context):
    """With and without scorer.prefix_cache, a whole batch (varied lengths, several buckets) scores the same:
    logprobs, top-k ids and logprobs and tail. Without a context the shared prefix is the template's system turn."""
    extra = [f"scorer.context={CONTEXT}"] if context else []
    cfg, assets = _setup(tmp_path, *extra, "scorer.max_tokens_per_batch=160")
    cached = HFTeacher(cfg, assets)
    off = cfg.model_copy(deep=True)
    off.scorer.prefix_cache = False
    plain = HFTeacher(off, assets)
    assert cached.kv is not None and plain.kv is None
    problems = _problems(cfg) * 3
    a, b = (
        _trajectories(cached.tokenizer, problems, seed=1),
        _trajectories(cached.tokenizer, problems, seed=1),
    )
    cached.score(a)
    plain.score(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.teacher_logprobs, y.teacher_logprobs, atol=1e-5)
        np.testing.assert_allclose(x.teacher_topk_logprobs, y.teacher_topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(x.teacher_tail_logprobs, y.teacher_tail_logprobs, atol=1e-5)
        assert np.array_equal(x.teacher_topk_ids, y.teacher_topk_ids)


def test_a_prompt_with_its_own_system_turn_fails_alone_under_a_context(tmp_path):
    cfg, assets = _setup(tmp_path, f"scorer.context={CONTEXT}")
    teacher = HFTeacher(cfg, assets)
    own = tasks.Problem("own", "3+4=", messages=(("system", "Mine."), ("user", "3+4=")))
    trajs = _trajectories(teacher.tokenizer, [*_problems(cfg)[:2], own])
    with pytest.raises(PartlyScored) as err:
        teacher.score(trajs)
    assert list(err.value.failures) == [2] and "does not start with the task's system turn" in str(err.value)
    assert trajs[0].is_scored and trajs[1].is_scored and not trajs[2].is_scored


def test_without_a_template_the_context_goes_before_the_raw_prompt_as_ids():
    """The demo's character tokenizer: the teacher reads BOS, the context's text, each few-shot answer ended by
    EOS (as the tiny models learned answers), then the prompt."""
    tok = build_char_tokenizer()
    cfg = load_config(None, ['scorer.context={few_shot: [{user: "1+2=", assistant: "3"}]}'])
    heads = TeacherPrompts.build(tok, cfg.task, cfg.scorer.context)
    student = encode_prompt(tok, "12+34=")
    want = [tok.bos_token_id, *tok("1+2=3", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert heads.teacher_ids(student) == want + student[1:]
    plain = TeacherPrompts.build(tok, cfg.task, None)
    assert not plain.has_context and plain.teacher_ids(student) == student
    with pytest.raises(ValueError, match="characters the tokenizer does not know"):
        TeacherPrompts.build(
            tok, cfg.task, load_config(None, ["scorer.context={system_prompt: Hi}"]).scorer.context
        )
