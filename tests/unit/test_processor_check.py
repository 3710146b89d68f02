"""The teacher's processor must read the student's images as the student's does: another placeholder id, another
count of image ids per image, or other pixel values are refused at start, naming what differs."""

from __future__ import annotations

import pytest

from opd import tasks
from opd.models import vlm
from opd.models.vision import Vision, check_same_vision


def _vision(patch: int = 8, mean: float = 0.5) -> Vision:
    tok = vlm.build_vlm_tokenizer()
    processor = vlm.build_processor(tok, 32, patch)
    processor.image_processor.image_mean = [mean] * 3
    return Vision(processor, tok.convert_tokens_to_ids(tasks.IMAGE_TOKEN))


def test_the_same_processor_passes_and_a_different_one_is_named():
    check_same_vision(_vision(), _vision())
    check_same_vision(None, _vision())  # a text student: nothing to compare
    with pytest.raises(ValueError, match="makes 4 image ids of an image where the student's makes 16"):
        check_same_vision(_vision(), _vision(patch=16))
    with pytest.raises(ValueError, match="other pixel values"):
        check_same_vision(_vision(), _vision(mean=0.4))
    other = _vision()
    other.image_token_id += 1
    with pytest.raises(ValueError, match="image placeholder"):
        check_same_vision(_vision(), other)
    with pytest.raises(ValueError, match="the teacher model is text-only"):
        check_same_vision(_vision(), None)
