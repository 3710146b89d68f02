"""Is each model and tokenizer a run names loadable here? Answered before anything starts, in one line per field.

`from_pretrained` treats any name that is not a directory as a hub id: a mistyped path cost 34 s of hub retries
and an 87-line traceback, and an offline machine a 58-line one. Here a name that can only be a path is refused as a
path, only a hub id is looked up (once, briefly, and not when it is cached), and an offline machine is told so.
Kept out of the model stack (no torch, no transformers), so `opd run` refuses a bad name at once; `opd run` and
`opd prepare` pass `model_source_problems` to `load_config(checks=...)`. A component started by hand does not run
it: its models may live where the launcher's machine cannot see them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opd.config.root import Config

# `name` or `org/name` of letters, digits, `-`, `_`, `.`: the only shapes a hub id can take.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HUB_LOOKUP_TIMEOUT_S = 10.0


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


def model_source_problem(
    field: str,
    name: str,
    needs: tuple[str, ...] = ("config.json",),
    unreachable: dict[str, str] | None = None,
) -> str | None:
    """Why `from_pretrained(name)` would fail, in one line, or None. A name that exists on disk is a local
    directory; one that can only be a path and does not exist is refused as a path, without asking the hub (a
    missing path used to cost a 34 s hub retry and 87 lines); only a hub id is looked up, and only when it is not
    already cached."""
    path = Path(name).expanduser()
    if path.exists():
        return _local_problem(name, path, needs)
    if _is_path(name):
        return (
            f"{name} does not exist (looked for {path.resolve()}); set {field} to the directory of a model saved "
            "with save_pretrained, or to a hub id such as Qwen/Qwen2.5-0.5B"
        )
    return _hub_problem(name, field, {} if unreachable is None else unreachable)


def model_source_problems(cfg: Config) -> list[tuple[str, str]]:
    """Every pretrained model and tokenizer of the run that cannot be loaded, as (field, message) pairs, for
    `opd run` and `opd prepare` to refuse before starting anything. A teacher behind a server is not loaded by
    the run, so it is not checked."""
    roles = ["student"] + (["teacher"] if cfg.scorer.teacher_is_local else [])
    found, unreachable = [], {}
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    for role in roles:
        spec = getattr(cfg, role)
        if spec.kind != "pretrained":
            continue
        checks = [(f"{role}.name_or_path", spec.name_or_path, ("config.json",))]
        if spec.tokenizer is not None:
            checks.append((f"{role}.tokenizer", spec.tokenizer, tokenizer_files))
        for field, name, needs in checks:
            problem = model_source_problem(field, name, needs, unreachable)
            if problem is not None:
                found.append((field, problem))
    return found


def raw_model_source_problems(data: dict) -> list[tuple[str, str]]:
    """`model_source_problems` for a tree that failed validation (say, a pretrained student beside the tiny
    teacher): the model names it can read are checked anyway, so one message names every problem."""
    found, unreachable = [], {}
    for role in ("student", "teacher"):
        section = data.get(role)
        if not isinstance(section, dict) or section.get("kind") != "pretrained":
            continue
        name = section.get("name_or_path")
        if isinstance(name, str) and name:
            problem = model_source_problem(f"{role}.name_or_path", name, unreachable=unreachable)
            if problem is not None:
                found.append((f"{role}.name_or_path", problem))
    return found
