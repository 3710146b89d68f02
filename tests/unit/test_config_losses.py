"""The loss rules of a config: which loss names exist and which inputs each loss needs.

The config core knows no loss names; the loss registry checks them through `load_config(checks=...)`, the path every
`opd` command takes. These cases were the config's own loss validators before the registry owned them.
"""

from pathlib import Path

import pytest

from learner.losses import config_errors
from opd.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_passes_the_loss_checks(path):
    assert isinstance(load_config(path, checks=(config_errors,)), Config)


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["learner.loss=gkd_jsd", "scorer.topk=0"], "learner.loss gkd_jsd", "set scorer.topk"),
        (["learner.loss=hybrid", "learner.hybrid.distill=topk_reverse_kl"], "topk_reverse_kl", "scorer.topk"),
        (["learner.loss=opd_penalty", "sampling.n=1"], "sampling.n >= 2", "task_estimator: reinforce_pp"),
        (
            ["learner.loss=topk_forward_kl", "scorer.topk=4", "learner.correction.mode=ppo_clip"],
            "learner",
            "mode: tis, mask or none",
        ),
        (["learner.loss=no_such_loss"], "learner.loss", "no_such_loss"),
        (
            ["learner.loss=hybrid", "learner.hybrid.distill=no_such_loss"],
            "learner.hybrid.distill",
            "no_such_loss",
        ),
        (
            ["learner.loss=hybrid", "learner.hybrid.distill=opd_penalty"],
            "learner.hybrid.distill",
            "opd_penalty",
        ),
        (["learner.loss=hybrid", "learner.hybrid.distill=hybrid"], "learner.hybrid.distill", "hybrid"),
    ],
)
def test_loss_rules_are_refused_with_field_and_fix(overrides, field, hint):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides, checks=(config_errors,))
    message = str(exc.value)
    assert message.startswith("invalid config (<defaults>):\n  ")
    assert field in message and hint in message


@pytest.mark.parametrize(
    "overrides",
    [
        ["learner.loss=opd_penalty", "sampling.n=1", "learner.task_estimator=reinforce_pp"],
        ["learner.loss=gkd_jsd", "scorer.topk=4", "learner.correction.mode=mask"],
        ["learner.loss=hybrid", "learner.hybrid.distill=topk_forward_kl", "scorer.topk=4"],
        # hybrid's RL term takes the clipped ratio, so ppo_clip is fine even with a top-k distill term
        [
            "learner.loss=hybrid",
            "learner.hybrid.distill=gkd_jsd",
            "scorer.topk=4",
            "learner.correction.mode=ppo_clip",
        ],
    ],
)
def test_loss_settings_whose_inputs_are_made_are_accepted(overrides):
    assert isinstance(load_config(None, overrides, checks=(config_errors,)), Config)
