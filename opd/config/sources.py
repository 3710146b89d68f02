"""Is each model and tokenizer a run names loadable here? Answered before anything starts, in one line per field.

`from_pretrained` treats any name that is not a directory as a hub id: a mistyped path cost 34 s of hub retries
and an 87-line traceback, and an offline machine a 58-line one. Here a name that can only be a path is refused as a
path, only a hub id is looked up (once, briefly, and not when it is cached), and an offline machine is told so.
A `.gguf` name must be a whole GGUF file here (magic, version, and its tables read by the gguf package, which fails
on a truncated or corrupt file; an architecture transformers cannot dequantise is named when it is converted,
`opd.models.gguf`); a catalog name (`smollm2-135m-instruct`) must have been fetched by `opd models get`; a pruned
model's source is checked like a pretrained name, and its `drop_layers` against the source's layer count when
its config.json is here.
Kept out of the model stack (no torch, no transformers), so `opd run` refuses a bad name at once; `opd run` and
`opd prepare` pass `model_source_problems` to `load_config(checks=...)`. A component started by hand does not run
it: its models may live where the launcher's machine cannot see them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from opd.config.models import is_gguf, named_model_dir
from opd.config.root import Config

# `name` or `org/name` of letters, digits, `-`, `_`, `.`: the only shapes a hub id can take.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HUB_LOOKUP_TIMEOUT_S = 10.0
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what the gguf package reads (version 1 files predate it)
GGUF_EXTRA = "pip install -e '.[gguf]' (the gguf and accelerate packages)"


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def _is_path(name: str) -> bool:
    """Whether `name` can only mean a local directory: it is absolute, relative with `.`/`~`, has a shape no hub
    id has, or its first part is on disk (`mymodels/student` beside a `mymodels/` directory)."""
    if name.startswith(("/", ".", "~")) or "\\" in name or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).exists()


def _local_problem(name: str, path: Path, needs: tuple[str, ...]) -> str | None:
    if path.is_file():
        return f"{name} is a file; name the directory the model was saved to with save_pretrained"
    if not any((path / f).is_file() for f in needs):
        return f"{name} is a directory without {' or '.join(needs)}: not saved with save_pretrained; name the directory that was"


def _ask_hub(name: str) -> tuple[str, str]:
    """One short question to the hub: ("ok" | "gated" | "missing" | "error" | "unreachable", detail)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_LOOKUP_TIMEOUT_S)
    except GatedRepoError:  # a RepositoryNotFoundError too, so caught first
        return "gated", ""
    except RepositoryNotFoundError:
        return "missing", ""
    except HfHubHTTPError as exc:
        return "error", str(exc)
    except Exception as exc:  # noqa: BLE001 - no network: DNS failure, refused connection, timeout (httpx's classes)
        return "unreachable", type(exc).__name__
    return "ok", ""


def _hub_problem(name: str, field: str, unreachable: dict[str, str]) -> str | None:
    """Whether the hub has `name`: only a hub id not in the local cache gets here. `unreachable` remembers,
    across the fields of one config, that the hub could not be reached, so an offline machine waits once."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    here = f"not a directory here ({Path(name).resolve()}) nor in the Hugging Face cache"
    get = f"download it where there is network (hf download {name}) or set {field} to a local directory"
    offline = _offline()
    if offline:
        return f"{name} is {here}, and {offline}=1 keeps this machine off the hub: {get}"
    answer, detail = ("unreachable", unreachable["why"]) if "why" in unreachable else _ask_hub(name)
    if answer == "unreachable":
        unreachable["why"] = detail
        return f"{name} is {here}, and the Hugging Face hub cannot be reached ({detail}): this machine looks offline; {get}"
    if answer == "gated":
        return f"{name} is gated on the Hugging Face hub: accept its licence on its page and log in (hf auth login)"
    if answer == "missing":
        return (
            f"{name} is {here}, and the Hugging Face hub has no such model; set {field} to the directory of a "
            "model saved with save_pretrained, or to a hub id such as Qwen/Qwen2.5-0.5B"
        )
    if answer == "error":
        return f"the Hugging Face hub could not be asked about {name} ({detail}); try again, or use a local directory"
    return None


def gguf_file_problem(name: str, whole: bool = False) -> str | None:
    """Why `name` is not a GGUF file to convert, in one line, or None: it must exist, be a file, start with the
    GGUF magic and a version this reader knows, and the gguf package must be installed to read it. `whole`: also
    read its tables with the gguf package's reader, which fails on a truncated or corrupt file (about 3 s for
    SmolLM2's 49k-token vocabulary: done by `opd run` at load, not by every component start)."""
    path = Path(name).expanduser()
    if not path.exists():
        return f"{name} does not exist (looked for {path.resolve()}); name a .gguf file on this machine"
    if not path.is_file():
        return f"{name} is not a file; name the .gguf file itself"
    with open(path, "rb") as fh:
        head = fh.read(len(GGUF_MAGIC) + 4)
    if head[:4] != GGUF_MAGIC:
        what = "is empty" if not head else f"starts with {head[:4]!r}, not {GGUF_MAGIC!r}"
        return f"{name} is not a GGUF file (it {what}); name a .gguf file, or a checkpoint directory"
    version = int.from_bytes(head[4:], "little") if len(head) == 8 else None
    if version not in GGUF_VERSIONS:
        return f"{name} is a truncated or corrupt GGUF file (version {version}; GGUF versions are 2 and 3); fetch it again"
    if importlib.util.find_spec("gguf") is None:
        return f"{name} is a GGUF file; reading it needs the gguf package, not installed here: {GGUF_EXTRA}"
    return _gguf_tables_problem(name, path) if whole else None


def _gguf_tables_problem(name: str, path: Path) -> str | None:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)  # maps every tensor: a file cut short fails here
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails anywhere in numpy/struct
        return f"{name} is a truncated or corrupt GGUF file ({type(exc).__name__}: {str(exc)[:160]}); fetch it again"
    if not reader.tensors or "general.architecture" not in reader.fields:
        return f"{name} holds no model (no tensors or no general.architecture); name a model's .gguf file"
    return None


def model_source_problem(
    field: str,
    name: str,
    needs: tuple[str, ...] = ("config.json",),
    unreachable: dict[str, str] | None = None,
    cache_dir: Path | str | None = None,
) -> str | None:
    """Why `from_pretrained(name)` would fail, in one line, or None. A name that exists on disk is a local
    directory; one that can only be a path and does not exist is refused as a path, without asking the hub (a
    missing path used to cost a 34 s hub retry and 87 lines); only a hub id is looked up, and only when it is not
    already cached. A `.gguf` name is checked as a GGUF file, and a catalog name (with `cache_dir`) as a
    directory `opd models get` made."""
    if is_gguf(name):
        return gguf_file_problem(name, whole=True)
    named = named_model_dir(name, cache_dir) if cache_dir is not None else None
    if named is not None:
        if not (named / "config.json").is_file():
            return (
                f"{name} is not fetched into {Path(cache_dir) / 'models'} yet; run `opd models get {name} "
                f"--cache-dir {cache_dir}` first (or set {field} to a directory or a .gguf file)"
            )
        name = str(named)
    path = Path(name).expanduser()
    if path.exists():
        return _local_problem(name, path, needs)
    if _is_path(name):
        return (
            f"{name} does not exist (looked for {path.resolve()}); set {field} to the directory of a model saved "
            "with save_pretrained, or to a hub id such as Qwen/Qwen2.5-0.5B"
        )
    return _hub_problem(name, field, {} if unreachable is None else unreachable)


def _source_checks(cfg: Config, role: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(field, name, files a directory must hold) for each model name of one section."""
    spec = getattr(cfg, role)
    if spec.kind == "pretrained":
        checks = [(f"{role}.name_or_path", spec.name_or_path, ("config.json",))]
        if spec.tokenizer is not None:
            files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
            checks.append((f"{role}.tokenizer", spec.tokenizer, files))
        return checks
    if spec.kind == "pruned" and spec.source != "teacher":
        return [(f"{role}.source", spec.source, ("config.json",))]
    return []


def _pruned_problem(cfg: Config, role: str) -> tuple[str, str] | None:
    """A pruned model must cut a pretrained model, and keep at least one of its layers."""
    spec = getattr(cfg, role)
    if spec.source == "teacher":
        if role == "teacher":
            return "teacher.source", "teacher names the teacher itself; set it to a name_or_path to cut"
        if cfg.teacher.kind != "pretrained":
            return "student.source", (
                f"teacher is of kind {cfg.teacher.kind}; cutting layers needs a pretrained teacher "
                "(or set student.source to a name_or_path)"
            )
        name = cfg.teacher.name_or_path
    else:
        name = spec.source
    if is_gguf(name):
        return None  # its layer count is read when it is converted (opd.models.prune checks again)
    path = named_model_dir(name, cfg.run.cache_dir) or Path(name).expanduser()
    try:
        layers = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a hub id, or not fetched yet: checked when it is built
    wrong = [i for i in spec.drop_layers if i >= layers]
    if wrong:
        return f"{role}.drop_layers", f"{wrong} out of range: {name} has layers 0..{layers - 1}"
    if len(spec.drop_layers) >= layers:
        return f"{role}.drop_layers", f"would drop all {layers} layers of {name}; keep at least one"
    return None


def model_source_problems(cfg: Config) -> list[tuple[str, str]]:
    """Every pretrained model and tokenizer of the run that cannot be loaded, as (field, message) pairs, for
    `opd run` and `opd prepare` to refuse before starting anything. A teacher behind a server is not loaded by
    the run, so it is not checked (unless the student is cut from it)."""
    cut_from_teacher = cfg.student.kind == "pruned" and cfg.student.source == "teacher"
    roles = ["student"] + (["teacher"] if cfg.scorer.teacher_is_local or cut_from_teacher else [])
    found, unreachable = [], {}
    for role in roles:
        mine = []
        for field, name, needs in _source_checks(cfg, role):
            problem = model_source_problem(field, name, needs, unreachable, cfg.run.cache_dir)
            if problem is not None:
                mine.append((field, problem))
        if getattr(cfg, role).kind == "pruned" and not mine:
            pruned = _pruned_problem(cfg, role)
            mine += [pruned] if pruned is not None else []
        found += mine
    return found


def raw_model_source_problems(data: dict) -> list[tuple[str, str]]:
    """`model_source_problems` for a tree that failed validation (say, a pretrained student beside the tiny
    teacher): the model names it can read are checked anyway, so one message names every problem."""
    found, unreachable = [], {}
    run = data.get("run")
    cache_dir = run.get("cache_dir") if isinstance(run, dict) else None
    if not isinstance(cache_dir, str):
        from opd.config.run import RunConfig

        cache_dir = RunConfig.model_fields["cache_dir"].default
    for role in ("student", "teacher"):
        section = data.get(role)
        if not isinstance(section, dict) or section.get("kind") not in ("pretrained", "pruned"):
            continue
        key = "name_or_path" if section["kind"] == "pretrained" else "source"
        name = section.get(key)
        if isinstance(name, str) and name and name != "teacher":
            problem = model_source_problem(
                f"{role}.{key}", name, unreachable=unreachable, cache_dir=cache_dir
            )
            if problem is not None:
                found.append((f"{role}.{key}", problem))
    return found
