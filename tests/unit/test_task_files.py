"""The task's JSONL files are read when the config is loaded, and each problem names its field, file and line."""

from __future__ import annotations

import json
from pathlib import Path

from opd import tasks
from opd.config import JsonlTask, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_good_files_have_no_problems(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"prompt": "a"}, {"prompt": "b", "answer": 1}])
    held = _write(tmp_path / "eval.jsonl", [{"prompt": "c", "answer": "3"}])
    assert tasks.task_problems(JsonlTask(train_path=train, eval_path=held)) == []


def test_a_malformed_line_is_named_by_field_file_and_line(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c",'])
    held = _write(tmp_path / "eval.jsonl", [{"prompt": "c", "answer": "3"}, "not json"])
    found = dict(tasks.task_problems(JsonlTask(train_path=train, eval_path=held)))
    assert f"{train}:3: not valid JSON" in found["task.train_path"]
    assert f"{held}:2: not valid JSON" in found["task.eval_path"]


def test_missing_files_and_unanswered_held_out_prompts(tmp_path):
    held = _write(tmp_path / "eval.jsonl", [{"prompt": "c", "answer": "3"}, {"prompt": "d", "id": "q2"}])
    found = dict(tasks.task_problems(JsonlTask(train_path=tmp_path / "nope.jsonl", eval_path=held)))
    assert "nope.jsonl does not exist" in found["task.train_path"]
    assert "1 of 2 held-out prompts have no 'answer' (first: q2)" in found["task.eval_path"]
    [(field, msg)] = tasks.task_problems(JsonlTask(train_path=tmp_path))
    assert field == "task.train_path" and "is a directory" in msg


def test_the_shipped_example_data_of_own_models_loads(monkeypatch):
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where the README runs it
    cfg = load_config(REPO / "configs" / "own_models.yaml")
    assert tasks.task_problems(cfg.task) == []
    assert len(tasks.eval_set(cfg.task)) > 0 and all(p.answer for p in tasks.eval_set(cfg.task))
