"""The report of ``nexus bench``: a text table, the same table as Markdown, and a PNG chart of the ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nexus.errors import ConfigurationError

PLURALS = {"delivery": "deliveries"}


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _percentiles(values: dict[str, float | None] | None) -> str:
    if not values:
        return "-"
    return " / ".join(_number(values.get(name), 2) for name in ("p50", "p99", "p999")) + " ms"


def _side(entry: dict[str, Any], side: str) -> str:
    data = entry.get(side) or {}
    unit = entry["unit"]
    units = PLURALS.get(unit, unit + "s")
    parts = []
    if "events_per_s" in data:
        parts.append(f"{_number(data['events_per_s'], 0)} {units}/s")
    if "cpu_us" in data:
        parts.append(f"{_number(data['cpu_us'], 2)} µs CPU/{unit}")
    if "latency_ms" in data:
        parts.append("latency " + _percentiles(data["latency_ms"]))
    if "jitter_ms" in data:
        parts.append("jitter " + _percentiles(data["jitter_ms"]))
    if "rss_kb" in data:
        parts.append(f"{_number(data['rss_kb'], 2)} KB/{unit}")
    return ", ".join(parts) or "-"


def _ratios(entry: dict[str, Any]) -> str:
    ratios = entry.get("ratios") or {}
    names = {
        "cpu_us": "CPU",
        "events_per_s": "rate",
        "rss_kb": "RSS",
        "latency_ms_p99": "p99",
        "jitter_ms_p99": "jitter p99",
    }
    return ", ".join(f"{label} {ratios[key]:.2f}x" for key, label in names.items() if key in ratios) or "-"


def _verdict(entry: dict[str, Any]) -> str:
    if entry.get("skipped"):
        return f"skipped: {entry['skipped']}"
    if not entry.get("target"):
        return "(no target)"
    met = entry.get("target_met")
    return f"{'met' if met else 'MISSED'}: {entry['target']}"


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """One row per scenario: its name, each side's medians, the ratios and the target's verdict."""
    return [
        (entry["name"], _side(entry, "nexus"), _side(entry, "bare"), _ratios(entry), _verdict(entry))
        for entry in report["scenarios"]
    ]


def text_table(report: dict[str, Any]) -> str:
    """The results as a plain-text table (one block per scenario, to stay readable in a terminal)."""
    lines = [f"nexus bench — {report['date']}, {report['machine']['cpus']} CPUs, pairs {report['options']['pairs']}"]
    for entry, row in zip(report["scenarios"], rows(report), strict=True):
        lines.append("")
        lines.append(f"{row[0]}: {entry['title']}")
        lines.append(f"  Nexus  {row[1]}")
        lines.append(f"  bare   {row[2]}   ({entry['baseline']})")
        lines.append(f"  ratio  {row[3]}")
        lines.append(f"  target {row[4]}")
    return "\n".join(lines) + "\n"


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table, with the run's date and machine above it."""
    lines = [
        f"Results of the run on {report['date']} ({report['machine']['cpus']} CPUs, Python "
        f"{report['machine']['python']}, {report['options']['pairs']} interleaved pairs"
        f"{', quick sizes' if report['options']['quick'] else ''}):",
        "",
        "| scenario | Nexus (median) | bare library (median) | Nexus / bare | target |",
        "|---|---|---|---|---|",
    ]
    for entry, row in zip(report["scenarios"], rows(report), strict=True):
        cells = [f"`{row[0]}` {entry['title']}", row[1], f"{row[2]} ({entry['baseline']})", row[3], row[4]]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


class ChartUnavailable(ConfigurationError):
    """matplotlib is missing: the ``bench`` extra is not installed."""


def check_chart() -> None:
    """Raise :class:`ChartUnavailable` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ChartUnavailable(
            "--png needs matplotlib: install the bench extra (pip install 'nexus-bus[bench]')"
        ) from None


def write_chart(report: dict[str, Any], path: Path) -> None:
    """A PNG of the Nexus / bare ratios (CPU per event and rate) of every scenario that ran."""
    check_chart()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [e for e in report["scenarios"] if e.get("ratios")]
    names = [e["name"] for e in measured]
    series = (
        ("server CPU per item", ("cpu_us",)),
        ("events/s", ("events_per_s",)),
        ("RSS per item, or p99 latency / jitter", ("rss_kb", "latency_ms_p99", "jitter_ms_p99")),
    )
    figure, axis = plt.subplots(figsize=(10, 0.55 * max(len(names), 4) + 1.5))
    for index, (label, keys) in enumerate(series):
        values = [next((e["ratios"][k] for k in keys if e["ratios"].get(k)), float("nan")) for e in measured]
        axis.barh(
            [p + (index - 1) * 0.27 for p in range(len(names))], values, height=0.27, label=f"{label}, Nexus / bare"
        )
    axis.set_xscale("log")
    positions = range(len(names))
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_yticks(list(positions), names)
    axis.invert_yaxis()
    axis.set_xlabel("ratio to the bare library (1.0 = same)")
    axis.set_title(f"nexus bench, {report['date']}")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
