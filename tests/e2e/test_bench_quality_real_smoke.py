"""benchmarks/quality_real.py --smoke, as a user runs it, on the tiny random ChatML Llamas of tests/chat_models.py
in place of SmolLM2 (both pairs: a pruned student healed, and a teacher context): every method runs through the
chat-template prompts, the context splice and the lr sweep, and the results hold what BENCHMARKS.md reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.chat_models import chatml_model_dir
from tests.conftest import REPO

METHODS = {"opd_rkl", "opd_topk", "grpo", "offpolicy_kd", "hybrid"}


def _finite_or_none(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


@pytest.mark.slow
def test_quality_real_smoke(tmp_path):
    model = chatml_model_dir(tmp_path / "tiny", seed=0)
    out = tmp_path / "results"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "quality_real.py"),
            "--smoke",
            "--jobs",
            "1",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--set",
            f"teacher.name_or_path={model}",
            "--set",
            "heal:student.drop_layers=[1]",  # the tiny model has 2 layers
            "--set",
            f"context:student.name_or_path={model}",
        ],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    assert (out / "quality_real.png").stat().st_size > 0
    sweep = json.loads((out / "quality_real_sweep.json").read_text())
    for pair in ("heal", "context"):
        s = json.loads((out / f"quality_real_{pair}.json").read_text())
        assert set(s["methods"]) == METHODS
        base = s["baseline"]
        assert base["teacher_with_context"] == (pair == "context")
        # targets are fractions of the gap between the student's start and the teacher
        for f in (50, 75, 90):
            want = base["student"] + f / 100 * (base["teacher"] - base["student"])
            assert s["targets"][f"gap_{f}"] == pytest.approx(want)
        # the lr sweep ran every swept method at the smoke's lr, and hybrid took opd_rkl's
        swept = {r["method"] for r in sweep["runs"] if r["pair"] == pair}
        assert swept == METHODS - {"hybrid"}
        assert sweep["chosen"][pair]["hybrid"] == sweep["chosen"][pair]["opd_rkl"]
        assert set(s["ratios"]) == {
            f"grpo/{o} gap_{f}" for o in ("opd_rkl", "opd_topk") for f in (50, 75, 90)
        }
        for name, m in s["methods"].items():
            assert [r["seed"] for r in m["runs"]] == [0, 1]
            for key in ("gap_50", "gap_75", "gap_90"):
                for stat in ("step", "student_tokens", "teacher_tokens"):
                    assert all(_finite_or_none(v) for v in m[key][stat].values())
            for r in m["runs"]:
                assert [e["step"] for e in r["evals"]] == [0, 1, 2]
                assert r["evals"][0]["accuracy"] == base["student"]
                assert all(math.isfinite(e["accuracy"]) for e in r["evals"])
                assert all(math.isfinite(x["loss"]) for x in r["steps"])
                last = r["evals"][-1]
                if name == "grpo":  # the teacher is never called
                    assert last["teacher_tokens"] == 0 and last["student_tokens"] > 0
                elif name == "offpolicy_kd":  # the student generates nothing
                    assert last["student_tokens"] == 0 and last["teacher_tokens"] > 0
                else:  # the teacher scored every token the student sampled
                    assert last["student_tokens"] == last["teacher_tokens"] > 0


@pytest.mark.slow
def test_harness_prompts_and_kd_samples_follow_the_chat_template_and_context(tmp_path):
    """The harness's prompts are the actor's (chat template rendered), and off-policy KD's teacher samples from
    the prompt the scorer would show it (the context spliced in), stopping at the end-of-turn token."""
    import torch

    from benchmarks.harness import OFF_POLICY_KD, Harness
    from benchmarks.quality_real import PAIRS
    from opd.config import load_config
    from opd.models.builds import ensure_assets
    from opd.models.prompts import stop_token_id
    from opd.models.sampler import sample

    model = chatml_model_dir(tmp_path / "tiny", eos="</s>", seed=0)  # end of turn != EOS, as in Llama 3
    cfg = load_config(
        PAIRS["context"],
        [
            f"run.cache_dir={tmp_path / 'cache'}",
            f"student.name_or_path={model}",
            f"teacher.name_or_path={model}",
            "actor.prompts_per_batch=2",
            "sampling.n=2",
            "learner.batch_size=4",
            "sampling.max_new_tokens=12",
            "learner.loss=reverse_kl_pg",
            "learner.correction.mode=none",
        ],
    )
    h = Harness(cfg, ensure_assets(cfg, log=lambda m: None), kind=OFF_POLICY_KD, seed=3)
    tok = h.tokenizer
    assert h.stop_id == tok.convert_tokens_to_ids("<|im_end|>") != tok.eos_token_id
    state = h.generator.get_state()
    trajs = h.rollout()
    assert len(trajs) == 4
    # the student's prompt ids are the chat-template rendering of each problem
    rendered = tok.decode(trajs[0].prompt_token_ids.tolist())
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert (
        "Answer with the name of the capital city only" not in rendered
    )  # the student never sees the context
    # the teacher's samples: the same sampler from the teacher's view of those prompts, same generator state
    seen = [h.teacher.prompts.teacher_ids(t.prompt_token_ids.tolist()) for t in trajs[::2]]
    assert "Answer with the name of the capital city only" in tok.decode(seen[0])
    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    want = sample(
        h.teacher.model,
        [p for p in seen for _ in range(2)],
        eos_id=stop_token_id(tok, True),
        pad_id=tok.pad_token_id,
        max_new_tokens=12,
        temperature=1.0,
        generator=gen,
    )
    assert [t.response_token_ids.tolist() for t in trajs] == [w.response_ids for w in want]
