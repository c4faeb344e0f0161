"""Logging: JSON lines or console text on stderr, for structlog and standard-library records alike."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import structlog

from nexus.logs import configure_logging


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_bound_keys(capsys: pytest.CaptureFixture[str]) -> None:
    """The json format writes one parseable object per line with timestamp, level, logger, event and bound keys."""
    configure_logging("json", "info")
    log = structlog.get_logger("nexus.test").bind(event_type="demo:stream_x:v1:requested", correlation_id="c-1")

    log.info("stream_started", stream_count=0)

    [line] = json_lines(capsys.readouterr().err)
    assert line["event"] == "stream_started"
    assert line["level"] == "info"
    assert line["logger"] == "nexus.test"
    assert line["event_type"] == "demo:stream_x:v1:requested"
    assert line["correlation_id"] == "c-1"
    assert line["stream_count"] == 0
    assert line["timestamp"].endswith("Z")
    assert "T" in line["timestamp"]


def test_stdlib_records_use_the_same_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Records from standard-library loggers such as grpc are rendered as the same JSON lines."""
    configure_logging("json", "info")

    logging.getLogger("grpc._server").warning("port %d busy", 50051)

    [line] = json_lines(capsys.readouterr().err)
    assert line["event"] == "port 50051 busy"
    assert line["level"] == "warning"
    assert line["logger"] == "grpc._server"
    assert line["timestamp"].endswith("Z")


def test_json_exceptions_are_structured(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception logged in json format becomes structured frames, without local variables, from either API."""
    configure_logging("json", "info")
    try:
        raise ValueError("broken handler")
    except ValueError:
        structlog.get_logger("nexus.test").exception("handler_crashed")
        logging.getLogger("asyncio").exception("task failed")

    lines = json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["handler_crashed", "task failed"]
    for line in lines:
        assert line["level"] == "error"
        [frame_group] = line["exception"]
        assert frame_group["exc_type"] == "ValueError"
        assert frame_group["exc_value"] == "broken handler"
        assert frame_group["frames"]
        assert all("locals" not in frame for frame in frame_group["frames"])


def test_console_format_renders_text(capsys: pytest.CaptureFixture[str]) -> None:
    """The console format writes readable text with the event and bound keys, not JSON."""
    configure_logging("console", "info")

    structlog.get_logger("nexus.test").bind(correlation_id="c-2").info("stream_ended")
    logging.getLogger("grpc").warning("from grpc")

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "stream_ended" in lines[0]
    assert "correlation_id=c-2" in lines[0]
    assert "from grpc" in lines[1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_auto_is_json_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """The auto format picks JSON when stderr is not a TTY (as under capture)."""
    configure_logging("auto", "info")

    structlog.get_logger("nexus.test").info("hello")

    assert json_lines(capsys.readouterr().err)[0]["event"] == "hello"


def test_configuring_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    """Calling configure_logging again replaces the configuration instead of duplicating output."""
    configure_logging("console", "info")
    configure_logging("json", "info")

    structlog.get_logger("nexus.test").info("once")
    logging.getLogger("grpc").info("also once")

    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["once", "also once"]


def test_level_filters_both_apis(capsys: pytest.CaptureFixture[str]) -> None:
    """Records below the configured level are dropped, from structlog and the standard library alike."""
    configure_logging("json", "warning")

    structlog.get_logger("nexus.test").info("dropped")
    logging.getLogger("grpc").info("dropped too")
    structlog.get_logger("nexus.test").warning("kept")

    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["kept"]


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "loud")])
def test_unknown_format_or_level_is_refused(fmt: str, level: str) -> None:
    """An unknown format or level raises ValueError naming the choices."""
    with pytest.raises(ValueError, match="must be one of"):
        configure_logging(fmt, level)
