"""`opd run` with a GGUF teacher and a student cut from it: the launcher converts the GGUF once and cuts the
student once, before the components start; actors, scorer and learner load the cached checkpoints (none converts
again), share the tokenizer, and train. The GGUF is the tiny Llama of tests/tiny_gguf.py, so this takes about a
minute on 2 cores."""

from __future__ import annotations

import json

import pytest

from tests.conftest import opd_run
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
STEPS, BATCH = 4, 16


def test_a_run_with_a_gguf_teacher_and_a_pruned_student(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "teacher.gguf")
    cache, out_dir = tmp_path / "cache", tmp_path / "run"
    proc = opd_run(
        cache,
        out_dir,
        "teacher.kind=pretrained",
        f"teacher.name_or_path={gguf}",
        "student.kind=pruned",
        "student.drop_layers=[1]",
        f"learner.max_steps={STEPS}",
        f"learner.batch_size={BATCH}",
        "learner.eval_every=100",
        "actor.prompts_per_batch=4",
        "task.eval_size=16",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert log.count(f"converting {gguf}") == 1 and log.count("cutting layers [1]") == 1, log
    for component in (out_dir / "logs").glob("*.log"):  # every component found both in the cache
        text = component.read_text()
        assert "converting" not in text and "cutting layers" not in text, component
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == STEPS and s["trajectories_trained"] == STEPS * BATCH
    assert s["dead_lettered"] == 0 and s["weight_version"] == STEPS - 1
    config = json.loads((out_dir / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 262
    assert (
        out_dir / "student" / "chat_template.jinja"
    ).is_file()  # the teacher's tokenizer, template and all
