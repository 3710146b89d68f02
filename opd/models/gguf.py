"""GGUF files as checkpoints: dequantised once into a safetensors Hugging Face checkpoint in the cache.

Transformers loads a GGUF (`from_pretrained(dir, gguf_file=name)`) by parsing its metadata and dequantising every
tensor, which takes about 18 s and 1.2 GB for SmolLM2-135M, and vLLM cannot load it at all; every component of a
run loads its models, so each would pay that. Converted once into `run.cache_dir/gguf/<sha256[:16]>/` (model,
tokenizer with its chat template, generation config), the checkpoint reloads in under a second, and no component
ever sees the GGUF: `resolve` turns a config's name into the directory to load.

The cache is keyed by the GGUF's sha256 (the same file under two paths is converted once; a file changed in place
is converted again); `sources.json` beside the checkpoints remembers each path's sha256 with its size and mtime, so
a component starting does not hash the file again. Writes go to a temporary directory renamed at the end, under a
lock, so components starting together convert once and a crash leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from opd.config import ConfigError
from opd.config.models import is_gguf, named_model_dir
from opd.config.sources import gguf_file_problem
from opd.runtime.progress import progress

GGUF_FORMAT = 1  # bump when the conversion changes, so stale checkpoints are converted again
GGUF_DIR = "gguf"  # run.cache_dir/gguf/<sha256[:16]>/
SOURCES = "sources.json"  # run.cache_dir/gguf/sources.json: path -> {size, mtime_ns, sha256}
ASSET = "opd_asset.json"  # what a converted or pruned checkpoint was made from
INSTALL = "pip install -e '.[gguf]' (the gguf and accelerate packages)"
_HASH_CHUNK = 8 << 20


class ModelSourceError(ConfigError):
    """A model a config names cannot be made into a checkpoint (a corrupt GGUF, an unsupported architecture, a
    catalog model not fetched). A ConfigError: `opd` prints it in one line naming the field (exit 2)."""


# --------------------------------------------------------------------------------------- cache plumbing
def atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling, then rename, so a crash never leaves a half-written cache entry."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: theirs is kept


@contextlib.contextmanager
def cache_lock(final: Path) -> Iterator[None]:
    """One builder per cache entry across processes (the launcher and components start together)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f".{final.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: Path, log: Callable[..., None] = print, what: str | None = None) -> str:
    """The file's sha256, with progress when it takes a while (a 4 GB GGUF takes seconds)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with progress(what or f"hashing {path.name}", size / 1e6, "MB", log, quiet_under_s=2.0) as bar:
        with open(path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
                bar.advance(len(chunk) / 1e6)
    return h.hexdigest()


def _source_sha256(path: Path, root: Path, log) -> str:
    """sha256 of a GGUF, remembered by path, size and mtime so each component start does not hash it again."""
    key = str(path.resolve())
    stat = path.stat()
    memo_file = root / SOURCES
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    seen = memo.get(key)
    if seen and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return seen["sha256"]
    digest = sha256_file(path, log)
    memo = {k: v for k, v in memo.items() if Path(k).exists()}  # `opd models get` converts from a temp file
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    root.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f".{SOURCES}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
    tmp.replace(memo_file)  # a lost race loses one entry: that path is hashed again next time
    return digest


def converted_dir(cache_dir: Path | str, sha256: str) -> Path:
    return Path(cache_dir) / GGUF_DIR / sha256[:16]


def is_done(path: Path) -> bool:
    """A cache entry is complete once its record is there (written last, before the rename)."""
    return (path / ASSET).is_file()


def _current(path: Path) -> bool:
    """A conversion that is complete and made by this GGUF_FORMAT (an older one is converted again)."""
    try:
        return json.loads((path / ASSET).read_text()).get("format") == GGUF_FORMAT
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- resolving
def resolve(name: str, cache_dir: Path | str, field: str, log: Callable[..., None] = print) -> str:
    """What `from_pretrained` should get for a config's model name: a catalog name's directory, a GGUF's
    converted checkpoint (converting it first if needed), or the name itself (a directory or a hub id)."""
    named = named_model_dir(name, cache_dir)
    if named is not None:
        if not (named / "config.json").is_file():
            raise ModelSourceError(
                f"{field}: {name} is not fetched into {Path(cache_dir) / 'models'} yet; run "
                f"`opd models get {name} --cache-dir {cache_dir}` (or set {field} to a directory or .gguf)"
            )
        return str(named)
    if is_gguf(name):
        return str(ensure_converted(Path(name).expanduser(), cache_dir, field, log))
    return name


def ensure_converted(
    gguf_path: Path,
    cache_dir: Path | str,
    field: str,
    log: Callable[..., None] = print,
    origin: str | None = None,
) -> Path:
    """The checkpoint directory of a GGUF, converted now if it is not in the cache yet. `origin`: what the
    record names as its source when the path is a temporary file (`opd models get`: the wheel)."""
    problem = gguf_file_problem(str(gguf_path))
    if problem is not None:
        raise ModelSourceError(f"{field}: {problem}")
    root = Path(cache_dir) / GGUF_DIR
    sha256 = _source_sha256(gguf_path, root, log)
    final = converted_dir(cache_dir, sha256)
    if _current(final):
        return final
    with cache_lock(final):
        if not _current(final):  # not converted by another process while this one waited
            shutil.rmtree(final, ignore_errors=True)
            atomic_dir(final, lambda tmp: convert(gguf_path, tmp, field, log, sha256=sha256, origin=origin))
    return final


# ------------------------------------------------------------------------------------------- converting
def _require_packages(field: str) -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelSourceError(
            f"{field}: reading a GGUF needs {' and '.join(missing)}, not installed: {INSTALL}"
        )


@contextlib.contextmanager
def _tensor_progress(description: str, log: Callable[..., None]) -> Iterator[None]:
    """Our progress (a bar on a terminal, throttled lines in a log) for transformers' tensor-by-tensor
    dequantisation, in place of the tqdm bar it draws on stderr (one line per refresh in a component's log).
    Transformers iterates `modeling_gguf_pytorch_utils.tqdm(reader.tensors, desc=...)`; if a later version
    renames it, the conversion still works, only without the per-tensor count."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    original = getattr(hf_gguf, "tqdm", None)

    def counted(iterable, *args, **kwargs):
        items = list(iterable)
        with progress(description, len(items), "tensors", log) as bar:
            for item in items:
                yield item
                bar.advance()

    if original is not None:
        hf_gguf.tqdm = counted
    try:
        yield
    finally:
        if original is not None:
            hf_gguf.tqdm = original


def _unreadable(field: str, path: Path, exc: Exception) -> ModelSourceError:
    """The one message for a GGUF transformers cannot read: an architecture it has no mapping for, or a file
    that is not whole."""
    text = str(exc)
    if "is not supported yet" in text and "architecture" in text:
        import transformers
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        arch = text.split("architecture", 1)[1].split("is not supported", 1)[0].strip()
        known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # sections, not models
        return ModelSourceError(
            f"{field}: {path} is a GGUF of architecture {arch!r}, which transformers {transformers.__version__} "
            f"cannot dequantise (it can: {', '.join(known)}); use a checkpoint "
            "directory of this model, or a GGUF of a supported architecture"
        )
    return ModelSourceError(
        f"{field}: {path} is not a readable GGUF file, truncated or corrupt ({type(exc).__name__}: {text[:200]}); "
        "fetch it again (opd models get NAME fetches and checks the catalog's models)"
    )


def convert(
    gguf_path: Path,
    out_dir: Path,
    field: str = "name_or_path",
    log: Callable[..., None] = print,
    sha256: str | None = None,
    origin: str | None = None,
) -> dict:
    """Dequantise a GGUF to float32 and write it to `out_dir` as a safetensors checkpoint with its tokenizer
    (chat template included) and generation config; returns what `opd_asset.json` records."""
    _require_packages(field)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.resolve().parent), gguf_path.name
    started = time.time()
    log(f"converting {gguf_path} into a safetensors checkpoint (once; cached in {out_dir.parent})")
    try:
        log(f"  reading its tokenizer (vocabulary, merges, chat template): {name}")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        log(f"  reading its config and tensor table, then dequantising each tensor: {name}")
        with _tensor_progress(f"dequantising {name}", log):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails anywhere in numpy/struct/transformers
        raise _unreadable(field, gguf_path, exc) from exc
    plain = _without_quantization(model)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {
        "format": GGUF_FORMAT,
        "source": origin or str(gguf_path.resolve()),
        "sha256": sha256,
        "model_type": plain.config.model_type,
        "layers": plain.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "seconds": round(time.time() - started, 1),
    }
    (out_dir / ASSET).write_text(json.dumps(record, indent=1))
    template = "with its chat template" if record["chat_template"] else "no chat template in the file"
    log(
        f"converted {name} in {record['seconds']:.0f} s: {record['model_type']}, {record['layers']} layers, "
        f"{record['parameters'] / 1e6:.1f}M parameters, {template}"
    )
    return record


def _without_quantization(model):
    """The same weights in a model built from the config without `quantization_config`: `save_pretrained`
    refuses a GGUF-loaded model (its quantizer is not serialisable), though the weights are plain float32."""
    import torch
    from transformers import AutoModelForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    with torch.device("meta"):  # no random initialisation: every weight comes from the state dict
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()
