"""CPU and memory of a set of processes, for the benchmarks (processes that exit are skipped)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import psutil


def cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds used so far by ``procs``."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_mb(procs: Sequence[psutil.Process]) -> float:
    """Resident memory of ``procs`` together, in MiB."""
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20
