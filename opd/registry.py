"""The lookup every backend registry shares: `"name": "module:Attr"`, imported only when that name is chosen.

Lazy on purpose: optional dependencies (vLLM, DeepSpeed, Ray, an HTTP client) stay optional until configured.
(`broker/` keeps its own copy of these lines, because the transport layer imports nothing of the project.)
"""

from __future__ import annotations

import importlib
from typing import Any


def load(registry: dict[str, str], name: str, unknown: str) -> Any:
    """The object `registry[name]` names; NotImplementedError(`unknown`) if no such name is registered."""
    try:
        module, attr = registry[name].split(":")
    except KeyError:
        raise NotImplementedError(unknown) from None
    return getattr(importlib.import_module(module), attr)
