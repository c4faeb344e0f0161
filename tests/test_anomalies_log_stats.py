"""stream_log's statistics event, timed by a clock the test moves (no sleeping for the interval)."""

from __future__ import annotations

from pathlib import Path

from nexus.handlers.anomalies.plugin import StreamLog
from test_anomalies import anomalies_spec, follow
from test_anomalies_logs import cycle_lines

from nexus.testing import run_server


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_stream_log_publishes_its_statistics_every_stats_interval_s(tmp_path: Path) -> None:
    """Nothing before stats_interval_s has passed; then lines, alerts, errors and lines/s of the followed file."""
    log = tmp_path / "app.log"
    log.write_text("\n".join(cycle_lines(30)) + "\n")
    handler = StreamLog()
    settings = {"anomalies": {"warmup_lines": 50, "poll_interval_s": 0.02, "stats_interval_s": 30}}
    spec = anomalies_spec(handler, "stream_log")
    async with run_server(spec, log_dir=str(tmp_path), handler_config=settings) as nexus:
        handler.clock = clock = Clock(500.0)
        stats = await nexus.record("anomalies:log_stats:v1:reported")
        tail = follow(nexus, "stream_log", {"path": "app.log", "from_start": True, "source": "payments"})
        await tail.wait_for(lambda chunks: len(chunks) == 150)
        with log.open("a") as file:
            file.write("fatal: ledger checksum mismatch on page 12\n")
        await tail.wait_for(lambda chunks: len(chunks) == 151)
        clock.now = 529.0
        with log.open("a") as file:
            file.write("\n".join(cycle_lines(1, seed=8)) + "\n")
        await tail.wait_for(lambda chunks: len(chunks) == 156)
        assert stats.events == []
        clock.now = 530.0
        (report,) = await stats.wait_count(1)
        assert report.payload == {
            "path": "app.log",
            "source": "payments",
            "lines": 156,
            "alerts": 1,
            "errors": 0,
            "lines_per_s": 156 / 30,
            "interval_s": 30.0,
            "uptime_s": 30.0,
        }
        clock.now = 590.0
        (_, second) = await stats.wait_count(2)
        assert (second.payload["lines"], second.payload["lines_per_s"], second.payload["uptime_s"]) == (156, 0.0, 90.0)
        await tail.cancel()
        await stats.stop()
