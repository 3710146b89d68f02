"""A resumed bf16 student continues from its fp32 master weights exactly: the checkpoint is not rounded to bf16 on
its way into the learner, while the actors are still sent bf16 (the layout keeps the student's dtype)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from learner.learner import load_student
from learner.state import RunFiles
from opd.config import load_config, precision
from opd.models.loading import build_char_tokenizer
from tests.scored import tiny_model

pytestmark = pytest.mark.skipif(
    precision.cpu_bf16_feature() is None, reason="this CPU has no native bf16 (avx512_bf16/amx_bf16/Arm bf16)"
)


def test_a_bf16_student_resumes_from_unrounded_fp32_weights(tmp_path):
    model_dir = tmp_path / "student"
    tiny_model(0).save_pretrained(model_dir)
    build_char_tokenizer().save_pretrained(model_dir)
    cfg = load_config(
        None,
        [
            "student.kind=pretrained",
            f"student.name_or_path={model_dir}",
            "student.dtype=bfloat16",
            "teacher.kind=pretrained",
            f"teacher.name_or_path={model_dir}",
            f"run.output_dir={tmp_path / 'run'}",
            f"run.cache_dir={tmp_path / 'cache'}",
        ],
    )
    masters = {
        k: v.float() + 1e-4 * torch.randn_like(v.float()) for k, v in tiny_model(1).state_dict().items()
    }
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in masters.values())  # not bf16 values
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    (checkpoint / "model").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in masters.items()}, checkpoint / "model" / "model.safetensors")
    student, layout = load_student(cfg, RunFiles(tmp_path / "run", cfg.learner), checkpoint)
    for name, param in student.model.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param.detach(), masters[name]), name
    assert set(layout.dtypes) == {torch.bfloat16}  # the actors still receive the student's dtype
