import itertools
import json

import pytest

from opd import tasks
from opd.config import AdditionTask, JsonlTask
from opd.models.loading import build_char_tokenizer, encode_prompt


def test_addition_held_out_set_never_appears_in_training():
    task = AdditionTask(max_digits=2, eval_size=300)
    held_out = {p.prompt_id for p in tasks.eval_set(task)}
    assert len(held_out) == 300
    train = list(itertools.islice(tasks.training_stream(task, seed=0), 5000))
    assert not held_out & {p.prompt_id for p in train}
    assert all(int(p.answer) == sum(map(int, p.prompt[:-1].split("+"))) for p in train[:200])


def test_verifier_modes():
    assert tasks.verify("46", " 46 ") and not tasks.verify("46", "46=")
    assert tasks.verify("46", "the answer is 46", "contains") and not tasks.verify(None, "46")


def test_jsonl_task_reads_prompts_and_names_bad_lines(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text(
        json.dumps({"prompt": "2+2=", "answer": 4}) + "\n\n" + json.dumps({"prompt": "x", "id": "q7"}) + "\n"
    )
    problems = tasks.read_jsonl_problems(good)
    assert [(p.prompt_id, p.answer) for p in problems] == [("train.jsonl:1", "4"), ("q7", None)]
    stream = tasks.training_stream(JsonlTask(train_path=good), seed=1)
    assert {next(stream).prompt for _ in range(6)} == {"2+2=", "x"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: each line needs a string field 'prompt'"):
        tasks.read_jsonl_problems(bad)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        tasks.read_jsonl_problems(tmp_path / "empty.jsonl")


def test_char_tokenizer_round_trips_and_adds_bos(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    from opd.models.loading import load_tokenizer

    loaded = load_tokenizer(tmp_path)
    ids = encode_prompt(loaded, "12+34=")
    assert ids[0] == loaded.bos_token_id and len(ids) == 7
    assert loaded.decode(ids, skip_special_tokens=True) == "12+34="
    assert loaded.get_vocab() == tok.get_vocab()


def test_a_jsonl_id_that_would_be_refused_on_the_wire_is_refused_at_load(tmp_path):
    """A prompt's id travels as prompt_id, which the protocol requires printable: refuse it here, naming the line,
    rather than have every trajectory of that prompt dead-lettered mid-run. Spaces are fine."""
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"id": "question 7", "prompt": "2+2="}\n')
    assert tasks.read_jsonl_problems(ok)[0].prompt_id == "question 7"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n{"id": "a\\nb", "prompt": "2+2="}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'id' must be 1 to 4096 printable"):
        tasks.read_jsonl_problems(bad)
