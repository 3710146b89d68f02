"""Prompts rendered with the student's chat template, chat JSONL, and responses that end at the end-of-turn token."""

from __future__ import annotations

import json

import pytest
import torch

from actors.engines.hf import HFEngine
from opd import tasks
from opd.config import JsonlTask, load_config
from opd.models.builds import ensure_assets
from opd.models.loading import build_char_tokenizer, encode_prompt
from opd.models.prompts import prompt_ids, stop_token_id, stop_token_ids
from tests.chat_models import DEFAULT_SYSTEM, chatml_model_dir, chatml_tokenizer


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def _jsonl(path, rows) -> JsonlTask:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_prompt_is_rendered_with_the_template_and_its_generation_prompt():
    tok = chatml_tokenizer()
    plain = tasks.Problem("p", "2+2=")
    assert _text(tok, prompt_ids(tok, plain)) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    )
    own = tasks.Problem("p", "2+2=", system_prompt="Add.")
    assert _text(tok, prompt_ids(tok, own)).startswith(
        "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n2+2="
    )
    # task.chat_template: none -> BOS + raw text, as for a tokenizer without a template
    raw = tasks.Problem("p", "2+2=", chat_template=False)
    assert prompt_ids(tok, raw) == encode_prompt(tok, "2+2=")
    raw_sys = tasks.Problem("p", "2+2=", system_prompt="Add.", chat_template=False)
    assert _text(tok, prompt_ids(tok, raw_sys)) == "<|im_start|>Add.2+2="


def test_tiny_models_without_a_template_keep_their_raw_prompts():
    tok = build_char_tokenizer()
    for p in tasks.eval_set(load_config(None).task)[:20]:
        assert p.chat_template and prompt_ids(tok, p) == encode_prompt(tok, p.prompt)
    assert stop_token_id(tok, True) == tok.eos_token_id


def test_the_end_of_turn_token_is_found_in_the_template():
    assert (
        stop_token_id(chatml_tokenizer(), True) == chatml_tokenizer().eos_token_id
    )  # SmolLM2: <|im_end|> is EOS
    separate = chatml_tokenizer(eos="</s>")
    assert (
        stop_token_id(separate, True) == separate.convert_tokens_to_ids("<|im_end|>") != separate.eos_token_id
    )
    assert stop_token_id(separate, False) == separate.eos_token_id
    # generation stops on both: the end of turn (first) and EOS; once where they are one token
    end, eos = separate.convert_tokens_to_ids("<|im_end|>"), separate.eos_token_id
    assert stop_token_ids(separate, True) == (end, eos)
    assert stop_token_ids(separate, False) == (eos,)
    assert stop_token_ids(chatml_tokenizer(), True) == (chatml_tokenizer().eos_token_id,)


def test_messages_jsonl_is_read_and_rendered_turn_by_turn(tmp_path):
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}], "answer": "x"},
            {
                "id": "multi",
                "messages": [
                    {"role": "system", "content": "Add."},
                    {"role": "user", "content": "1+1"},
                    {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "2+2"},
                ],
            },
        ],
    )
    task = JsonlTask(train_path=path, eval_path=path, system_prompt="Task sys.")
    first, multi = tasks.read_jsonl_problems(path)
    assert first.prompt == "hi" and multi.prompt == "2+2" and len(multi.messages) == 4
    tok = chatml_tokenizer()
    styled = tasks.eval_set(task)
    assert _text(tok, prompt_ids(tok, styled[0])).startswith("<|im_start|>system\nTask sys.<|im_end|>")
    # a line's own system turn wins over task.system_prompt
    assert _text(tok, prompt_ids(tok, styled[1])) == (
        "<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tasks.task_problems(task) == [("task.eval_path", f"{path}: 1 of 2 held-out prompts have no 'answer' "
                                          "(first: multi), so they could never be scored correct; add an answer to "
                                          "each line")]  # fmt: skip
    none = JsonlTask(train_path=path, chat_template="none")
    [(field, msg)] = tasks.task_problems(none)
    assert field == "task.train_path" and "prompt multi is a conversation of several turns" in msg


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object with exactly 'role' and 'content'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "messages[0].role is 'bot'; use one of system, user",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]},
            "messages[1] is a system turn; only the first turn may be one",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "must start with a user turn and end with one",
        ),
        ({"messages": [{"role": "system", "content": "s"}]}, "must start with a user turn and end with one"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "'prompt' or a list 'messages'"),
        ({"prompt": 3}, "each line needs a string field 'prompt'"),
    ],
)
def test_a_bad_messages_line_is_named_by_file_and_line(tmp_path, row, error):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    [(field, msg)] = tasks.task_problems(JsonlTask(train_path=path))
    assert field == "task.train_path" and f"{path}:2: " in msg and error in msg, msg


def test_config_refuses_a_blank_system_prompt_and_an_empty_context():
    from opd.config import ConfigError

    with pytest.raises(ValueError, match="task.system_prompt is blank"):
        JsonlTask(train_path="x.jsonl", system_prompt="  ")
    with pytest.raises(ConfigError, match="scorer.context.system_prompt is blank"):
        load_config(None, ['scorer.context={system_prompt: " "}'])
    with pytest.raises(ConfigError, match="scorer.context is empty"):
        load_config(None, ["scorer.context={}"])
    cfg = load_config(None, ['scorer.context={few_shot: [{user: "1+1=", assistant: "2"}]}'])
    assert cfg.scorer.context.few_shot[0].assistant == "2"


def _chat_config(tmp_path, eos: str = "<|im_end|>", extra=()):
    model = chatml_model_dir(tmp_path / "model", eos=eos)
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1="}, {"prompt": "hello"}])
    return load_config(
        None,
        [
            "task.kind=jsonl",
            f"task.train_path={train}",
            "student.kind=pretrained",
            f"student.name_or_path={model}",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={model}",
            *extra,
        ],
    )


def test_generation_stops_at_the_end_of_turn_token_and_keeps_it(tmp_path):
    """A template whose end-of-turn token is not EOS (Llama 3's layout): the model's favourite token is
    <|im_end|>; the engine stops there (stopping on EOS it would run to max_new_tokens) and keeps the token."""
    cfg = _chat_config(tmp_path, eos="</s>", extra=["sampling.max_new_tokens=6"])
    engine = HFEngine(cfg, ensure_assets(cfg, log=lambda *_: None))
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = torch.nn.Linear(cfg_hidden(engine.model), len(engine.tokenizer), bias=True)
    with torch.no_grad():  # <|im_end|> at every position (anything else has probability e-40)
        head.weight.zero_()
        head.bias.fill_(-40.0)
        head.bias[end] = 0.0
    engine.model.lm_head = head
    problem = next(tasks.training_stream(cfg.task, seed=0))
    [s] = engine.sample([prompt_ids(engine.tokenizer, problem)], torch.Generator().manual_seed(0))
    assert s.response_ids == [end] and s.finish_reason == "stop"
    assert engine.tokenizer.decode(s.response_ids, skip_special_tokens=True) == ""


def cfg_hidden(model) -> int:
    return model.config.hidden_size
