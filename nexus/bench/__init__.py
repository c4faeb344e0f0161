"""``nexus bench``: Nexus side by side with the bare libraries it is built on, in one run on one machine.

Every scenario (:mod:`nexus.bench.scenarios`) runs its Nexus side and its bare-library side in fresh
processes, interleaved (A B, B A, ...), and reports medians, server CPU per event from ``/proc`` and the
ratios; :mod:`nexus.bench.report` prints the table and writes JSON, Markdown and a PNG chart.
"""

from __future__ import annotations

from nexus.bench.runner import run, summarize
from nexus.bench.scenarios import BY_NAME, SCENARIOS, Config, Scenario

__all__ = ["BY_NAME", "SCENARIOS", "Config", "Scenario", "run", "summarize"]
