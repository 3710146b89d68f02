"""Emulated stage compute (`pipeline.service_time`): pad a batch's real work up to N tokens x ms per token.

On a 2-core CPU every stage competes for the same cores, so overlapping them cannot show what it buys when each
stage has its own accelerator. Padding with a sleep gives each stage a fixed service time that does not use the
CPU, which is what a stage on its own device looks like to the others. One helper for all three stages, so they
pad the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def pad_to_service_time(
    started: float,
    tokens: int,
    ms_per_token: float,
    sleep: Callable[[float], object] = time.sleep,
) -> float:
    """Sleep until `tokens` x `ms_per_token` ms have passed since `started` (a `time.perf_counter()` value).

    Returns the seconds slept: 0 when the emulation is off (ms_per_token 0) or the real compute already took at
    least that long. `sleep` may be a stop flag's `wait`, so a stage that is told to stop is not held up."""
    if ms_per_token <= 0 or tokens <= 0:
        return 0.0
    remaining = started + tokens * ms_per_token / 1000.0 - time.perf_counter()
    if remaining <= 0:
        return 0.0
    t0 = time.perf_counter()
    sleep(remaining)
    return time.perf_counter() - t0
