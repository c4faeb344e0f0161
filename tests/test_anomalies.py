"""The anomalies plugin end to end: score_log, stream_log (with --log-dir), set_baseline, monitor, stream_health."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from nexus.handlers.anomalies.plugin import Latest, Monitor, Reset, ScoreLog, SetBaseline, StreamHealth, StreamLog
from test_anomalies_logs import CYCLE, cycle_lines

from nexus import Event
from nexus.cli import SERVE_FIELDS, _overrides, build_parser
from nexus.config import ConfigError, load_settings
from nexus.plugins import HandlerSpec, config_for, discover
from nexus.testing import StreamFollower, TestServer, run_server

GUARD = 10.0


async def call(nexus: TestServer, action: str, payload: dict[str, Any]) -> Event:
    return await asyncio.wait_for(nexus.client.call(f"anomalies:{action}:v1:requested", payload), GUARD)


def follow(nexus: TestServer, action: str, payload: dict[str, Any]) -> StreamFollower:
    return StreamFollower(nexus.client.request(f"anomalies:{action}:v1:requested", payload, heartbeats=False))


def anomalies_spec(handler: Any, name: str) -> HandlerSpec:
    return HandlerSpec(f"anomalies.{name}", handler, "--handler")


# --- score_log --------------------------------------------------------------------------------------------


async def test_score_log_learns_then_flags_the_injected_line_and_raises_an_alert() -> None:
    """With warmup_lines 50, a cycle of normal lines is LEARNING then NONE; an unseen line is HIGH and alerts."""
    spec = anomalies_spec(ScoreLog(), "score_log")
    async with run_server(spec, handler_config={"anomalies": {"warmup_lines": 50}}) as nexus:
        alerts = await nexus.record("anomalies:alert:v1:raised")
        severities = []
        for line in cycle_lines(40):
            done = await call(nexus, "score_log", {"source": "api", "line": line})
            assert done.state == "success", done.payload
            severities.append(done.payload["severity"])
        assert severities == ["LEARNING"] * 50 + ["NONE"] * 150
        injected = "panic: out of memory allocating 4096 bytes in worker 7"
        done = await call(nexus, "score_log", {"source": "api", "line": injected})
        result = done.payload
        assert result["severity"] == "MED"  # a new template: MED for its first new_template_lines lines
        assert (result["seen"], len(result["sequence"])) == (1, 10)
        assert result["sequence"][5:] == result["sequence"][:5]  # the last two cycles of the normal lines
        assert result["template"] == "panic: out of memory allocating <NUM> bytes in worker <NUM>"
        assert (result["predicted"], result["rank"], result["new_template"], result["lines_seen"]) == (
            False,
            None,
            True,
            201,
        )
        assert result["score"] > result["thresholds"]["p99_9"]
        (alert,) = await alerts.wait_count(1)
        assert alert.payload == {
            "kind": "log",
            "source": "api",
            "score": result["score"],
            "severity": "MED",
            "template": result["template"],
            "template_id": result["template_id"],
            "line": injected,
        }
        assert alert.metadata["causation_id"] == done.correlation_id
        # The next normal line is not flagged, and another source is unaffected (still learning).
        after = await call(nexus, "score_log", {"source": "api", "line": cycle_lines(1)[0]})
        assert after.payload["severity"] in ("NONE", "LOW")
        other = await call(nexus, "score_log", {"source": "db", "line": injected})
        assert (other.payload["severity"], other.payload["lines_seen"]) == ("LEARNING", 1)
        await alerts.stop()


async def test_score_log_accepts_template_ids() -> None:
    """{source, template_id} scores a caller's own template symbols; an unexpected one alerts with line null."""
    spec = anomalies_spec(ScoreLog(), "score_log")
    async with run_server(spec, handler_config={"anomalies": {"warmup_lines": 30}}) as nexus:
        alerts = await nexus.record("anomalies:alert:v1:raised")
        for _ in range(15):
            for symbol in ("E5", "E22", "E11"):
                done = await call(nexus, "score_log", {"source": "hdfs", "template_id": symbol})
        assert done.payload["severity"] == "NONE"
        odd = await call(nexus, "score_log", {"source": "hdfs", "template_id": "E5"})  # E5 after E11 is normal
        assert odd.payload["severity"] == "NONE"
        odd = await call(nexus, "score_log", {"source": "hdfs", "template_id": "E11"})  # E11 after E5 never is
        assert (odd.payload["severity"], odd.payload["template"]) == ("HIGH", "E11")
        (alert,) = await alerts.wait_count(1)
        assert (alert.payload["line"], alert.payload["template_id"]) == (None, "E11")
        await alerts.stop()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"line": "x"}, "'source' is a required property"),
        ({"source": "api"}, "needs exactly one of line and template_id"),
        ({"source": "api", "line": "x", "template_id": "T1"}, "needs exactly one of line and template_id"),
        ({"source": "", "line": "x"}, "payload.source: '' should be non-empty"),
        ({"source": "api", "line": 42}, "payload.line: 42 is not of type 'string'"),
        ({"source": "api", "template_id": ""}, "payload.template_id: '' should be non-empty"),
    ],
)
async def test_score_log_bad_payloads_fail_and_sources_keep_their_state(payload: dict[str, Any], message: str) -> None:
    """A bad score_log request fails with invalid_payload and a clear message; the source's count goes on."""
    async with run_server(ScoreLog()) as nexus:
        await call(nexus, "score_log", {"source": "api", "line": "service started"})
        bad = await call(nexus, "score_log", payload)
        assert bad.state == "failed"
        assert bad.payload["error"]["type"] == "invalid_payload"
        assert message in bad.payload["error"]["message"]
        good = await call(nexus, "score_log", {"source": "api", "line": "service started"})
        assert good.payload["lines_seen"] == 2


# --- stream_log -------------------------------------------------------------------------------------------


async def test_stream_log_follows_a_file_across_rotation_and_truncation(tmp_path: Path) -> None:
    """Lines appended, rotated (rename + new file) and after copytruncate all stream once, in order, scored."""
    log = tmp_path / "svc" / "app.log"
    log.parent.mkdir()
    log.write_text("")
    settings = {"anomalies": {"poll_interval_s": 0.02}}
    spec = anomalies_spec(StreamLog(), "stream_log")
    async with run_server(spec, log_dir=str(tmp_path), handler_config=settings) as nexus:
        tail = follow(nexus, "stream_log", {"path": "svc/app.log", "from_start": True})
        await tail.started()
        with log.open("a") as file:
            file.write("worker 1 started\nworker 2 started\n")
        await tail.wait_for(lambda chunks: len(chunks) == 2)
        log.rename(tmp_path / "svc" / "app.log.1")
        log.write_text("worker 3 started\n")
        await tail.wait_for(lambda chunks: len(chunks) == 3)
        with log.open("r+") as file:
            file.truncate(0)
        with log.open("a") as file:
            file.write("w4 stopped\n")  # shorter than what was read: as with tail -F, that is what shows a truncation
        await tail.wait_for(lambda chunks: len(chunks) == 4)
        assert [c["line"] for c in tail.chunks] == [
            "worker 1 started",
            "worker 2 started",
            "worker 3 started",
            "w4 stopped",
        ]
        first = tail.chunks[0]
        assert (first["path"], first["source"], first["severity"], first["lines_seen"]) == (
            "svc/app.log",
            "svc/app.log",
            "LEARNING",
            1,
        )
        assert first["template"] == "worker <NUM> started"
        assert [c["template_id"] for c in tail.chunks[:3]] == [first["template_id"]] * 3
        assert await tail.stream.cancel()
        assert (await tail.ended()).state == "cancelled"


async def test_stream_log_scores_like_score_log_and_raises_alerts(tmp_path: Path) -> None:
    """After its warm-up a followed file's unseen line is HIGH and publishes an alert naming the file's source."""
    log = tmp_path / "app.log"
    log.write_text("\n".join(cycle_lines(30)) + "\n")
    settings = {"anomalies": {"warmup_lines": 50, "poll_interval_s": 0.02}}
    async with run_server(
        anomalies_spec(StreamLog(), "stream_log"), log_dir=str(tmp_path), handler_config=settings
    ) as nexus:
        alerts = await nexus.record("anomalies:alert:v1:raised")
        tail = follow(nexus, "stream_log", {"path": str(log), "from_start": True, "source": "payments"})
        await tail.wait_for(lambda chunks: len(chunks) == 150)
        with log.open("a") as file:
            file.write("fatal: ledger checksum mismatch on page 12\n")
        await tail.wait_for(lambda chunks: len(chunks) == 151)
        assert {c["severity"] for c in tail.chunks[50:150]} == {"NONE"}
        assert tail.chunks[-1]["severity"] == "MED"
        assert tail.chunks[-1]["sequence"] == [c["template_id"] for c in tail.chunks[-11:-1]]
        (alert,) = await alerts.wait_count(1)
        assert (alert.payload["source"], alert.payload["line"]) == (
            "payments",
            "fatal: ledger checksum mismatch on page 12",
        )
        await tail.cancel()
        await alerts.stop()


async def test_stream_log_refuses_paths_outside_the_log_directory(tmp_path: Path) -> None:
    """'..', absolute paths elsewhere, links out, missing files and directories end failed with the reason."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "secret.txt").write_text("password\n")
    (logs / "escape.log").symlink_to(tmp_path / "secret.txt")
    async with run_server(StreamLog(), log_dir=str(logs)) as nexus:
        for path, message in (
            ("../secret.txt", "is outside the log directory"),
            (str(tmp_path / "secret.txt"), "is outside the log directory"),
            ("escape.log", "is outside the log directory"),
            ("missing.log", "no such file in the log directory"),
        ):
            ended = await follow(nexus, "stream_log", {"path": path}).ended()
            assert ended.state == "failed"
            assert ended.payload["error"]["type"] == "invalid_payload"
            assert message in ended.payload["error"]["message"], ended.payload
        bad = await follow(nexus, "stream_log", {}).ended()
        assert "'path' is a required property" in bad.payload["error"]["message"]


async def test_stream_log_is_off_without_a_log_directory() -> None:
    """With no --log-dir, stream_log fails with a message that says how to turn it on."""
    async with run_server(StreamLog()) as nexus:
        ended = await follow(nexus, "stream_log", {"path": "app.log"}).ended()
        assert ended.payload["error"]["type"] == "handler_error"
        assert "no log directory is configured (nexus serve --log-dir DIR" in ended.payload["error"]["message"]


def test_log_dir_is_a_setting_that_reaches_the_plugins_config(tmp_path: Path) -> None:
    """--log-dir, NEXUS_LOG_DIR or the file set log_dir; plugins get it as ctx.config['log_dir'] unless they set one."""
    args = build_parser().parse_args(["serve", "--log-dir", str(tmp_path)])
    settings = load_settings(None, {}, _overrides(args, SERVE_FIELDS))
    assert settings.log_dir == str(tmp_path)
    assert load_settings(None, {"NEXUS_LOG_DIR": str(tmp_path)}, {}).log_dir == str(tmp_path)
    config_file = tmp_path / "nexus.toml"
    config_file.write_text(f'[nexus]\nlog_dir = "{tmp_path}"\n')
    assert load_settings(config_file, {}, {}).log_dir == str(tmp_path)
    with pytest.raises(ConfigError, match=r"log_dir \(from flag --log-dir\): must be an existing directory"):
        load_settings(None, {}, {"log_dir": str(tmp_path / "missing")})
    defaults = settings.plugin_defaults()
    assert defaults == {"log_dir": str(tmp_path), "data_dir": str(settings.data_path())}
    assert config_for("anomalies.stream_log", {}, defaults)["log_dir"] == str(tmp_path)
    own = {"anomalies": {"log_dir": "/srv/logs", "stream_log": {"poll_interval_s": 1}}}
    assert config_for("anomalies.stream_log", own, defaults) == {
        "log_dir": "/srv/logs",
        "data_dir": str(settings.data_path()),
        "poll_interval_s": 1,
    }
    assert "log_dir" not in load_settings(None, {}, {}).plugin_defaults()


async def test_a_log_dir_that_does_not_exist_stops_the_server_from_starting(tmp_path: Path) -> None:
    """A [handlers.anomalies] log_dir that is not a directory is refused at start-up, naming the handler."""
    spec = anomalies_spec(StreamLog(), "stream_log")
    with pytest.raises(ValueError, match=r"anomalies\.stream_log: anomalies setting 'log_dir' must be an existing"):
        async with run_server(spec, handler_config={"anomalies": {"log_dir": str(tmp_path / "nope")}}):
            pass


# --- baselines --------------------------------------------------------------------------------------------

SQUARE = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]  # mean (1, 1), sample covariance (4/3) I
SMALL_BASELINES = {"min_excess_points": 2, "threshold": "asymptotic"}  # SQUARE's d + 2 points, the chi2 threshold


def baseline_handlers() -> list[HandlerSpec]:
    """The baseline handlers, taking baselines of d + 2 points with the chi-square threshold."""
    handlers = (SetBaseline(), Monitor(), StreamHealth())
    return [anomalies_spec(h, n) for h, n in zip(handlers, ("set_baseline", "monitor", "stream_health"), strict=True)]


async def test_monitor_measures_mahalanobis_distance_and_alerts_past_the_threshold() -> None:
    """Against the unit square's corners, (3, 1) is sqrt(3) away (normal) and (5, 1) sqrt(12) (an anomaly, alerted)."""
    async with run_server(*baseline_handlers(), handler_config={"anomalies": SMALL_BASELINES}) as nexus:
        alerts = await nexus.record("anomalies:alert:v1:raised")
        done = await call(nexus, "set_baseline", {"baseline_id": "pump", "points": SQUARE})
        assert done.payload == {
            "baseline_id": "pump",
            "dimension": 2,
            "count": 4,
            "mean": [1, 1],
            "threshold": pytest.approx(3.0349, abs=5e-5),
            "threshold_method": "asymptotic",
            "confidence": 0.99,
            "regularised": False,
        }
        # Sent right after set_baseline's success: the monitor waits until it has seen the baseline.
        near = await call(nexus, "monitor", {"baseline_id": "pump", "point": [3, 1]})
        assert near.payload["distance"] == pytest.approx(math.sqrt(3))  # d^2 = 2^2 * 3/4
        assert near.payload["is_anomaly"] is False
        far = await call(nexus, "monitor", {"baseline_id": "pump", "point": [5, 1]})
        assert far.payload == {
            "baseline_id": "pump",
            "distance": pytest.approx(math.sqrt(12)),  # d^2 = 4^2 * 3/4
            "threshold": pytest.approx(3.0349, abs=5e-5),
            "is_anomaly": True,
            "point": [5, 1],
        }
        (alert,) = await alerts.wait_count(1)
        assert alert.payload == {
            "kind": "baseline",
            "baseline_id": "pump",
            "distance": far.payload["distance"],
            "threshold": far.payload["threshold"],
            "point": [5, 1],
        }
        strict = await call(nexus, "set_baseline", {"baseline_id": "pump", "points": SQUARE, "confidence": 0.999})
        assert strict.payload["threshold"] == pytest.approx(math.sqrt(-2 * math.log(0.001)))
        again = await call(nexus, "monitor", {"baseline_id": "pump", "point": [5, 1]})
        assert again.payload["is_anomaly"] is False  # sqrt(12) = 3.46 < 3.72
        await alerts.stop()


@pytest.mark.parametrize(
    ("action", "payload", "message"),
    [
        ("monitor", {"baseline_id": "nope", "point": [1, 1]}, "unknown baseline 'nope': set it first"),
        ("monitor", {"baseline_id": "pump", "point": [1, 1, 1]}, "point has 3 coordinates but baseline 'pump' has"),
        ("monitor", {"baseline_id": "pump", "point": ["1", 1]}, "payload.point[0]: '1' is not of type 'number'"),
        ("monitor", {"baseline_id": "pump"}, "anomalies:monitor needs exactly one of point and points"),
        ("set_baseline", {"baseline_id": "b", "points": [[1, 2], [3, 4], [5, 6]]}, "needs at least 4 points"),
        ("set_baseline", {"baseline_id": "b", "points": [[1, 2], [3], [5, 6], [7, 8]]}, "points[1] has 1 coordinates"),
        ("set_baseline", {"baseline_id": "b", "points": [[1], [2]]}, "a 1-dimensional baseline needs at least 3"),
        ("set_baseline", {"baseline_id": "b", "points": [[], [], []]}, "[] should be non-empty"),
        ("set_baseline", {"baseline_id": "b", "points": SQUARE, "confidence": 1.5}, "payload.confidence: 1.5"),
        ("set_baseline", {"points": SQUARE}, "'baseline_id' is a required property"),
    ],
)
async def test_baseline_bad_payloads_fail_and_existing_baselines_keep_working(
    action: str, payload: dict[str, Any], message: str
) -> None:
    """Unknown baselines, wrong dimensions, too few points and bad types fail clearly; 'pump' still answers."""
    async with run_server(*baseline_handlers(), handler_config={"anomalies": SMALL_BASELINES}) as nexus:
        await call(nexus, "set_baseline", {"baseline_id": "pump", "points": SQUARE})
        bad = await call(nexus, action, payload)
        assert bad.state == "failed"
        assert bad.payload["error"]["type"] == "invalid_payload"
        assert message in bad.payload["error"]["message"], bad.payload["error"]["message"]
        ok = await call(nexus, "monitor", {"baseline_id": "pump", "point": [1, 1]})
        assert ok.payload["distance"] == 0.0


async def test_stream_health_streams_the_rolling_anomaly_percentage_and_label() -> None:
    """With a window of 20: 1 anomaly in 20 is 5 % deteriorating, 3 is 15 % failing, a reset starts over healthy."""
    config = {"anomalies": {**SMALL_BASELINES, "health_window": 20}}
    async with run_server(*baseline_handlers(), handler_config=config) as nexus:
        await call(nexus, "set_baseline", {"baseline_id": "pump", "points": SQUARE})
        health = follow(nexus, "stream_health", {"baseline_id": "pump"})
        await health.wait_for(lambda chunks: len(chunks) == 1)
        assert health.chunks[0] == {
            "baseline_id": "pump",
            "anomaly_pct": 0.0,
            "health": "healthy",
            "anomalies": 0,
            "samples": 0,
            "window": 20,
        }

        async def monitor(point: list[float], samples: int, anomalies: int) -> None:
            await call(nexus, "monitor", {"baseline_id": "pump", "point": point})
            await health.wait_for(
                lambda chunks: (chunks[-1]["samples"], chunks[-1]["anomalies"]) == (samples, anomalies)
            )

        for i in range(19):
            await monitor([1, 1], i + 1, 0)
        assert health.chunks[-1]["health"] == "healthy"
        await monitor([9, 9], 20, 1)
        assert (health.chunks[-1]["anomaly_pct"], health.chunks[-1]["health"]) == (5.0, "deteriorating")
        await monitor([9, -9], 20, 2)
        await monitor([-9, 9], 20, 3)
        assert health.chunks[-1] == {
            **health.chunks[0],
            "anomaly_pct": 15.0,
            "health": "failing",
            "anomalies": 3,
            "samples": 20,
        }
        for chunk in health.chunks:
            assert chunk["anomaly_pct"] == pytest.approx(100 * chunk["anomalies"] / max(chunk["samples"], 1))
        await call(nexus, "set_baseline", {"baseline_id": "pump", "points": SQUARE})
        await health.wait_for(lambda chunks: chunks[-1]["samples"] == 0)
        assert health.chunks[-1]["health"] == "healthy"
        unknown = await follow(nexus, "stream_health", {"baseline_id": "nope"}).ended()
        assert unknown.payload["error"] == {
            "type": "invalid_payload",
            "message": "unknown baseline 'nope': set it first with anomalies:set_baseline",
        }
        assert (await health.cancel()).state == "cancelled"


def test_every_anomalies_handler_registers_through_entry_points() -> None:
    """The seven anomalies handlers are found as entry points named anomalies.<handler>."""
    found = {spec.name: type(spec.handler) for spec in discover(True, (), ())}
    assert {name: cls for name, cls in found.items() if name.startswith("anomalies.")} == {
        "anomalies.score_log": ScoreLog,
        "anomalies.stream_log": StreamLog,
        "anomalies.set_baseline": SetBaseline,
        "anomalies.monitor": Monitor,
        "anomalies.stream_health": StreamHealth,
        "anomalies.latest": Latest,
        "anomalies.reset": Reset,
    }


def test_the_cycle_used_here_has_five_templates() -> None:
    """The normal traffic of these tests mines into exactly one template per line of CYCLE."""
    from nexus.handlers.anomalies.templates import Drain

    drain = Drain()
    for line in cycle_lines(3):
        drain.add(line)
    assert len(drain) == len(CYCLE) == 5
