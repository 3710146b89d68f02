"""Where a pretrained model is looked for: a path is refused as a path (never asked of the hub), only a hub id is
looked up, and an offline machine gets one line saying so."""

from __future__ import annotations

import time

from opd.config import load_config
from opd.config.sources import model_source_problem, model_source_problems

FIELD = "student.name_or_path"


def test_a_missing_absolute_path_is_refused_as_a_path_at_once():
    t0 = time.monotonic()
    msg = model_source_problem(FIELD, "/nonexistent/model")
    assert time.monotonic() - t0 < 1.0
    assert msg.startswith("/nonexistent/model does not exist") and FIELD in msg and "\n" not in msg


def test_a_relative_path_beside_its_folder_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels").mkdir()
    msg = model_source_problem(FIELD, "mymodels/student")
    assert msg.startswith("mymodels/student does not exist") and "hub" not in msg.split(";")[0]
    assert model_source_problem(FIELD, "./student").startswith("./student does not exist")


def test_a_hub_id_offline_gets_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = model_source_problem(FIELD, "opd-tests-nobody/no-such-model-15")
    assert "HF_HUB_OFFLINE=1" in msg and "\n" not in msg and FIELD in msg


def test_a_directory_that_is_not_a_checkpoint(tmp_path):
    assert "without config.json" in model_source_problem(FIELD, str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert model_source_problem(FIELD, str(tmp_path)) is None


def test_every_model_field_of_a_config_is_checked(tmp_path):
    cfg = load_config(
        None,
        [
            "task.kind=jsonl",
            "task.train_path=x.jsonl",
            "student.kind=pretrained",
            "student.name_or_path=/nonexistent/student",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={tmp_path}",
            "teacher.tokenizer=/nonexistent/tok",
        ],
    )
    (tmp_path / "config.json").write_text("{}")
    fields = [f for f, _ in model_source_problems(cfg)]
    assert fields == ["student.name_or_path", "teacher.tokenizer"]


def test_an_unknown_hub_id_online_or_not_is_one_line(monkeypatch):
    """On this offline machine the hub cannot be reached; with network it has no such model: one line either way,
    and the second hub id of a config does not wait for the hub again."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    memo: dict[str, str] = {}
    for name in ("opd-tests-nobody/no-such-model-15", "opd-tests-nobody/no-such-model-16"):
        msg = model_source_problem(FIELD, name, unreachable=memo)
        assert msg.startswith(f"{name} is not a directory here") and FIELD in msg and "\n" not in msg
