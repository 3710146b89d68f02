"""`opd run` and `opd prepare` refuse, before any process or run directory exists, what would fail later: a
missing model or task file, a malformed JSONL line; each in lines naming the field, exit 2. And the quiet verbs say
what they did."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import QUICK_MODELS, TINY

REPO = Path(__file__).resolve().parents[2]


def test_own_models_as_shipped_is_refused_naming_the_model_fields(tmp_path, capsys, monkeypatch):
    from opd.launch.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert main(["run", "configs/own_models.yaml", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "student.name_or_path: /models/student does not exist" in err
    assert "teacher.name_or_path: /models/teacher does not exist" in err
    assert "task." not in err  # the shipped example data loads
    assert len(err.splitlines()) <= 4 and not out.exists()


def test_a_nonexistent_pretrained_path_is_one_line(tmp_path, capsys):
    from opd.launch.cli import main

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    args = [
        "task.kind=jsonl",
        f"task.train_path={data}",
        "student.kind=pretrained",
        "teacher.kind=pretrained",
    ]
    args += ["student.name_or_path=/nonexistent/model", f"teacher.name_or_path={REPO / 'no' / 'teacher'}"]
    assert main(["run", TINY, f"run.output_dir={tmp_path / 'run'}", *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].startswith("  student.name_or_path: /nonexistent/model does not exist")
    assert len(lines) == 3 and not (tmp_path / "run").exists()


def test_a_missing_path_is_named_beside_a_validation_error(tmp_path, capsys):
    """The issue's own command: only the student made pretrained, so validation fails on the tokenizer rule; the
    missing path is named in the same message rather than after the user fixed the first problem."""
    from opd.launch.cli import main

    args = ["student.kind=pretrained", "student.name_or_path=/nonexistent/model"]
    assert main(["run", TINY, f"run.output_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    assert "teacher.kind: tiny while the other model is pretrained" in err
    assert "  student.name_or_path: /nonexistent/model does not exist" in err
    assert len(err.splitlines()) == 3 and not (tmp_path / "run").exists()


def test_an_optional_package_missing_here_is_refused_naming_the_extra(tmp_path, capsys):
    """vLLM is not in the main environment: a run that needs it is refused at load with the way to get it,
    not by an actor's traceback in its log seconds after the start. With Ray the workers may have it."""
    import importlib.util

    import pytest

    from opd.launch.cli import load_start_config, main

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    assert main(["run", TINY, f"run.output_dir={tmp_path / 'run'}", "actor.engine=vllm"]) == 2
    err = capsys.readouterr().err
    assert (
        "actor.engine: vllm needs the vllm package, not installed here" in err and "setup_vllm_env.sh" in err
    )
    assert not (tmp_path / "run").exists()
    load_start_config(
        TINY, ["actor.engine=vllm"], local=False
    )  # components elsewhere (Ray): not refused here


def test_a_malformed_training_line_is_refused_at_load(tmp_path, capsys):
    from opd.launch.cli import main

    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text('{"prompt": "a"}\n{"prompt": \n')
    held.write_text('{"prompt": "a", "answer": "b"}\n[1]\n')
    args = ["task.kind=jsonl", f"task.train_path={train}", f"task.eval_path={held}"]
    args += ["student.kind=pretrained", "teacher.kind=pretrained"]
    args += [f"student.name_or_path={tmp_path}", f"teacher.name_or_path={tmp_path}"]
    (tmp_path / "config.json").write_text("{}")
    assert main(["prepare", TINY, *args]) == 2
    err = capsys.readouterr().err
    assert f"task.train_path: {train}:2: not valid JSON" in err
    assert f"task.eval_path: {held}:2: each line needs a string field 'prompt'" in err


def test_prepare_says_what_it_built_and_what_it_found(tmp_path, capsys):
    from opd.launch.cli import main

    args = ["prepare", TINY, f"run.cache_dir={tmp_path}", *QUICK_MODELS, "task.eval_size=8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "teacher: built now at" in first and "student: built now at" in first
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "teacher: already cached at" in again and "student: already cached at" in again
    assert "held-out accuracy" in again


def test_dead_letter_ls_with_none_says_so(redis_server, capsys):
    from opd.launch.cli import main

    overrides = ["run.run_id=dl0", "broker.type=redis", f"broker.url={redis_server.url}"]
    assert main(["dead-letter", "ls", "--config", TINY, *overrides]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no dead letters" in captured.err and "dl0" in captured.err
