"""Reading a config: YAML file, dotted overrides, validation, and error messages that name the field and the fix.

Also the inverse views of the tree: `dump_config` (the resolved YAML every component reads) and `describe_fields`
(the key list of `opd run --help`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from opd.config.base import TAG_FIELDS, variant_tag
from opd.config.root import Config

# A check beyond the models' own validation, for rules whose knowledge lives outside the core (the loss registry's):
# it gets the validated tree and returns (dotted field path, message) for each problem, or nothing.
Check = Callable[[Config], Iterable[tuple[str, str]]]


# A cross-section check's message that starts with the field it is about: `pipeline.mode: sync needs ...`.
_LEADING_KEY = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+): ")
_LEADING_KEY_REL = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*): ")


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and how to fix it."""


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value; write e.g. learner.max_steps=20")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key part; write e.g. learner.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (`learner.max_steps=20`); values are parsed as YAML scalars/lists. Overrides apply in
    order, and one that changes a section's `kind`/`type` clears that section's other keys first."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        if path[-1] in TAG_FIELDS and node.get(path[-1], value) != value:
            node.clear()  # switching `student.kind` starts the section afresh: the old variant's keys do not apply
        node[path[-1]] = value
    return data


def _format_problems(source: str, problems: Iterable[tuple[str, str]]) -> str:
    """The one layout of every load-time error: a header naming the file, then `  field.path: message` lines."""
    lines = [f"invalid config ({source}):"]
    lines.extend(f"  {loc or '<root>'}: {msg}" for loc, msg in problems)
    return "\n".join(lines)


def _section_models(annotation: Any) -> dict[str, type[BaseModel]]:
    """The config models a field holds, by the name pydantic puts in an error's location for each: the variant
    tag (`pretrained`) for a tagged union, the class name otherwise; empty for a plain value."""
    found = {}
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            tag = variant_tag(arg)
            found[str(tag[1]) if tag is not None else arg.__name__] = arg
    return found


def _walk_location(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None, list[type[BaseModel]]]:
    """The dotted key a user writes for an error location (`student.pretrained.name_or_path` is written
    `student.name_or_path`), the section model holding its last part, and that section's other variants."""
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    siblings: list[type[BaseModel]] = []
    items = [str(p) for p in loc if not str(p).startswith("function-after")]
    i = 0
    while i < len(items):
        part = items[i]
        parts.append(part)
        i += 1
        if i == len(items) or model is None or part not in model.model_fields:
            continue
        subs = _section_models(model.model_fields[part].annotation)
        if len(subs) == 1:
            model, siblings = next(iter(subs.values())), []
        elif i < len(items) and items[i] in subs:  # the variant's name in the location, not a key
            model, siblings = subs[items[i]], [m for n, m in subs.items() if n != items[i]]
            i += 1
        else:
            model, siblings = None, []
    return ".".join(parts), model, siblings


def _unknown_key_message(loc: tuple[Any, ...]) -> tuple[str, str]:
    """Name the key the user probably meant (difflib against the section's own keys), or the variant it
    belongs to when it is a key of the section's other `kind`."""
    path, model, siblings = _walk_location(loc)
    generic = "unknown key; check the spelling against `opd run --help` or configs/"
    key = path.rsplit(".", 1)[-1]
    section = path.rsplit(".", 1)[0] if "." in path else ""
    prefix = f"{section}." if section else ""
    if model is None:
        return path, generic
    own = variant_tag(model)
    for other in siblings:
        tag = variant_tag(other)
        if key in other.model_fields and tag is not None and own is not None:
            return path, (
                f"unknown key for {prefix}{own[0]}: {own[1]}; it is a key of {prefix}{tag[0]}: {tag[1]}, "
                f"so set {prefix}{tag[0]}={tag[1]} too"
            )
    candidates = list(model.model_fields)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return path, f"unknown key; did you mean {prefix}{close[0]}? (all keys: `opd run --help`)"
    nested = _nested_keys(model, key)
    if nested:  # `learner.dtype` for `learner.deepspeed.dtype`: the key lives one section down
        return (
            path,
            f"unknown key; did you mean {' or '.join(prefix + n for n in nested)}? (all keys: `opd run --help`)",
        )
    if section and len(candidates) <= 16:
        return path, f"unknown key; {section} has: {', '.join(candidates)} (all keys: `opd run --help`)"
    return path, generic


def _nested_keys(model: type[BaseModel], key: str) -> list[str]:
    """Where `key` is a field of a section inside `model` (one level down, any variant)."""
    found = []
    for name, field in model.model_fields.items():
        for sub in _section_models(field.annotation).values():
            if key in sub.model_fields and f"{name}.{key}" not in found:
                found.append(f"{name}.{key}")
    return found


def _relative_key(loc: str, msg: str) -> tuple[str, str] | None:
    """A section's own check that names a key inside the section first (`deepspeed.dtype: ...` raised by
    `learner`) is shown at that key (`learner.deepspeed.dtype`), where the user sets it."""
    named = _LEADING_KEY_REL.match(msg)
    if not named:
        return None
    first = named.group(1).split(".")[0]
    _, model, _ = _walk_location((*loc.split("."), first))  # the model that would hold `first`
    if model is None or first not in model.model_fields:
        return None
    return f"{loc}.{named.group(1)}", msg[named.end() :]


def _validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            loc, msg = _unknown_key_message(tuple(err["loc"]))
        else:
            loc = _walk_location(tuple(err["loc"]))[0]
            named = _LEADING_KEY.match(msg) if not loc else None
            if named:  # a check across sections names its field first: show it where the field goes
                loc, msg = named.group(1), msg[named.end() :]
            elif loc:
                loc, msg = _relative_key(loc, msg) or (loc, msg)
            if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r})"
        problems.append((loc, msg))
    return problems


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (run:, task:, ...)")
    return loaded or {}


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    checks: Iterable[Check] = (),
    unvalidated_checks: Iterable[Callable[[dict], list[tuple[str, str]]]] = (),
) -> Config:
    """Load YAML, apply dotted overrides, validate; raise ConfigError with every problem named.

    `checks` run on the validated tree, after the models' own validation passed; the problems of all of them are
    raised together, laid out like validation errors. They carry rules the core cannot know, e.g. the loss
    registry's `learner.losses.config_errors` (which loss names exist and what inputs each needs).
    `unvalidated_checks` run on the raw tree only when validation failed, so a problem the `checks` would have
    found (a model path that does not exist) is named in the same message, not after the user fixed the first."""
    source = str(path) if path else "<defaults>"
    data = _read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = _validation_problems(exc)
        problems += [p for check in unvalidated_checks for p in check(data) if p not in problems]
        raise ConfigError(_format_problems(source, problems)) from None
    problems = [problem for check in checks for problem in check(cfg)]
    if problems:
        raise ConfigError(_format_problems(source, problems))
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved tree as YAML: what the launcher writes to runs/<id>/config.yaml for every component. With
    `teachers:` the teacher section is left out: it is unused then, and a config that sets it is refused."""
    exclude = {"teacher"} if cfg.teachers is not None else None
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=exclude), sort_keys=False)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per config key with its default and description, for `opd run --help`."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        variants = [a for a in get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            variants = [ann]
        for sub in variants:
            tag = variant_tag(sub)
            label = f" [{tag[1]}]" if tag is not None and len(variants) > 1 else ""
            if label:
                lines.append(f"  {key}:{label}")
            lines.extend(describe_fields(sub, key + "."))
        if variants:
            continue
        value = field.get_default(call_default_factory=True)
        shown = str(value) if isinstance(value, Path) else repr(value)
        default = "" if field.is_required() else f" (default: {shown})"
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  {key}{default}{desc}")
    return lines
