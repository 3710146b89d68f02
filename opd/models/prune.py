"""Cut decoder layers out of a pretrained model: the student of prune-and-heal (ShortGPT, Minitron).

`student: {kind: pruned, source: teacher, drop_layers: [26, 27]}` removes those blocks from the teacher and writes
the result once into `run.cache_dir/pruned/<digest>/` as an ordinary checkpoint: `num_hidden_layers` lowered, the
kept layers renumbered 0..k-1 (their weights' names and each attention's `layer_idx`, which indexes the KV cache),
the source's tokenizer and generation config beside it. It then loads like any pretrained model and shares the
teacher's tokenizer. The cache key is the source (its path and the size and mtime of its files, or its hub id),
its tokenizer and the layers dropped, so a changed source is cut again.

Only Llama-architecture models (model_type `llama`: SmolLM2, Llama, TinyLlama) are cut: their blocks are
independent modules in `model.model.layers` and nothing else in the config counts them. Other architectures keep
per-layer settings (Qwen2's sliding-window layers, Gemma's layer types) that would need their own renumbering, so
they are refused by name rather than cut wrongly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from opd.models.gguf import ASSET, ModelSourceError, atomic_dir, cache_lock, is_done

PRUNE_FORMAT = 1  # bump when the cut changes, so stale students are cut again
PRUNED_DIR = "pruned"  # run.cache_dir/pruned/<digest>/
SUPPORTED = ("llama",)
_WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin", ".model")


def _identity(name: str) -> list:
    """What a source's content is judged by: a directory's resolved path and its files' sizes and mtimes (hashing
    a checkpoint at every component start would cost seconds), or a hub id as written."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return [name]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and p.name != ASSET
    )
    return [str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def pruned_dir(source: str, tokenizer: str, drop_layers: list[int], cache_dir: Path | str) -> Path:
    key = [PRUNE_FORMAT, _identity(source), _identity(tokenizer), sorted(drop_layers)]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    return Path(cache_dir) / PRUNED_DIR / digest


def check_layers(layers: int, drop_layers: list[int], field: str, source: str) -> None:
    """Refuse indices a model of `layers` blocks does not have, and a cut that would leave none; `field` is the
    config key named in the message (`student.drop_layers`)."""
    wrong = [i for i in drop_layers if not 0 <= i < layers]
    if wrong:
        raise ModelSourceError(f"{field}: {wrong} out of range: {source} has layers 0..{layers - 1}")
    if len(set(drop_layers)) >= layers:
        raise ModelSourceError(f"{field}: would drop all {layers} layers of {source}; keep at least one")


def ensure_pruned(
    source: str,
    tokenizer: str,
    drop_layers: list[int],
    cache_dir: Path | str,
    role: str = "student",
    log: Callable[..., None] = print,
) -> Path:
    """The checkpoint of `source` without `drop_layers`, cut now if it is not in the cache yet. `source` and
    `tokenizer` are loadable names (a directory or a hub id: `opd.models.gguf.resolve` has run); `role` is the
    config section named in errors."""
    final = pruned_dir(source, tokenizer, drop_layers, cache_dir)
    if is_done(final):
        return final
    with cache_lock(final):
        if not is_done(final):
            atomic_dir(final, lambda tmp: prune(source, tokenizer, drop_layers, tmp, role, log))
    return final


def drop_decoder_layers(model, drop_layers: list[int]):
    """Remove blocks from a loaded Llama-architecture model in place and renumber the rest; returns it."""
    import torch

    keep = [i for i in range(len(model.model.layers)) if i not in set(drop_layers)]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(keep)
    return model


def prune(
    source: str,
    tokenizer: str,
    drop_layers: list[int],
    out_dir: Path,
    role: str = "student",
    log: Callable[..., None] = print,
) -> dict:
    """Load `source`, drop the layers, write the checkpoint and `tokenizer`'s files to `out_dir`; returns what
    `opd_asset.json` records."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    if config.model_type not in SUPPORTED:
        raise ModelSourceError(
            f"{role}.source: {source} is a {config.model_type} model; cutting layers supports Llama-architecture models "
            f"(model_type {', '.join(SUPPORTED)}: SmolLM2, Llama, TinyLlama), whose layers nothing else counts"
        )
    check_layers(config.num_hidden_layers, drop_layers, f"{role}.drop_layers", source)
    started = time.time()
    log(
        f"cutting layers {drop_layers} out of {source}'s {config.num_hidden_layers} (once; cached in {out_dir.parent})"
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    before = sum(p.numel() for p in model.parameters())
    drop_decoder_layers(model, drop_layers)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out_dir)
    record = {
        "format": PRUNE_FORMAT,
        "source": source,
        "tokenizer": tokenizer,
        "dropped_layers": sorted(drop_layers),
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_before": before,
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / ASSET).write_text(json.dumps(record, indent=1))
    log(
        f"cut {len(drop_layers)} layer{'s' * (len(drop_layers) != 1)} in {record['seconds']:.0f} s: "
        f"{record['layers']} left, "
        f"{record['parameters'] / 1e6:.1f}M parameters (from {before / 1e6:.1f}M)"
    )
    return record
