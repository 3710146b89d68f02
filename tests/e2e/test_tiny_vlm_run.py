"""`opd run` with images, as a user runs it: the tiny vision-language demo (configs/tiny_vlm.yaml) in process on
zmq, and the same images written as a JSONL task and scored by a VLM teacher behind an SGLang-format server on
Redis with the vision tower frozen. What only whole runs prove: the actor's images reach the scorer, the teacher
(in process, and over HTTP as `image_data`) and the learner; the student learns from them; nothing is
dead-lettered; images per second and bytes per trajectory reach the summary; freeze_vision leaves the vision
tower's bytes as built."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from opd.config import load_config
from opd.models.builds import ensure_assets
from opd.models.vision import is_vision_param
from tests.conftest import REPO, opd

CONFIG = str(REPO / "configs" / "tiny_vlm.yaml")
JSONL_CONFIG = str(REPO / "configs" / "tiny_vlm_jsonl.yaml")


def _run(config, cache, out_dir, *overrides: str) -> dict:
    proc = opd(
        "run", config, f"run.cache_dir={cache}", f"run.output_dir={out_dir}", "run.progress=false", *overrides
    )
    log, _ = proc.communicate(timeout=800)
    assert proc.returncode == 0, log[-4000:]
    return json.loads((out_dir / "summary.json").read_text())


def _books(s: dict, steps: int, batch: int) -> None:
    assert (
        s["learner_steps"] == steps and s["trajectories_trained"] == steps * batch and s["dead_lettered"] == 0
    )
    assert (
        s["images_generated"] >= s["trajectories_generated"] > 0
    )  # one image per prompt, each sample carries it
    assert s["images_per_second"] > 0 and s["bytes_per_trajectory"] > 100  # a 32x32 PNG (~130 B) rides inline


@pytest.mark.slow
def test_the_vlm_demo_learns_from_the_teacher_on_zmq(asset_cache, tmp_path):
    steps = 80  # of the demo's 200: the habit is gone well before (0.995 at step 100 of 200)
    cfg = load_config(CONFIG, [f"run.cache_dir={asset_cache}"])
    out_dir = tmp_path / "run"
    s = _run(CONFIG, asset_cache, out_dir, f"learner.max_steps={steps}", "learner.eval_every=20")
    _books(s, steps, cfg.learner.batch_size)
    before, after, teacher = s["student_accuracy_before"], s["student_accuracy_after"], s["teacher_accuracy"]
    assert teacher >= 0.9 and before <= teacher - 0.3, s
    assert after >= before + 0.25, (before, after, teacher)  # toward the teacher's
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)


@pytest.mark.slow
def test_jsonl_images_to_an_sglang_teacher_on_redis_with_the_vision_frozen(
    asset_cache, redis_server, tmp_path
):
    from tests.fake_sglang import FakeSGLang

    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_visual_jsonl.py"), str(data), "--train-size", "400"],
        check=True,
        cwd=REPO,
    )
    files = [f"task.train_path={data / 'train.jsonl'}", f"task.eval_path={data / 'eval.jsonl'}"]
    cfg = load_config(JSONL_CONFIG, [f"run.cache_dir={asset_cache}", *files])
    assets = ensure_assets(cfg, log=lambda *_: None)
    srv = FakeSGLang(assets.teacher.path).start()
    steps, batch = 6, 32
    try:
        out_dir = tmp_path / "run"
        s = _run(
            JSONL_CONFIG,
            asset_cache,
            out_dir,
            *files,
            "broker.type=redis",
            f"broker.url={redis_server.url}",
            f"teacher={{kind: pretrained, name_or_path: {assets.teacher.path}}}",
            f"scorer={{engine: remote, remote: {{url: {srv.url}}}}}",
            "student.freeze_vision=true",
            "actor.generation=stream",  # newcomers prefilled with their images while others decode
            f"learner.max_steps={steps}",
            f"learner.batch_size={batch}",
            "learner.eval_every=0",
        )
    finally:
        srv.stop()
    _books(s, steps, batch)
    sent = [r["body"] for r in srv.requests if r["body"].get("image_data")]
    assert len(sent) >= steps * batch and all(
        len(b["image_data"]) == 1 and b["image_data"][0].startswith("data:image/png;base64,") for b in sent
    )
    built = load_file(f"{assets.student.path}/model.safetensors")
    final = load_file(f"{out_dir}/student/model.safetensors")
    vision = [k for k in built if is_vision_param(k)]
    language = [k for k in built if not is_vision_param(k)]
    assert vision and all(torch.equal(built[k], final[k]) for k in vision)  # frozen: as built
    assert any(not torch.equal(built[k], final[k]) for k in language)  # trained
