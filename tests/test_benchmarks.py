"""`nexus bench` stays runnable and its arithmetic is right: interleaving, medians, ratios, /proc readings,
and a quick run that writes JSON, Markdown and a PNG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nexus.bench.runner import summarize
from nexus.bench.stats import (
    cpu_seconds,
    interleaved,
    median,
    parse_stat_cpu,
    parse_status_rss,
    percentile,
    ratio,
    rss_bytes,
)
from nexus.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_runs_are_interleaved_and_neither_side_always_goes_first() -> None:
    """Each pair runs both sides; the side that starts alternates, so a warming machine favours no one."""
    assert interleaved(3) == ["nexus", "bare", "bare", "nexus", "nexus", "bare"]
    assert interleaved(4).count("nexus") == interleaved(4).count("bare") == 4
    with pytest.raises(ValueError, match="at least 1"):
        interleaved(0)


def test_medians_percentiles_and_ratios() -> None:
    """Medians skip runs that measured nothing, percentiles are nearest-rank, a zero baseline gives no ratio."""
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None
    assert percentile([float(v) for v in range(1, 1001)], 0.999) == 999.0
    assert percentile([float(v) for v in range(1, 101)], 0.5) == 50.0
    assert percentile([], 0.5) is None
    assert ratio(6.0, 2.0) == 3.0
    assert ratio(6.0, 0.0) is None
    assert ratio(None, 2.0) is None


def test_summary_is_the_ratio_of_the_medians() -> None:
    """A scenario's figures are each side's median, and the ratio is Nexus's median over the bare one."""
    samples: dict[str, list[dict[str, Any]]] = {
        "nexus": [
            {"cpu_us": 10.0, "latency_ms": {"p50": 1.0, "p99": 4.0, "p999": 9.0}},
            {"cpu_us": 30.0},
            {"cpu_us": 20.0},
        ],
        "bare": [
            {"cpu_us": 5.0, "latency_ms": {"p50": 0.5, "p99": 2.0, "p999": 3.0}},
            {"cpu_us": 5.0},
            {"cpu_us": 100.0},
        ],
    }
    summary = summarize(samples)
    assert summary["nexus"]["cpu_us"] == 20.0
    assert summary["bare"]["cpu_us"] == 5.0
    assert summary["ratios"]["cpu_us"] == 4.0
    assert summary["ratios"]["latency_ms_p99"] == 2.0
    assert "events_per_s" not in summary["ratios"]


def test_proc_stat_parsing_survives_odd_command_names() -> None:
    """utime and stime are found after the last ')' even when the command name holds spaces and parentheses."""
    fields = " ".join(["S", *["0"] * 10, "250", "50", *["0"] * 30])
    assert parse_stat_cpu(f"1234 (we (ird) name) {fields}", ticks_per_s=100) == 3.0


def test_cpu_read_from_proc_matches_the_process_own_clock() -> None:
    """The CPU read from /proc for a process agrees with what the process measured itself."""
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) == pytest.approx(time.process_time(), abs=0.05)


def test_rss_read_from_proc_grows_with_memory_in_use() -> None:
    """Touching 40 MB shows in the resident size read from /proc."""
    assert parse_status_rss("Name:\tx\nVmRSS:\t  2048 kB\n") == 2048 * 1024
    before = rss_bytes(os.getpid())
    block = b"x" * (40 * 1024 * 1024)
    assert rss_bytes(os.getpid()) - before >= 35 * 1024 * 1024
    del block


def test_quick_run_writes_json_markdown_and_a_chart(tmp_path: Path) -> None:
    """A quick run measures both sides of each chosen scenario, computes the ratios, says whether each target
    holds, skips the NATS scenario with the reason when no NATS answers, and writes JSON, Markdown and a PNG."""
    chosen = ["batched", "emit_sequential", "rss_history", "nats_stream"]
    out = {name: tmp_path / f"bench.{name}" for name in ("json", "png", "markdown")}
    result = subprocess.run(
        [sys.executable, "-m", "nexus.cli", "bench", "--quick", "--pairs", "1", "--only", ",".join(chosen)]
        + ["--nats", "nats://127.0.0.1:1"]
        + [arg for name, path in out.items() for arg in (f"--{name}", str(path))],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out["json"].read_text())
    entries = {entry["name"]: entry for entry in report["scenarios"]}
    assert list(entries) == chosen
    assert "no NATS at nats://127.0.0.1:1" in entries["nats_stream"]["skipped"]
    for name in ("batched", "emit_sequential"):
        entry = entries[name]
        assert not entry.get("skipped"), entry
        assert entry["ratios"]["cpu_us"] > 0
        assert entry["ratios"]["events_per_s"] > 0
        assert len(entry["samples"]["nexus"]) == len(entry["samples"]["bare"]) == 1
        assert isinstance(entry["target_met"], bool)
    assert entries["rss_history"]["ratios"]["rss_kb"] > 0
    assert out["png"].read_bytes().startswith(b"\x89PNG")
    assert out["png"].stat().st_size > 5_000
    markdown = out["markdown"].read_text()
    assert markdown.count("\n| `") == len(chosen)
    assert "batched: gRPC SubscribeEventBatches" in result.stdout


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt --only name is refused before anything starts, naming the scenarios there are."""
    assert main(["bench", "--only", "batchd"]) == 2
    error = capsys.readouterr().err
    assert "unknown scenario batchd" in error
    assert "known: batched," in error


def test_chart_without_matplotlib_names_the_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--png without matplotlib fails at once with the extra to install, before any scenario runs."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--only", "batched", "--png", "x.png"]) == 2
    assert "nexus-bus[bench]" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_interrupted_run_stops_every_process_it_started(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a scenario ends the command and every server and client process it started."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "nexus.cli", "bench", "--quick", "--only", "heartbeat_jitter"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _children(bench.pid)
        assert len(workers) >= 2, "the scenario never started its server and clients"
        bench.send_signal(signal.SIGINT)
        assert bench.wait(timeout=60) == 130
        time.sleep(0.5)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
        assert alive == []
    finally:
        bench.kill()
        bench.wait()


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2 :].split()[0]


def test_delivery_script_quick_run_reports_every_ratio() -> None:
    """`benchmarks/bench_delivery.py --quick` (in-process bus fan-out, metrics and tracing costs) runs to the end
    and reports each ratio as a positive number."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_delivery.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["bus_vs_queue_ratio"] > 0
    assert report["metrics_on_vs_off_ratio"] > 0
    assert report["tracing_events_cost_pct"] < 100
    assert report["events"] == 2_000
