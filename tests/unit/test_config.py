from pathlib import Path

import pytest

from opd.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS[0], ["learner.max_steps=20", "run.output_dir=/tmp/x", "sampling.top_p=0.9"])
    assert cfg.learner.max_steps == 20
    assert str(cfg.run.output_dir) == "/tmp/x"
    assert cfg.sampling.top_p == 0.9


def test_override_of_union_keeps_section_defaults():
    cfg = load_config(None, ["teacher.sft_steps=7"])
    assert cfg.teacher.sft_steps == 7 and cfg.teacher.num_layers == 4


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["learner.max_stepz=3"], "learner.max_stepz", "unknown key"),
        (["learner.max_steps=abc"], "learner.max_steps", "valid integer"),
        (["learner.max_steps=0"], "learner.max_steps", "greater than or equal to 1"),
        (["sampling.top_p=1.5"], "sampling.top_p", "less than or equal to 1"),
        (["sampling.temperature=0"], "sampling.temperature", "greater than 0"),
        (["student.hidden_size=30"], "student", "num_heads that divides hidden_size"),
        (
            ["actor.engine=vllm", "sampling.top_p=0.9"],
            "sampling.top_p",
            "set sampling.top_p: 1 or actor.engine: hf",
        ),
        (
            ["learner.correction.mode=decoupled", "learner.correction.proximal=none"],
            "learner",
            "correction.proximal: recompute",
        ),
        (
            ["learner.engine=deepspeed", "learner.dtype=bf16"],
            "learner",
            "set learner.deepspeed.dtype instead",
        ),
        (["learner.deepspeed.zero_stage=4"], "learner.deepspeed.zero_stage", "less than or equal to 3"),
        (["learner.correction.mode=ppo"], "learner.correction.mode", "'tis'"),
        (["learner.aggregation=mean"], "learner.aggregation", "token_mean"),
        (["learner.batch_size=4", "learner.minibatches=8"], "learner", "minibatches"),
        (["broker.type=redis", "broker.url=http://x"], "broker.url", "redis://"),
        (["broker.type=kafka"], "broker", "expected tags: 'zmq', 'redis'"),
        (["weight_sync.backend=nccl"], "weight_sync.backend", "use backend: gloo"),
        (
            ["weight_sync.backend=nccl", "learner.device=cuda"],
            "weight_sync.backend: nccl needs actor.device",
            "use backend: gloo or auto",
        ),
        (["task.kind=jsonl", "task.train_path=x.jsonl"], "student.kind", "kind: pretrained"),
        (["student.kind=pretrained", "student.name_or_path=x"], "student and teacher", "share a tokenizer"),
        (["run.run_id=a/b"], "run.run_id", "without '/'"),
        (["actor.max_inflight=8"], "actor", "set actor.generation: stream"),
        (["actor.generation=stream", "actor.max_inflight=2", "sampling.n=4"], "actor.max_inflight", ">= 4"),
        (["actor.generation=stream", "actor.on_new_weights=pause"], "actor.on_new_weights", "'recompute'"),
        (
            [
                "actor.generation=stream",
                "pipeline.mode=sync",
                "learner.batch_size=32",
                "actor.prompts_per_batch=8",
            ],
            "pipeline.mode: sync needs actor.generation: batch",
            "set actor.generation: batch",
        ),
    ],
)
def test_invalid_configs_are_rejected_with_field_and_fix(overrides, field, hint):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert field in str(exc.value) and hint in str(exc.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["learner"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_switching_a_section_kind_drops_the_old_variants_keys():
    cfg = load_config(
        CONFIGS[0],
        [
            "student.kind=pretrained",
            "student.name_or_path=/models/s",
            "teacher.kind=pretrained",
            "teacher.name_or_path=/models/t",
        ],
    )
    assert cfg.student.kind == "pretrained" and cfg.student.name_or_path == "/models/s"


def test_reference_config_lists_every_key_at_its_default():
    import yaml

    path = Path(__file__).resolve().parents[2] / "configs" / "reference.yaml"
    assert yaml.safe_load(path.read_text()) == Config().model_dump(mode="json")


def test_component_by_hand_needs_every_address(capsys):
    from opd.launch.cli import main

    tiny = str(CONFIGS[0].parent / "tiny.yaml")
    assert main(["actor", "--config", tiny, "run.run_id=x", "broker.port=5"]) == 2
    assert "weight_sync.port must be set" in capsys.readouterr().err
    assert main(["scorer", "--config", tiny]) == 2
    assert "run.run_id, broker.port must be set" in capsys.readouterr().err
