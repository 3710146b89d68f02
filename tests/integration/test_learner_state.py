"""The learner's state: a checkpoint brings back the progress, the weights, the optimiser and the RNG; the final
save writes the exactly-once ledger and a loadable student; the summary carries the run's counters."""

from __future__ import annotations

import json

import pytest
import torch

from learner.batching import collate
from learner.learner import load_student
from learner.state import COUNTERS_KEPT, Progress, RunFiles, summary
from opd.config import load_config
from tests.conftest import TINY
from tests.scored import scored_trajectories


def _cfg(models: list[str], out_dir):
    return load_config(TINY, [*models, f"run.output_dir={out_dir}", "learner.max_staleness=2"])


def _trained_progress(student) -> tuple[Progress, dict[str, float]]:
    batch = scored_trajectories(4, seed=1)
    metrics = student.engine.step(collate(batch, student.tokenizer.pad_token_id, "cpu"))
    progress = Progress(max_staleness=2, step=1, version=1)
    progress.record([t.id for t in batch], [1, 2, 1], [1, 0, 0, 0], metrics["reverse_kl"])  # tokens per lag
    counters = {"dropped_stale": 3.0, "temperature_mismatch": 1.0, "weight_syncs": 5.0}
    return progress, counters


def test_a_checkpoint_restores_progress_weights_optimiser_and_rng(quick_models, tmp_path):
    cfg = _cfg(quick_models, tmp_path)
    files = RunFiles(tmp_path, cfg.learner)
    student, _ = load_student(cfg, files, None)
    progress, counters = _trained_progress(student)
    saved = files.save_checkpoint(progress, counters, student)
    next_draws = torch.rand(4)  # what the RNG gives right after the save
    torch.manual_seed(1234)

    again = RunFiles(tmp_path, cfg.learner)
    assert again.latest() == saved and saved.name == "step-000001"
    resumed, _ = load_student(cfg, again, saved)
    for (name, a), (_, b) in zip(
        student.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    initial, _ = load_student(cfg, again, None)
    moved = [
        n
        for (n, a), (_, b) in zip(
            initial.model.named_parameters(), resumed.model.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert moved  # the step changed the weights, so equality above came from the checkpoint
    restored = again.restore(saved, resumed.engine, cfg.learner.max_staleness)

    assert restored.to_json({}) == progress.to_json({})
    assert restored.lag_histogram == [1, 2, 1] and restored.max_policy_version == 1
    assert (
        restored.trained.ordered == progress.trained.ordered
        and progress.trained.ordered[0] in restored.trained
    )
    assert restored.counters == {"dropped_stale": 3.0, "temperature_mismatch": 1.0}  # kept ones only
    assert "weight_syncs" not in COUNTERS_KEPT and restored.resumed_from == "step-000001"
    assert resumed.engine.optimizer_steps == 1
    torch.testing.assert_close(torch.rand(4), next_draws)


def test_final_save_writes_the_ledger_a_loadable_student_and_the_summary(quick_models, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(quick_models, tmp_path)
    files = RunFiles(tmp_path, cfg.learner)
    student, _ = load_student(cfg, files, None)
    progress, counters = _trained_progress(student)
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "stale-file").write_text("from an earlier incarnation")

    final = files.save_final(progress, student)
    files.write_summary(summary(progress, student.engine, cfg.learner, counters, "max_steps"))

    assert (tmp_path / "trained_ids.txt").read_text().split() == progress.trained.ordered
    assert not (final / "stale-file").exists()
    AutoModelForCausalLM.from_pretrained(final)
    s = json.loads((tmp_path / "learner_summary.json").read_text())
    assert s["learner_steps"] == 1 and s["weight_version"] == 1 and s["trajectories_trained"] == 4
    assert s["dropped_stale"] == 3 and s["temperature_mismatch"] == 1 and s["dead_lettered"] == 0
    assert s["reverse_kl_first"] == s["reverse_kl_last"] == pytest.approx(progress.kl_history[0])
    assert s["lag_histogram"] == [1, 2, 1] and s["stopped_by"] == "max_steps" and s["resumed_from"] is None
    assert (s["loss"], s["engine"], s["optimizer_steps"]) == (cfg.learner.loss, cfg.learner.engine, 1)
