"""The shape of opd/config: a core that imports nothing else of the project, broker types named in one module,
and load-time checks from outside the core reported like the models' own validation errors."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from opd.config import BROKER_SECTIONS, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "opd" / "config"
PROJECT_PACKAGES = {
    "opd",
    "actors",
    "teacher_scorers",
    "learner",
    "broker",
    "weight_sync",
    "benchmarks",
    "tests",
}
CORE = ("opd.config", "opd.protocol", "opd.tasks", "opd.verifiers")


def _in_core(module: str) -> bool:
    return module == "opd" or any(module == c or module.startswith(c + ".") for c in CORE)


def test_importing_the_config_loads_only_the_core():
    code = (
        "import sys, opd.config\n"
        f"print('\\n'.join(m for m in sys.modules if m.split('.')[0] in {sorted(PROJECT_PACKAGES)!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    loaded = out.split()
    assert "opd.config.root" in loaded  # the probe saw the package's own modules
    assert [m for m in loaded if not _in_core(m)] == []


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.py")), ids=lambda p: p.name)
def test_config_modules_import_nothing_outside_the_core(path):
    project = [m for m in _imports(path) if m.split(".")[0] in PROJECT_PACKAGES]
    assert [m for m in project if not _in_core(m)] == []


def test_only_the_broker_module_names_broker_types():
    types = [c.model_fields["type"].default for c in BROKER_SECTIONS]
    assert set(types) >= {"zmq", "redis"}
    word = re.compile(r"\b(" + "|".join(map(re.escape, types)) + r")\b")
    found = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.name == "broker.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and word.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    assert found == []


def test_a_broker_outside_the_run_reserves_no_ray_cpus():
    # learner 1 + actor 0.5 + scorer 0.25 = 1.75 CPUs; the embedded broker's 1 more does not fit in 2.
    tight = ["ray.num_cpus=2", "ray.broker.num_cpus=1"]
    with pytest.raises(ConfigError, match=r"ray.num_cpus=2 is less .*broker 1 \+ learner 1"):
        load_config(None, tight)
    cfg = load_config(None, [*tight, "broker.type=redis"])
    assert not cfg.broker.embedded_process and Config().broker.embedded_process


def _two_problems(cfg: Config) -> list[tuple[str, str]]:
    return [("learner.loss", f"{cfg.learner.loss} is refused here"), ("", "and so is the whole tree")]


def test_checks_are_reported_like_validation_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner:\n  loss: anything\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["sampling.n=2"], checks=(_two_problems, lambda cfg: [("sampling.n", "too few")]))
    assert str(exc.value) == (
        f"invalid config ({path}):\n"
        "  learner.loss: anything is refused here\n"
        "  <root>: and so is the whole tree\n"
        "  sampling.n: too few"
    )


def test_checks_see_only_a_valid_tree_and_may_pass_it():
    seen = []
    with pytest.raises(
        ConfigError, match=r"(?s)^invalid config \(<defaults>\):\n  learner.max_steps: .*got 0"
    ):
        load_config(None, ["learner.max_steps=0"], checks=(seen.append,))
    assert seen == []  # the tree was invalid, so no check ran on it
    cfg = load_config(None, ["learner.max_steps=3"], checks=(lambda c: seen.append(c) or [],))
    assert seen == [cfg] and cfg.learner.max_steps == 3
