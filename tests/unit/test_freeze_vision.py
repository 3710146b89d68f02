"""student.freeze_vision: the learner trains and broadcasts the language model's weights only, the actors expect
exactly those (one function on both ends), and a text-only student is told the setting does not apply."""

from __future__ import annotations

import pytest

from opd.models import builds
from opd.models.vision import freeze_vision, synced_parameters
from tests.scored import tiny_model
from tests.vlm_models import untrained_vlm_config
from weight_sync.broadcast import manifest


def test_frozen_vision_is_neither_trained_nor_sent(tmp_path):
    cfg = untrained_vlm_config(tmp_path, student={"freeze_vision": True})
    model, _ = builds.load_asset(builds.ensure_student_asset(cfg, log=lambda *_: None))
    everything = dict(model.named_parameters())
    sent = dict(synced_parameters(model, True))
    assert set(sent) < set(everything)
    held_back = set(everything) - set(sent)
    assert held_back and all(("vision_tower" in n) or ("multi_modal_projector" in n) for n in held_back)
    assert any(n.startswith("lm_head") for n in sent) and any("language_model" in n for n in sent)
    assert manifest(synced_parameters(model, False)) == manifest(list(model.named_parameters()))

    frozen = freeze_vision(model)
    assert frozen == sum(everything[n].numel() for n in held_back)
    assert all(not everything[n].requires_grad for n in held_back)
    assert all(p.requires_grad for p in sent.values())


def test_freeze_vision_on_a_text_model_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="student.freeze_vision: the student has no vision tower"):
        synced_parameters(model, True)
    assert len(synced_parameters(model, False)) == len(list(model.parameters()))
