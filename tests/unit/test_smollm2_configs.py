"""The SmolLM2 demo configs pass the checks `opd run` makes before starting anything (registries, task, model
sources), name the command to fetch the model when it is missing, and keep their promises: the context's worked
examples are training countries (a held-out answer in the teacher's context would leak into the student), and
one generation batch is one learner batch."""

import json
import re
from pathlib import Path

import pytest

from opd import tasks
from opd.config import ConfigError
from opd.launch.cli import load_start_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HEAL, CONTEXT = CONFIGS / "smollm2_heal.yaml", CONFIGS / "smollm2_context.yaml"
NAME = "smollm2-135m-instruct"


def _fetched(cache: Path, layers: int = 30) -> Path:
    """What `opd models get` leaves for the load-time checks to read: a named directory with a config.json."""
    named = cache / "models" / NAME
    named.mkdir(parents=True)
    (named / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return cache


@pytest.mark.parametrize("path", [HEAL, CONTEXT], ids=lambda p: p.name)
def test_a_smollm2_config_before_the_model_is_fetched_names_the_command(path, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_start_config(str(path), [f"run.cache_dir={tmp_path}"])
    msg = str(exc.value)
    assert "teacher.name_or_path" in msg and f"opd models get {NAME}" in msg


@pytest.mark.parametrize("path", [HEAL, CONTEXT], ids=lambda p: p.name)
def test_a_smollm2_config_passes_the_start_checks_once_fetched(path, tmp_path):
    cfg = load_start_config(str(path), [f"run.cache_dir={_fetched(tmp_path)}"])
    assert cfg.teacher.kind == "pretrained" and cfg.teacher.name_or_path == NAME
    assert cfg.task.kind == "capitals" and tasks.eval_set(cfg.task)
    assert cfg.actor.prompts_per_batch * cfg.sampling.n == cfg.learner.batch_size
    assert cfg.learner.eval_mode == "background" and cfg.learner.eval_budget_s > 0


def test_the_heal_config_cuts_two_late_layers_checked_against_the_fetched_model(tmp_path):
    cfg = load_start_config(str(HEAL), [f"run.cache_dir={_fetched(tmp_path)}"])
    assert cfg.student.kind == "pruned" and cfg.student.source == "teacher"
    assert cfg.student.drop_layers == [26, 27]
    with pytest.raises(ConfigError, match=re.escape("student.drop_layers: [26, 27] out of range")):
        load_start_config(str(HEAL), [f"run.cache_dir={_fetched(tmp_path / 'short', layers=26)}"])


def test_the_context_config_teaches_with_training_countries_only(tmp_path):
    cfg = load_start_config(str(CONTEXT), [f"run.cache_dir={_fetched(tmp_path)}"])
    assert cfg.student.name_or_path == cfg.teacher.name_or_path == NAME
    assert cfg.task.system_prompt is None and cfg.scorer.context.system_prompt
    train, held = tasks.capitals_split(cfg.task)
    for shot in cfg.scorer.context.few_shot:
        country = re.fullmatch(r"What is the capital of (.+)\?", shot.user).group(1)
        assert (country, shot.assistant) in train, shot
        assert country not in {c for c, _ in held}
        assert tasks.verify(shot.assistant, shot.assistant, tasks.verifier_mode(cfg.task))
