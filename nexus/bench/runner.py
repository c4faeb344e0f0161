"""Runs the scenarios of ``nexus bench``: each side in turn, interleaved, then medians, ratios and targets."""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nexus.bench.procs import kill_all
from nexus.bench.scenarios import Config, Sample, Scenario
from nexus.bench.stats import BARE, NEXUS, interleaved, median, ratio

NUMBERS = ("events_per_s", "cpu_us", "rss_kb")
PERCENTILES = ("latency_ms", "jitter_ms")


def summarize(samples: dict[str, list[Sample]]) -> dict[str, Any]:
    """Medians of each side's samples and the ``nexus / bare`` ratio of every median both sides have."""
    summary: dict[str, Any] = {NEXUS: {}, BARE: {}, "ratios": {}}
    for side in (NEXUS, BARE):
        runs = samples.get(side, [])
        for key in NUMBERS:
            value = median([run.get(key) for run in runs])
            if value is not None:
                summary[side][key] = value
        for key in PERCENTILES:
            measured = [run[key] for run in runs if run.get(key)]
            if measured:
                summary[side][key] = {name: median([m.get(name) for m in measured]) for name in ("p50", "p99", "p999")}
    for key in NUMBERS:
        value = ratio(summary[NEXUS].get(key), summary[BARE].get(key))
        if value is not None:
            summary["ratios"][key] = value
    for key in PERCENTILES:
        value = ratio((summary[NEXUS].get(key) or {}).get("p99"), (summary[BARE].get(key) or {}).get("p99"))
        if value is not None:
            summary["ratios"][f"{key}_p99"] = value
    return summary


async def run_scenario(
    scenario: Scenario, pairs: int, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Measure ``scenario`` in ``pairs`` interleaved pairs; a failed run is recorded, never raised."""
    result: dict[str, Any] = {
        "name": scenario.name,
        "title": scenario.title,
        "baseline": scenario.baseline,
        "unit": scenario.unit,
        "target": scenario.target,
    }
    reason = await scenario.unavailable()
    if reason is not None:
        progress(f"{scenario.name}: skipped ({reason})")
        return {**result, "skipped": reason, "target_met": None}
    samples: dict[str, list[Sample]] = {NEXUS: [], BARE: []}
    errors: list[str] = []
    for side in interleaved(pairs):
        run = scenario.run_nexus if side == NEXUS else scenario.run_bare
        try:
            sample = await asyncio.wait_for(run(), scenario.timeout)
        except Exception as exc:  # one failed run is a recorded error, never the end of the whole benchmark
            errors.append(f"{side}: {type(exc).__name__}: {exc}")
            progress(f"{scenario.name} {side}: failed: {exc}")
            kill_all()
            continue
        samples[side].append(sample)
        progress(f"{scenario.name} {side}: {_brief(sample)}")
    summary = summarize(samples)
    met = scenario.met(summary) if samples[NEXUS] and samples[BARE] else None
    if not samples[NEXUS] or not samples[BARE]:
        result["skipped"] = "every run of one side failed: " + "; ".join(errors[-2:])
    return {**result, **summary, "target_met": met, "errors": errors, "samples": samples}


def _brief(sample: Sample) -> str:
    parts = []
    for key, value in sample.items():
        if isinstance(value, dict):
            parts.append(f"{key} " + "/".join(f"{v:.2f}" if v is not None else "-" for v in value.values()))
        elif isinstance(value, float):
            parts.append(f"{key} {value:,.2f}")
    return ", ".join(parts)


async def run(
    scenarios: Sequence[type[Scenario]], config: Config, pairs: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Run every scenario in turn; the report (JSON-ready): when, where, options and one entry per scenario."""
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "options": {"quick": config.quick, "pairs": pairs, "nats": config.nats_url},
        "scenarios": [],
    }
    try:
        for scenario in scenarios:
            report["scenarios"].append(await run_scenario(scenario(config), pairs, progress))
    finally:
        kill_all()
    return report
