"""`opd run` as a user runs it: real processes, real broker, real gloo group, read back from the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import msgpack
import pytest
import yaml

from tests.conftest import REPO, TINY, children_of, opd, opd_run, wait_for

pytestmark = pytest.mark.slow


def test_opd_run_trains_and_reports(prepared, tmp_path):
    out_dir = tmp_path / "run"
    steps = 40
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={steps}",
        "learner.eval_every=20",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    required = {
        "learner_steps",
        "weight_version",
        "trajectories_generated",
        "trajectories_scored",
        "trajectories_trained",
        "dead_lettered",
        "reverse_kl_first",
        "reverse_kl_last",
        "teacher_accuracy",
        "student_accuracy_before",
        "student_accuracy_after",
        "wall_seconds",
    }
    assert required <= set(s)
    # every stage saw the data, in order, and every trained trajectory was counted once
    assert s["learner_steps"] == steps and s["trajectories_trained"] == steps * 64
    assert s["trajectories_generated"] >= s["trajectories_scored"] >= s["trajectories_trained"]
    assert s["dead_lettered"] == 0
    # weights flowed learner -> actor, and the actor stamped the new versions on what it generated
    assert s["weight_version"] == steps - 1
    assert s["max_policy_version_trained"] >= 1
    assert all(v >= 1 for v in s["actor_weight_versions"].values())
    # distillation worked: the student moved toward the teacher
    assert s["reverse_kl_last"] < s["reverse_kl_first"]
    assert s["student_accuracy_after"] > s["student_accuracy_before"]
    # artefacts: resolved config, per-step metrics, a loadable HF checkpoint
    assert yaml.safe_load((out_dir / "config.yaml").read_text())["learner"]["max_steps"] == steps
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert any("eval_accuracy" in r for r in records)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out_dir / "student")
    assert AutoTokenizer.from_pretrained(out_dir / "student").eos_token == "</s>"
    assert "teacher held-out accuracy" in log and "student accuracy" in log
    # the same directory again is refused rather than mixed with the finished run
    again = opd("run", TINY, f"run.cache_dir={prepared}", f"run.output_dir={out_dir}")
    err, _ = again.communicate(timeout=60)
    assert again.returncode == 1 and "already holds a run" in err


def test_bad_messages_are_dead_lettered_mid_run(prepared, tmp_path):
    """Garbage written straight into the streams is dead-lettered with a reason; the run still finishes."""
    from broker import publish_with_backpressure
    from broker.zmq import ZmqBroker

    out_dir = tmp_path / "run"
    proc = opd_run(
        prepared,
        out_dir,
        "learner.max_steps=25",
        "learner.eval_every=0",
    )
    wait_for(lambda: (out_dir / "metrics.jsonl").exists(), 300, "the first learner step")
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())
    client = ZmqBroker(f"tcp://127.0.0.1:{cfg['broker']['port']}", 10.0)
    run_id = cfg["run"]["run_id"]
    bad = [b"\x00garbage", msgpack.packb({"schema_version": 99, "kind": "trajectory"}), msgpack.packb([1, 2])]
    assert (
        publish_with_backpressure(client, f"{run_id}:rollouts", bad) is not None
    )  # waits while the queue is full
    assert publish_with_backpressure(client, f"{run_id}:scored", bad[:2]) is not None
    client.close()
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["dead_lettered"] == 5 and s["trajectories_trained"] == 25 * 64
    reasons = [json.loads(line) for line in (out_dir / "dead_letter.jsonl").read_text().splitlines()]
    assert {r["source"] for r in reasons} == {"scorer-0", "learner"}
    assert any("schema_version" in r["reason"] for r in reasons)
    assert any("msgpack" in r["reason"] for r in reasons)


def test_ctrl_c_stops_everything_and_saves(prepared, tmp_path):
    out_dir = tmp_path / "run"
    proc = opd_run(prepared, out_dir, "learner.max_steps=100000")
    wait_for(lambda: (out_dir / "metrics.jsonl").exists(), 300, "the first learner step")
    assert len(children_of(proc.pid)) == 4  # broker, learner, actor, scorer
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    wait_for(lambda: not children_of(proc.pid), 10, "no orphaned components")
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["interrupted"] and s["stopped_by"] == "SIGTERM" and s["learner_steps"] >= 1
    assert (out_dir / "student" / "model.safetensors").exists()


def test_killed_launcher_leaves_no_orphans(prepared, tmp_path):
    out_dir = tmp_path / "run"
    proc = opd_run(prepared, out_dir, "learner.max_steps=100000")
    wait_for(lambda: (out_dir / "metrics.jsonl").exists(), 300, "the first learner step")
    assert children_of(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    wait_for(lambda: not children_of(proc.pid), 20, "components to die with their launcher")


def test_failing_component_is_named_and_run_fails(prepared, tmp_path):
    """A teacher whose tokenizer differs from the student's is refused at start-up; the launcher says which."""
    from opd.config import load_config
    from opd.models.builds import ensure_assets

    assets = ensure_assets(load_config(TINY, [f"run.cache_dir={prepared}"]), log=lambda *_: None)
    teacher = tmp_path / "teacher"
    subprocess.run(["cp", "-r", assets.teacher.path, str(teacher)], check=True)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["7"], vocab["8"] = (
        vocab["8"],
        vocab["7"],
    )  # same size, two ids swapped: silent corruption if not caught
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    out_dir = tmp_path / "run"
    proc = opd(
        "run",
        TINY,
        f"run.output_dir={out_dir}",
        "student.kind=pretrained",
        f"student.name_or_path={assets.student.path}",
        "teacher.kind=pretrained",
        f"teacher.name_or_path={teacher}",
        "weight_sync.timeout_s=60",
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, log
    assert "scorer-0 exited with code 1" in log
    assert "tokenizers differ" in log and "'7'" in log
    wait_for(lambda: not children_of(proc.pid), 10, "no orphaned components")


def test_pretrained_models_load_from_local_paths(prepared, tmp_path):
    """The real loading path (kind: pretrained, from_pretrained on a directory) runs a short training."""
    from opd.config import load_config
    from opd.models.builds import ensure_assets

    assets = ensure_assets(load_config(TINY, [f"run.cache_dir={prepared}"]), log=lambda *_: None)
    out_dir = tmp_path / "run"
    proc = opd(
        "run",
        TINY,
        f"run.output_dir={out_dir}",
        "learner.max_steps=4",
        "learner.eval_every=0",
        "student.kind=pretrained",
        f"student.name_or_path={assets.student.path}",
        "teacher.kind=pretrained",
        f"teacher.name_or_path={assets.teacher.path}",
    )
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["learner_steps"] == 4 and s["weight_version"] == 3
    assert s["teacher_accuracy"] == pytest.approx(assets.teacher.eval_accuracy)  # re-measured by the launcher


def test_component_help_and_config_errors():
    out = subprocess.run(
        [sys.executable, "-m", "opd", "run", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "learner.max_steps" in out.stdout and "sampling.temperature" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "opd", "run", TINY, "learner.max_stepz=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "learner.max_stepz: unknown key" in bad.stderr
    env = {**os.environ}
    hand = subprocess.run(
        [sys.executable, "-m", "opd", "actor", "--config", TINY],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert hand.returncode == 2 and "run.run_id" in hand.stderr


# Each loss x correction x aggregation is checked against float64 references on the production path (collate,
# the registered objective, the engine's step: tests/unit/test_loss_reference.py). These runs prove only what those
# cannot: the fields each kind of loss needs really travel through actor, scorer and broker (rewards from the
# actor's verifier and GRPO groups whole in one batch; the teacher's top-k and tail; a clipped ratio with
# minibatches) and the DeepSpeed engine trains inside the learner process.
RUN_MATRIX = [
    ["learner.loss=opd_penalty", "learner.task_estimator=grpo"],
    [
        "learner.loss=hybrid",
        "learner.hybrid.distill=topk_forward_kl",
        "learner.correction.mode=ppo_clip",
        "learner.minibatches=2",
    ],
    ["learner.engine=deepspeed", "learner.deepspeed.zero_stage=3", "learner.micro_batch_tokens=128"],
]


@pytest.mark.parametrize("overrides", RUN_MATRIX, ids=lambda o: " ".join(x.split(".", 1)[1] for x in o))
def test_each_loss_and_correction_runs(prepared, tmp_path, overrides):
    out_dir = tmp_path / "run"
    steps = 3
    proc = opd_run(
        prepared,
        out_dir,
        f"learner.max_steps={steps}",
        "learner.batch_size=32",
        "actor.prompts_per_batch=8",
        "learner.eval_every=0",
        *overrides,
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log + (out_dir / "logs" / "learner.log").read_text()
    s = json.loads((out_dir / "summary.json").read_text())
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())["learner"]
    assert (s["loss"], s["correction"], s["engine"]) == (
        cfg["loss"],
        cfg["correction"]["mode"],
        cfg["engine"],
    )
    assert s["learner_steps"] == steps and s["skipped_steps"] == 0
    assert s["optimizer_steps"] == steps * cfg["minibatches"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert all(r[k] == r[k] for k in ("loss", "grad_norm", "importance_weight", "reverse_kl"))  # not NaN
        assert 0.0 <= r["clip_fraction"] <= 1.0 and 0.0 <= r["masked_fraction"] <= 1.0
        assert 0.0 <= r["topk_overlap"] <= 1.0 and r["teacher_topk_mass"] <= 1.0 + 1e-4
        assert r["staleness_max"] <= cfg["max_staleness"] and r["trajectories"] == 32
        assert sum(r["lag_histogram"]) == r["tokens"]  # response tokens per lag
        if cfg["loss"] == "hybrid":  # each term's correction metrics under its own name (issue 13, defect 4)
            assert 0.0 <= r["rl_clip_fraction"] <= 1.0 and r["distill_clip_fraction"] == 0.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out_dir / "student")


def test_staleness_bound_drops_and_counts(prepared, tmp_path):
    """max_staleness 0 with two actors: nothing older than the learner's weights is trained, drops are counted."""
    out_dir = tmp_path / "run"
    proc = opd_run(
        prepared,
        out_dir,
        "learner.max_steps=6",
        "learner.batch_size=32",
        "actor.prompts_per_batch=8",
        "actor.num_actors=2",
        "learner.max_staleness=0",
        "learner.eval_every=0",
    )
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    s = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert s["learner_steps"] == 6 and s["lag_histogram"] == [sum(r["tokens"] for r in records)]
    assert [r["trajectories"] for r in records] == [32] * 6
    assert all(r["staleness_max"] == 0 for r in records)
    assert s["max_policy_version_trained"] >= 1  # trained on samples of updated weights, not only version 0
    assert s["trajectories_generated"] >= s["trajectories_trained"] + s["dropped_stale"]
