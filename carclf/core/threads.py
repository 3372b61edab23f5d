"""How many CPU threads torch uses: every core this process may run on, or a trial's share, for one block.

    with torch_threads(machine_threads()):     # the sweep's driver and `carclf report` extracting features
        ...

Ray gives a trial as many threads as its CPUs (it sets OMP_NUM_THREADS); the driver and the report
have the machine to themselves while they extract features, so they take all of it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def machine_threads() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else every core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch uses `n` CPU threads in the block (None: as it is). A network's float sums on a CPU depend on
    the thread count, so a retest with the trial's seed reproduces the trial only with the trial's threads
    (a Ray trial gets as many as its CPUs, `carclf report` all of the machine's)."""
    if not n:
        yield
        return

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
