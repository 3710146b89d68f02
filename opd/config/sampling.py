"""The sampling section: how actors sample, and the temperature the learner scores at."""

from __future__ import annotations

from pydantic import Field

from opd.config.base import Strict


class SamplingConfig(Strict):
    """How actors sample. Behaviour logprobs are log-softmax(raw logits / temperature) of the sampled token."""

    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the learner scores at the same one."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    max_new_tokens: int = Field(
        8, ge=1, description="Longest response; longer ones end with finish_reason length."
    )
    n: int = Field(4, ge=1, description="Samples per prompt (group size).")
