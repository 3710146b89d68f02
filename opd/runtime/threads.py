"""Torch thread counts, chosen on purpose by every process that runs torch.

Why: torch's default is one intra-op thread per core. On a small shared machine (2 cores, a second busy
process) two threads that wait on each other at every reduction made a teacher SFT step 15x slower than one
thread did (2585 ms against 177 ms). So no process of ours runs torch on the default: components pin
`run.torch_threads` in `setup_process`, the launcher pins it before it evaluates models, and the demo-model
build always runs on `BUILD_THREADS` (a part of its recipe: the bytes of a float reduction depend on how it is
split across threads, so a fixed count is what lets the same recipe give the same checkpoint everywhere).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

BUILD_THREADS = 1  # the demo-model build's intra- and inter-op threads (part of the recipe: see above)


def pin_threads(n: int) -> None:
    """This process's torch intra-op threads = `n`, and its inter-op threads too where still possible.

    Torch lets a process set its inter-op pool once, before any inter-op work has started; after that (a second
    call, or a process that already ran parallel work) the intra-op count is still set and the pool stays."""
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run a block on `n` intra-op threads, then give the process back the count it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
