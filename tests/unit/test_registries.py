"""Every registered backend name has its config tag, its README row and (losses) its float64 reference test.

The registries are the one place a name is declared; these checks keep the config, the docs and the tests from
drifting away from them when a loss, engine, backend, broker or launcher is added by README's recipes.
"""

from __future__ import annotations

import re
import typing
from itertools import product
from pathlib import Path

import pytest

from actors.engines import ENGINES as ACTOR_ENGINES
from broker import BROKERS
from learner.engines import ENGINES as LEARNER_ENGINES
from learner.losses import LOSSES, config_errors
from opd.config import load_config
from opd.config.actor import ActorConfig
from opd.config.broker import BROKER_SECTIONS
from opd.config.learner import LearnerConfig
from opd.config.scorer import RemoteTeacherConfig, ScorerConfig
from opd.launch.spawners import SPAWNERS
from teacher_scorers.backends import BACKENDS, backend_name
from tests.unit.test_loss_reference import MATRIX_LOSSES

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _choices(model, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def _readme_row(name: str, *must_contain: str) -> bool:
    """A table row whose first cell is `name` (optionally "(default)") and that names the given files."""
    row = re.compile(rf"^\| `{re.escape(name)}`( \(default\))? \|.*$", re.M)
    return any(all(s in m.group(0) for s in must_contain) for m in row.finditer(README))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_is_accepted_documented_and_has_a_reference(name):
    cfg = load_config(None, [f"learner.loss={name}", "scorer.topk=4", "sampling.n=4"])
    assert not [field for field, _ in config_errors(cfg) if field == "learner.loss"]
    assert _readme_row(name), f"README's losses table has no row for `{name}`"
    assert name in MATRIX_LOSSES, f"{name} has no float64 reference in tests/unit/test_loss_reference.py"


def test_an_unregistered_loss_is_refused_naming_the_registry():
    errors = dict(config_errors(load_config(None, ["learner.loss=not_a_loss"])))
    assert "learner.loss" in errors and all(n in errors["learner.loss"] for n in LOSSES)


def test_actor_engines_match_the_config_and_the_readme():
    assert set(ACTOR_ENGINES) == _choices(ActorConfig, "engine")
    for name in ACTOR_ENGINES:
        assert _readme_row(name, f"actors/engines/{name}.py"), name


def test_learner_engines_match_the_config_and_the_readme():
    assert set(LEARNER_ENGINES) == _choices(LearnerConfig, "engine")
    for name in LEARNER_ENGINES:
        assert _readme_row(name, f"learner/engines/{name}.py"), name


def test_every_teacher_config_reaches_one_backend_and_every_backend_is_reachable():
    reached = set()
    for engine, api in product(_choices(ScorerConfig, "engine"), _choices(RemoteTeacherConfig, "api")):
        cfg = load_config(
            None, [f"scorer.engine={engine}", f"scorer.remote.api={api}", "scorer.remote.url=http://h:1"]
        )
        reached.add(backend_name(cfg.scorer))
    assert reached == set(BACKENDS)
    for name in BACKENDS:
        assert _readme_row(name, f"backends/{name}.py"), name


def test_brokers_match_the_config_sections_and_the_readme():
    tags = {typing.get_args(section.model_fields["type"].annotation)[0] for section in BROKER_SECTIONS}
    assert set(BROKERS) == tags
    for name in BROKERS:
        assert _readme_row(name, f"broker/{name}.py"), name


def test_launchers_are_documented():
    for name, target in SPAWNERS.items():
        module = target.split(":")[0].replace(".", "/") + ".py"
        assert _readme_row(name, module), name


def test_the_readme_check_can_fail():
    assert not _readme_row("no_such_backend") and not _readme_row("hf", "actors/engines/nope.py")
