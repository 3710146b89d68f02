"""`student: {kind: pruned, source: teacher, drop_layers: [...]}`: the teacher without those decoder layers, cut once
into the cache as an ordinary checkpoint with the teacher's tokenizer; bad indices and other architectures are
refused naming the field.

The teacher is a seeded 3-layer Llama saved here; the reference is a forward written out by hand over the teacher's
own kept layers (embedding, kept blocks with a causal mask, norm, head), not the model's layer loop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

LAYERS = 3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.models.loading import build_char_tokenizer

    path = tmp_path_factory.mktemp("prune") / "teacher"
    tok = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(teacher: Path, cache: Path, drop: str, source: str = "teacher") -> list[str]:
    return [
        "teacher.kind=pretrained",
        f"teacher.name_or_path={teacher}",
        "student.kind=pruned",
        f"student.source={source}",
        f"student.drop_layers={drop}",
        f"run.cache_dir={cache}",
    ]


def _by_hand(model, ids: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Logits of `model` running only the blocks `keep`, written out: embed, blocks, norm, head."""
    inner = model.model
    positions = torch.arange(ids.shape[1])[None]
    hidden = inner.embed_tokens(ids)
    rotary = inner.rotary_emb(hidden, positions)
    causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    for i in keep:
        out = inner.layers[i](
            hidden, attention_mask=causal, position_ids=positions, position_embeddings=rotary
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(hidden))


def test_the_pruned_student_is_the_teacher_without_the_dropped_layers(teacher_dir, tmp_path):
    from safetensors import safe_open

    from opd.config import load_config
    from opd.models.builds import ensure_assets
    from opd.models.loading import check_same_vocabulary, load_causal_lm, load_tokenizer

    cfg = load_config(None, _args(teacher_dir, tmp_path, "[1]"))
    assets = ensure_assets(cfg, log=lambda *_: None)
    student_dir = Path(assets.student.path)
    assert student_dir.parent == tmp_path / "pruned" and assets.teacher.path == str(teacher_dir)
    teacher, student = load_causal_lm(teacher_dir), load_causal_lm(student_dir)
    assert student.config.num_hidden_layers == LAYERS - 1
    ids = torch.tensor([[1, 5, 9, 7, 12, 4, 6]])
    with torch.no_grad():
        expected = _by_hand(teacher, ids, keep=[0, 2])
        assert torch.allclose(student(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(teacher(ids).logits, expected, atol=1e-3)  # layer 1 mattered
    with safe_open(student_dir / "model.safetensors", "pt") as f:
        layers = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
        assert layers == {"0", "1"}  # renumbered
        assert torch.equal(
            f.get_tensor("model.layers.1.mlp.up_proj.weight"), teacher.model.layers[2].mlp.up_proj.weight
        )
    # the checkpoint decodes with a KV cache as without one
    cached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    check_same_vocabulary(load_tokenizer(assets.student.tokenizer), load_tokenizer(assets.teacher.tokenizer))
    started = time.perf_counter()
    assert ensure_assets(cfg, log=print).student.path == str(student_dir)  # cached: nothing printed, no load
    assert time.perf_counter() - started < 0.5


def test_layers_out_of_range_or_all_of_them_are_refused_at_load(teacher_dir, tmp_path, capsys):
    from opd.launch.cli import main

    def refused(drop: str) -> str:
        out = tmp_path / "run"
        assert main(["run", TINY, f"run.output_dir={out}", *_args(teacher_dir, tmp_path, drop)]) == 2
        err = capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "pruned").exists()
        return err

    assert f"student.drop_layers: [3] out of range: {teacher_dir} has layers 0..2" in refused("[1, 3]")
    assert "student.drop_layers: would drop all 3 layers" in refused("[0, 1, 2]")
    assert "student.drop_layers: layer indices count from 0; [-1] are negative" in refused("[-1]")
    assert "student.drop_layers: [1] listed more than once" in refused("[1, 1]")
    assert "student.drop_layers: List should have at least 1 item" in refused("[]")


def test_only_llama_models_are_cut(teacher_dir, tmp_path):
    from transformers import GPT2Config

    from opd.config import ConfigError, load_config
    from opd.models.builds import ensure_assets

    other = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50).save_pretrained(other)
    cfg = load_config(None, _args(teacher_dir, tmp_path, "[1]", source=str(other)))
    with pytest.raises(
        ConfigError, match=r"student.source: .*gpt2 is a gpt2 model; cutting layers supports Llama"
    ):
        ensure_assets(cfg, log=lambda *_: None)


def test_a_teacher_cut_from_itself_or_a_tiny_teacher_is_refused(teacher_dir, tmp_path, capsys):
    from opd.launch.cli import main

    args = _args(teacher_dir, tmp_path, "[1]")
    own = ["teacher.kind=pruned", "teacher.source=teacher", "teacher.drop_layers=[1]"]
    assert (
        main(
            [
                "run",
                TINY,
                f"run.output_dir={tmp_path / 'r'}",
                *args[4:],
                "student.kind=pretrained",
                f"student.name_or_path={teacher_dir}",
                *own,
            ]
        )
        == 2
    )
    assert "teacher.source: teacher names the teacher itself" in capsys.readouterr().err
    tiny_teacher = [a for a in args if not a.startswith("teacher.")]
    assert main(["run", TINY, f"run.output_dir={tmp_path / 'r'}", *tiny_teacher]) == 2
    assert "teacher.kind: tiny while the other model is pretrained" in capsys.readouterr().err


def test_a_model_cut_in_memory_renumbers_its_layers_for_the_kv_cache(teacher_dir):
    """`drop_decoder_layers` on a loaded model: each kept attention's `layer_idx` (its slot in the KV cache) is
    renumbered, so a static cache of the new depth serves it (with the old indices, slot 2 of 2 fails)."""
    from opd.models.loading import load_causal_lm
    from opd.models.prune import drop_decoder_layers

    model = drop_decoder_layers(load_causal_lm(teacher_dir), [1])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = torch.tensor([[1, 5, 9, 7]])
    static = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))
