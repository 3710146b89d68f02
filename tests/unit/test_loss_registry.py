"""The loss registry: what each name needs, the objective's dispatch through it, and `config_errors`."""

from __future__ import annotations

import pytest

from learner import losses
from learner.losses import LOSSES, config_errors
from learner.objective import Objective
from opd.config import ConfigError, load_config
from opd.launch.checks import load_run_config

NAMES = ["reverse_kl_pg", "opd_penalty", "topk_forward_kl", "topk_reverse_kl", "gkd_jsd", "hybrid"]


def with_(cfg, **dotted):
    """A copy of the loaded config with fields replaced and *not* validated, as a config that a roof module
    checks with config_errors may be: `with_(cfg, learner__loss="x")`."""
    for key, value in dotted.items():
        path = key.split("__")
        chain = [cfg]
        for name in path[:-1]:
            chain.append(getattr(chain[-1], name))
        new = chain[-1].model_copy(update={path[-1]: value})
        for parent, name in zip(reversed(chain[:-1]), reversed(path[:-1]), strict=True):
            new = parent.model_copy(update={name: new})
        cfg = new
    return cfg


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["scorer.topk=4", "sampling.n=2"])


def test_the_registry_holds_the_built_in_losses_with_what_each_needs():
    """The built-in losses keep their flags; a loss added by README's recipe needs no edit here."""
    assert set(NAMES) <= set(LOSSES)
    needs = {
        n: (s.needs_topk, s.needs_rewards, s.takes_ratio, s.distill_term)
        for n, s in LOSSES.items()
        if n in NAMES
    }
    assert needs == {
        "reverse_kl_pg": (False, False, True, True),
        "opd_penalty": (False, True, True, False),
        "topk_forward_kl": (True, False, False, True),
        "topk_reverse_kl": (True, False, False, True),
        "gkd_jsd": (True, False, False, True),
        "hybrid": (False, True, True, False),
    }
    for name, spec in LOSSES.items():
        assert spec.name == name and spec.summary and callable(spec.per_token)


def test_an_unknown_loss_is_refused_naming_the_choices(cfg):
    with pytest.raises(ValueError, match="choose one of " + ", ".join(LOSSES)):
        Objective(with_(cfg, learner__loss="forward_kl"))
    with pytest.raises(ValueError, match="learner.loss 'nope' is not a registered loss"):
        losses.teacher_term("nope", "reverse_kl_pg")


@pytest.mark.parametrize("name", NAMES)
def test_the_objective_takes_its_flags_from_the_registry(cfg, name):
    obj = Objective(with_(cfg, learner__loss=name, learner__hybrid__distill="gkd_jsd"))
    term = LOSSES["gkd_jsd"] if name == "hybrid" else LOSSES[name]
    assert obj.spec is LOSSES[name] and obj.term is term
    assert obj.needs_rewards == LOSSES[name].needs_rewards and obj.logit_loss == term.needs_topk


def test_config_errors_accepts_every_valid_combination(cfg):
    for name in NAMES:
        for mode in ("none", "tis", "mask") + (("ppo_clip", "decoupled") if LOSSES[name].takes_ratio else ()):
            assert config_errors(with_(cfg, learner__loss=name, learner__correction__mode=mode)) == []
    assert config_errors(with_(cfg, learner__loss="hybrid", learner__correction__mode="ppo_clip",
                               learner__hybrid__distill="topk_forward_kl")) == []  # fmt: skip
    one = with_(cfg, sampling__n=1, learner__task_estimator="reinforce_pp")
    assert config_errors(with_(one, learner__loss="opd_penalty")) == []


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        (
            {"learner__loss": "forward_kl"},
            "learner.loss",
            "choose one of " + ", ".join(LOSSES),
        ),
        (
            {"learner__loss": "hybrid", "learner__hybrid__distill": "hybrid"},
            "learner.hybrid.distill",
            "choose one of reverse_kl_pg, topk_forward_kl, topk_reverse_kl, gkd_jsd",
        ),
        (
            {"learner__loss": "gkd_jsd", "scorer__topk": 0},
            "scorer.topk",
            "learner.loss gkd_jsd needs the teacher's",
        ),
        (
            {"learner__loss": "hybrid", "learner__hybrid__distill": "topk_reverse_kl", "scorer__topk": 0},
            "scorer.topk",
            "learner.loss topk_reverse_kl needs the teacher's top-k logprobs; set scorer.topk (e.g. 8)",
        ),
        (
            {"learner__loss": "opd_penalty", "sampling__n": 1},
            "sampling.n",
            "set sampling.n >= 2 or learner.task",
        ),
        ({"learner__loss": "hybrid", "sampling__n": 1}, "sampling.n", "grpo normalises rewards within"),
        (
            {"learner__loss": "topk_forward_kl", "learner__correction__mode": "ppo_clip"},
            "learner.correction.mode",
            "use learner.correction.mode: tis, mask or none",
        ),
        (
            {"learner__loss": "gkd_jsd", "learner__correction__mode": "decoupled"},
            "learner.correction.mode",
            "decoupled clips a policy-gradient ratio, and loss gkd_jsd has none",
        ),
    ],
)
def test_config_errors_name_the_field_and_the_fix(cfg, fields, where, says):
    errors = config_errors(with_(cfg, **fields))
    assert len(errors) == 1 and errors[0][0] == where and says in errors[0][1]


def test_config_errors_reports_every_problem_at_once(cfg):
    bad = with_(
        cfg, learner__loss="hybrid", learner__hybrid__distill="gkd_jsd", scorer__topk=0, sampling__n=1
    )
    assert [field for field, _ in config_errors(bad)] == ["scorer.topk", "sampling.n"]


@pytest.mark.parametrize("name", NAMES)
def test_todays_config_validation_and_config_errors_agree(name):
    """Loading a config as every `opd` verb does (opd.launch.checks) refuses exactly what config_errors reports."""
    base = load_config(None, [])
    combos = (["scorer.topk=0"], ["sampling.n=1"], ["sampling.n=1", "scorer.topk=4"], ["scorer.topk=4"])
    for over in combos + tuple(
        ["scorer.topk=4", f"learner.correction.mode={m}"] for m in ("ppo_clip", "decoupled")
    ):
        overrides = [f"learner.loss={name}", "learner.hybrid.distill=topk_forward_kl", *over]
        try:
            loaded = load_run_config(None, overrides)
        except ConfigError:
            loaded = None
        fields = {}
        for item in overrides:
            key, value = item.split("=")
            fields[key.replace(".", "__")] = int(value) if value.isdigit() else value
        assert (loaded is None) == bool(config_errors(with_(base, **fields))), over
