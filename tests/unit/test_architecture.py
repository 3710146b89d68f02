"""The layers of DESIGN.md, checked over the source tree with `ast` (no project module is imported).

A module's imports are every `import`/`from ... import` anywhere in it (inside functions too: a lazy import is
still a dependency, and was how the old cycles hid), plus the "module:attr" strings of the backend registries.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP = ("opd", "actors", "learner", "teacher_scorers", "broker", "weight_sync")
# opd.images: the wire format of images (what opd.protocol carries), so core like the protocol
CORE_MODULES = ("opd.config", "opd.protocol", "opd.images", "opd.tasks", "opd.verifiers", "opd.registry")
TRANSPORT = ("broker", "weight_sync")
MIDDLE = ("opd.models", "opd.runtime")
COMPONENTS = ("actors", "teacher_scorers", "learner")
ROOF = ("opd.launch",)
ENTRY_POINTS = ("opd.__main__",)  # `python -m opd`; the console script names opd.launch.cli itself
BROKER_TYPES = {"zmq", "redis"}
BACKEND_NAMES = {"hf", "vllm", "remote", "sglang", "openai", "torch", "deepspeed"}
REGISTRY_ENTRY = re.compile("^(" + "|".join(TOP) + r")(\.[a-z_0-9]+)*:[A-Za-z_][A-Za-z_0-9]*$")
# Where a backend kind's own names may be compared against config values: its folder and its config section.
BACKEND_FOLDERS = ("broker", "actors.engines", "teacher_scorers.backends", "learner.engines", "opd.config")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for top in TOP:
        for path in (REPO / top).rglob("*.py"):
            found[_module_name(path)] = path
    return found


SOURCES = _sources()


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _resolve(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or None for third-party code."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in SOURCES:
            return candidate
        parts.pop()
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(SOURCES[module].read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from opd import tasks`
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and REGISTRY_ENTRY.match(node.value)
        ):
            names.add(node.value.split(":", 1)[0])  # registry entries: "learner.engines.torch:TorchEngine"
    resolved = {_resolve(n) for n in names}
    return {m for m in resolved if m is not None and m != module}


GRAPH = {m: _imports(m) for m in SOURCES}


def layer(module: str) -> str:
    """core, transport, middle, component, roof or entry, as DESIGN.md's "Layers" names them."""
    if module in ENTRY_POINTS:
        return "entry"
    if _within(module, ROOF):
        return "roof"
    if _within(module, MIDDLE):
        return "middle"
    if module == "opd" or _within(module, CORE_MODULES):
        return "core"
    if _within(module, TRANSPORT):
        return "transport"
    if _within(module, COMPONENTS):
        return "component"
    raise AssertionError(f"{module} belongs to no layer of DESIGN.md; place it in one")


# What each layer may import (besides itself, within the limits checked below).
MAY_IMPORT = {
    "core": {"core"},
    "transport": set(),  # and only its own folder
    "middle": {"core", "transport", "middle"},
    "component": {"core", "transport", "middle"},  # and only its own folder among the components
    "roof": {"core", "transport", "middle", "component", "roof"},
    "entry": {"roof"},
}


def _layer_violations() -> list[str]:
    bad = []
    for module, deps in GRAPH.items():
        mine = layer(module)
        for dep in deps:
            theirs = layer(dep)
            own_folder = dep.split(".")[0] == module.split(".")[0]
            if mine == "transport" and not own_folder:
                bad.append(
                    f"transport module {module} imports {dep}; {module.split('.')[0]}/ imports nothing of the project"
                )
            elif mine == "component" and theirs == "component" and not own_folder:
                bad.append(f"component {module} imports another component's {dep}")
            elif theirs not in MAY_IMPORT[mine] | ({mine} if mine in ("transport", "component") else set()):
                bad.append(f"{mine} module {module} imports {theirs} module {dep}")
    return sorted(bad)


def test_layers_are_respected():
    assert _layer_violations() == []


def test_no_import_cycles():
    cycles, state = [], defaultdict(int)  # 0 new, 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(GRAPH[m]):
            if state[dep] == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif state[dep] == 0:
                visit(dep, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if state[m] == 0:
            visit(m, [])
    # A package importing its own submodule (re-exports, registries) is not a cycle worth refusing when the
    # submodule does not import the package back; those never appear here because both edges are needed.
    assert cycles == []


def _compares_backend_name(node: ast.Compare) -> set[str]:
    """String constants compared with ==, != or `in` in this comparison."""
    found = set()
    for side in [node.left, *node.comparators]:
        if isinstance(side, ast.Constant) and isinstance(side.value, str):
            found.add(side.value)
        elif isinstance(side, ast.Tuple | ast.List | ast.Set):
            found.update(
                e.value for e in side.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return found


def _branch_sites(names: set[str]) -> list[str]:
    sites = []
    for module, path in SOURCES.items():
        if _within(module, BACKEND_FOLDERS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and _compares_backend_name(node) & names:
                sites.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return sites


def test_nothing_outside_broker_branches_on_the_broker_type():
    assert _branch_sites(BROKER_TYPES) == []


def test_nothing_outside_a_backend_folder_branches_on_the_configured_backend():
    """Actor engines, teacher backends and learner engines are chosen by their registries, not by if/else."""
    assert _branch_sites(BACKEND_NAMES) == []


def test_nothing_outside_broker_names_a_broker_class():
    bad = [
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if d in ("broker.zmq", "broker.redis") and not _within(m, ("broker",))
    ]
    assert bad == []


@pytest.mark.parametrize(
    "registry, folder",
    [
        ("actors.engines", "actors.engines"),
        ("learner.engines", "learner.engines"),
        ("teacher_scorers.backends", "teacher_scorers.backends"),
        ("broker", "broker"),
    ],
)
def test_each_backend_kind_has_one_registry_inside_its_folder(registry, folder):
    """Registry entries ("module:Class") point into the kind's own folder, one file per backend."""
    tree = ast.parse(SOURCES[registry].read_text())
    entries = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and REGISTRY_ENTRY.match(n.value)
    ]
    assert len(entries) >= 2, f"{registry} has no registry of 'module:Class' entries"
    for entry in entries:
        module = entry.split(":", 1)[0]
        assert _within(module, (folder,)) and module in SOURCES, (
            f"{registry}: {entry} is not a file in {folder}/"
        )


def test_the_checks_see_a_violation():
    """The checks above must be able to fail: an upward import planted in a copy of the graph is caught."""
    GRAPH["opd.protocol"] = GRAPH["opd.protocol"] | {"opd.launch.cli"}
    try:
        assert any("opd.protocol" in v for v in _layer_violations())
    finally:
        GRAPH["opd.protocol"] = GRAPH["opd.protocol"] - {"opd.launch.cli"}
