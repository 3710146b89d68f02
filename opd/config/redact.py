"""Secrets out of what a run writes to disk: the resolved config, logs, anything a person may share.

A run directory is read by more people than the ones who hold its credentials (it is copied into bug reports, kept
on shared storage, uploaded to experiment trackers), so a secret found in a value is replaced by REDACTED before it
is written. Two kinds of secret are recognised, with no knowledge of any particular section:

- the password of a URL (`tcp://user:password@host`, `https://user:token@host`): the user name stays, so the
  text still says who connected where;
- a string value under a key that names a secret (`password`, `db_password`, `secret`, `token`, `api_key`, ...).
  A key ending in `_env` or `_file` names where a secret is kept (`api_key_env: TEACHER_API_KEY`), not the secret,
  and a number under such a key (`actor_ms_per_token`) is no secret either.

Pure functions on plain data (what `model_dump(mode="json")` returns) and strings; nothing here reads or writes.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "REDACTED"

# user-info with a password in any scheme://... URL: group 1 is `scheme://user:`, group 2 the password
_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@'\"]*:)([^\s@/'\"]+)(?=@)")
# a key whose value is itself a secret: its last word (after _ - or .) is one of these
_SECRET_KEY = re.compile(
    r"(?:^|[_.-])(?:password|passwd|pass|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)$",
    re.IGNORECASE,
)
# `password=...`, `token: ...` and `requirepass ...` in free text (log lines, command lines)
_SECRET_ASSIGNMENT = re.compile(
    r"(\b[\w.-]*(?:password|passwd|secret|token|api[_-]?key)['\"]?\s*[=:]\s*['\"]?|\brequirepass\s+['\"]?)"
    r"(?!REDACTED)([^\s'\",}]+)",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """Whether a string under this key is a secret itself (not where to find one)."""
    return bool(_SECRET_KEY.search(key)) and not key.lower().endswith(("_env", "_file"))


def redact_text(text: str) -> str:
    """`text` with URL passwords and `password=...`-style values replaced by REDACTED."""
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}", text)
    return _SECRET_ASSIGNMENT.sub(rf"\1{REDACTED}", text)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a tree of dicts, lists and scalars with every secret (see the module doc) replaced by REDACTED."""
    if isinstance(tree, dict):
        return {k: redact(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact(v, key) for v in tree]
    if isinstance(tree, str):
        if tree and is_secret_key(key):
            return REDACTED
        return _URL_PASSWORD.sub(rf"\1{REDACTED}", tree)
    return tree


def secret_paths(tree: Any, path: str = "", key: str = "") -> list[str]:
    """The dotted paths of the values `redact` would change, e.g. ["broker.url"], to name them in an error."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in secret_paths(v, f"{path}.{k}".lstrip("."), str(k))]
    if isinstance(tree, list | tuple):
        return [p for i, v in enumerate(tree) for p in secret_paths(v, f"{path}.{i}", key)]
    return [path] if redact(tree, key) != tree else []
