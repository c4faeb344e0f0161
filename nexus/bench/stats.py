"""Pure helpers of ``nexus bench``: interleaving, medians, percentiles, ratios and reading ``/proc``.

CPU is read from ``/proc/<pid>/stat`` (user + system time of one process) because wall-clock rates move with
the machine's load while the CPU a process spends per event barely does.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence

NEXUS = "nexus"
BARE = "bare"


def interleaved(pairs: int) -> list[str]:
    """The order of the runs: ``nexus bare bare nexus nexus bare ...`` — A B, then B A, so neither side always
    runs first (a warm or cold machine favours no one); ``pairs`` of each."""
    if pairs < 1:
        raise ValueError("pairs must be at least 1")
    order: list[str] = []
    for index in range(pairs):
        order.extend((NEXUS, BARE) if index % 2 == 0 else (BARE, NEXUS))
    return order


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values that were measured (``None`` ones left out); ``None`` when there are none."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` (0..1) percentile by the nearest-rank method; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(nexus: float | None, bare: float | None) -> float | None:
    """``nexus / bare``, or ``None`` when either is missing or the baseline is zero."""
    if nexus is None or bare is None or bare == 0:
        return None
    return nexus / bare


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat_cpu(stat: str, ticks_per_s: int = CLOCK_TICKS) -> float:
    """utime + stime in seconds from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or ``)``: fields are counted after its
    last ``)``; utime and stime are fields 14 and 15.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14, so rest[11]; stime rest[12].
    return (int(rest[11]) + int(rest[12])) / ticks_per_s


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return parse_stat_cpu(stat.read())


def parse_status_rss(status: str) -> int:
    """Resident set size in bytes from the text of ``/proc/<pid>/status`` (its ``VmRSS`` line, in kB)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmRSS line: the process has exited")


def rss_bytes(pid: int) -> int:
    """The resident set size of the process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return parse_status_rss(status.read())


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and p99.9 of latencies in milliseconds."""
    return {
        "p50": percentile(latencies_ms, 0.50),
        "p99": percentile(latencies_ms, 0.99),
        "p999": percentile(latencies_ms, 0.999),
    }
