"""The ``nexus`` command against a real ``nexus serve`` process: emit, request, subscribe, handlers, logs, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

GUARD = 30.0
"""Seconds a command may take before the test fails (a guard, not a measurement)."""

HANDLER_MODULE = "nexus_cli_test_handlers"
HANDLER_SOURCE = textwrap.dedent(
    """
    import asyncio

    from nexus import Event, EventHandler, Stream, StreamingEventHandler


    class Echo(EventHandler):
        event_type = "clidemo:echo"

        async def handle(self, event: Event) -> dict:
            return {"echo": event.payload}


    class Countdown(StreamingEventHandler):
        event_type = "clidemo:stream_countdown"

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            for left in range(int(event.payload["n"]), 0, -1):
                await stream.send({"left": left})


    class Forever(StreamingEventHandler):
        event_type = "clidemo:stream_forever"

        async def handle_stream(self, event: Event, stream: Stream) -> None:
            await stream.send({"running": True})
            await asyncio.Event().wait()
    """
)


@dataclasses.dataclass
class Served:
    """A running ``nexus serve`` process."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    env: dict[str, str]
    ws_port: int

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines the server wrote to stderr so far (other lines left out)."""
        records = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cli_env(handler_dir: Path) -> dict[str, str]:
    """The environment without NEXUS_* settings, with ``handler_dir`` importable."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(handler_dir), env.get("PYTHONPATH", "")) if p)
    return env


def start_server(directory: Path, port: int | None = None, extra_env: dict[str, str] | None = None) -> Served:
    """Start ``nexus serve`` on ``port`` (default a free one) with the test handlers and wait until it accepts
    connections."""
    (directory / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
    # Its files in the test's directory, whatever the scope of the fixture that starts it.
    env = cli_env(directory) | {"XDG_DATA_HOME": str(directory / "data")} | (extra_env or {})
    port = port or free_port()
    ws_port = free_port()
    log_path = directory / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexus.cli",
                "serve",
                "--grpc-port",
                str(port),
                "--ws-port",
                str(ws_port),
                "--no-entry-points",
                "--handler",
                f"{HANDLER_MODULE}:Echo",
                "--handler",
                f"{HANDLER_MODULE}:Countdown",
                "--handler",
                f"{HANDLER_MODULE}:Forever",
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=directory,
        )
    served = Served(process, f"127.0.0.1:{port}", log_path, env, ws_port)
    deadline = time.monotonic() + GUARD
    while True:
        if process.poll() is not None:
            pytest.fail(f"nexus serve exited with {process.returncode}: {log_path.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return served
        if time.monotonic() > deadline:
            stop_server(served)
            pytest.fail(f"nexus serve did not open port {port}: {log_path.read_text()}")
        time.sleep(0.05)


def stop_server(served: Served) -> None:
    if served.process.poll() is None:
        served.process.terminate()
        try:
            served.process.wait(GUARD)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``nexus serve`` process shared by the client-command tests of this module."""
    server = start_server(tmp_path_factory.mktemp("cli"))
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def served_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A ``nexus serve`` process with authentication on; its ``env`` carries a token of the user ``alice``, so
    every command run with it acts as that one user (as one person at a terminal does)."""
    secret = {"NEXUS_JWT_SECRET": "s" * 40}
    server = start_server(tmp_path_factory.mktemp("cli-auth"), extra_env=secret)
    try:
        token = subprocess.run(
            [sys.executable, "-m", "nexus.cli", "token", "--sub", "alice", "--publish", "clidemo:>"],
            capture_output=True,
            text=True,
            check=True,
            env=server.env,
            timeout=GUARD,
        ).stdout.strip()
        server.env["NEXUS_TOKEN"] = token
        yield server
    finally:
        stop_server(server)


@contextlib.asynccontextmanager
async def cli(served: Served, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``nexus ARGS`` running with its stdout and stderr piped; killed if still running when the block ends."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nexus.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=served.env,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def finish(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """Wait (at most GUARD seconds) for ``process`` to end; its stdout and stderr."""
    async with asyncio.timeout(GUARD):
        return await process.communicate()


async def run_cli(served: Served, *args: str) -> Result:
    """Run ``nexus ARGS`` to completion."""
    async with cli(served, *args) as process:
        stdout, stderr = await finish(process)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


# --- client commands --------------------------------------------------------------------------------------------


async def test_emit_prints_the_stored_event(served: Served) -> None:
    """`nexus emit` prints the stored event as one JSON line with its offset, epoch and UTC time, and exits 0."""
    result = await run_cli(
        served,
        "emit",
        "clidemo:note:v1:written",
        "--server",
        served.address,
        "--payload",
        '{"text": "hi", "n": 2}',
        "--metadata",
        "user_id=u-1",
    )
    assert result.returncode == 0, result.stderr
    [event] = result.json_lines()
    assert event["event_type"] == "clidemo:note:v1:written"
    assert event["payload"] == {"text": "hi", "n": 2}
    # The user id is only the client's claim while authentication is off: the server says so.
    assert {k: v for k, v in event["metadata"].items() if k != "owner"} == {"user_id": "u-1", "auth": "none"}
    assert event["offset"] >= 1
    assert event["epoch"]
    assert event["timestamp"].endswith("Z")


async def test_request_prints_the_lifecycle(served: Served) -> None:
    """`nexus request` prints the request and its lifecycle as JSON lines and exits 0 on success."""
    result = await run_cli(
        served, "request", "clidemo:stream_countdown:v1:requested", "--server", served.address, "--payload", '{"n": 3}'
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.json_lines() if not line["event_type"].endswith(":heartbeat")]
    assert [line["event_type"].rsplit(":", 1)[1] for line in lines] == [
        "requested",
        "started",
        "stream",
        "stream",
        "stream",
        "success",
    ]
    assert [line["payload"] for line in lines[2:5]] == [{"left": 3}, {"left": 2}, {"left": 1}]
    assert lines[-1]["payload"]["stream_count"] == 3
    request_id = lines[0]["event_id"]
    assert all(line["metadata"]["correlation_id"] == request_id for line in lines[1:])

    plain = await run_cli(served, "request", "clidemo:echo:v1:requested", "--server", served.address, "--payload", "{}")
    assert plain.returncode == 0, plain.stderr
    assert plain.json_lines()[-1]["event_type"] == "clidemo:echo:v1:success"


async def test_request_that_fails_exits_1(served: Served) -> None:
    """`nexus request` for a type nobody handles prints the failed event and exits 1."""
    result = await run_cli(served, "request", "clidemo:nobody:v1:requested", "--server", served.address)
    assert result.returncode == 1
    last = result.json_lines()[-1]
    assert last["event_type"] == "clidemo:nobody:v1:failed"
    assert last["payload"]["error"]["type"] == "no_handler"


async def test_subscribe_prints_count_events_and_exits(served: Served) -> None:
    """`nexus subscribe PATTERN --count N` prints the next N matching events as JSON lines, then exits 0."""
    async with cli(served, "subscribe", "clidemo:sub:>", "--count", "2", "--server", served.address) as process:
        assert process.stderr is not None
        async with asyncio.timeout(GUARD):
            line = (await process.stderr.readline()).decode()
        assert line.startswith("nexus: subscribed "), line
        assert json.loads(line.removeprefix("nexus: subscribed "))["epoch"]

        first = await run_cli(served, "emit", "clidemo:sub:v1:one", "--server", served.address)
        await run_cli(served, "emit", "clidemo:other:v1:skipped", "--server", served.address)
        second = await run_cli(served, "emit", "clidemo:sub:v1:two", "--server", served.address)
        stdout, _ = await finish(process)
    assert process.returncode == 0
    events = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [e["event_id"] for e in events] == [first.json_lines()[0]["event_id"], second.json_lines()[0]["event_id"]]
    assert [e["event_type"] for e in events] == ["clidemo:sub:v1:one", "clidemo:sub:v1:two"]


async def test_handlers_lists_a_running_servers_handlers(served: Served) -> None:
    """`nexus handlers --server` prints each handler the server drives as a JSON line."""
    result = await run_cli(served, "handlers", "--server", served.address)
    assert result.returncode == 0, result.stderr
    listed = {item["event_type"]: item for item in result.json_lines()}
    assert set(listed) == {"clidemo:echo", "clidemo:stream_countdown", "clidemo:stream_forever"}
    assert listed["clidemo:echo"]["streaming"] is False
    assert listed["clidemo:stream_countdown"]["streaming"] is True
    assert listed["clidemo:echo"]["class_path"] == f"{HANDLER_MODULE}:Echo"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["--payload", "[1]"], 2, "--payload must be a JSON object", id="payload-array"),
        pytest.param(["--payload", "{nope"], 2, "--payload is not valid JSON", id="payload-garbage"),
        pytest.param(["--payload", '{"x": NaN}'], 2, "NaN", id="payload-nan"),
        pytest.param(["--metadata", "novalue"], 2, "KEY=VALUE", id="metadata"),
    ],
)
async def test_bad_emit_arguments_exit_with_a_message(served: Served, args: list[str], code: int, message: str) -> None:
    """`nexus emit` with a bad payload or metadata exits 2 and says what is wrong."""
    result = await run_cli(served, "emit", "clidemo:note:v1:written", "--server", served.address, *args)
    assert result.returncode == code
    assert message in result.stderr
    assert result.stdout == ""


async def test_emit_of_a_bad_event_type_reports_the_server_error(served: Served) -> None:
    """`nexus emit` of a malformed type exits 1 with the server's invalid_argument message."""
    result = await run_cli(served, "emit", "clidemo:note:1:written", "--server", served.address)
    assert result.returncode == 1
    assert "invalid_argument" in result.stderr
    assert "version '1'" in result.stderr


async def test_a_repeated_event_id_is_reported_as_duplicate_on_stderr(served_with_auth: Served) -> None:
    """`nexus emit` and `nexus request` with an `--event-id` the same user already stored print the stored original
    on stdout and say "duplicate" on stderr (exit 0); the first use says nothing of the kind."""
    emit = ["emit", "clidemo:note:v1:written", "--server", served_with_auth.address, "--event-id", "cli-dup-emit"]
    first = await run_cli(served_with_auth, *emit, "--payload", '{"n": 1}')
    again = await run_cli(served_with_auth, *emit, "--payload", '{"n": 2}')
    assert (first.returncode, again.returncode) == (0, 0), again.stderr
    assert "duplicate" not in first.stderr
    assert again.stderr.startswith("nexus: duplicate: event_id cli-dup-emit was already stored")
    assert again.json_lines() == first.json_lines()  # the original, payload {"n": 1} included

    server = ["--server", served_with_auth.address]
    request = ["request", "clidemo:echo:v1:requested", *server, "--event-id", "cli-dup-request"]
    first = await run_cli(served_with_auth, *request)
    again = await run_cli(served_with_auth, *request)
    assert (first.returncode, again.returncode) == (0, 0), again.stderr
    assert "duplicate" not in first.stderr
    assert "nexus: duplicate: event_id cli-dup-request was already stored" in again.stderr
    assert again.json_lines()[0] == first.json_lines()[0]


async def test_streams_cancel_and_a_cancelled_request_exit_codes(served_with_auth: Served) -> None:
    """`nexus streams` lists a live stream (and says on stderr when there is none); `nexus cancel` exits 0 when it
    cancelled the stream and 1 when there was nothing to cancel; the cancelled `nexus request` exits 1."""
    empty = await run_cli(served_with_auth, "streams", "--server", served_with_auth.address)
    assert (empty.returncode, empty.stdout) == (0, "")
    assert empty.stderr.strip() == "nexus: no live streams"

    forever = ["clidemo:stream_forever:v1:requested", "--event-id", "cli-forever", "--no-heartbeats"]
    async with cli(served_with_auth, "request", *forever, "--server", served_with_auth.address) as requester:
        assert requester.stdout is not None
        async with asyncio.timeout(GUARD):
            while b":stream" not in await requester.stdout.readline():
                pass
        live = await run_cli(served_with_auth, "streams", "--server", served_with_auth.address)
        assert live.returncode == 0
        assert [item["correlation_id"] for item in live.json_lines()] == ["cli-forever"]
        assert "no live streams" not in live.stderr

        cancel = await run_cli(served_with_auth, "cancel", "cli-forever", "--server", served_with_auth.address)
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.json_lines() == [{"correlation_id": "cli-forever", "cancelled": True}]
        rest, _ = await finish(requester)
    assert requester.returncode == 1
    assert json.loads(rest.decode().splitlines()[-1])["event_type"] == "clidemo:stream_forever:v1:cancelled"

    again = await run_cli(served_with_auth, "cancel", "cli-forever", "--server", served_with_auth.address)
    assert again.returncode == 1
    assert again.json_lines() == [{"correlation_id": "cli-forever", "cancelled": False}]


def test_serve_logs_its_own_data_directory_at_start_up(served: Served) -> None:
    """`nexus serve` without --data-dir keeps its files in a directory of its own, named after its gRPC port, and
    says so in its `server_started` log line."""
    deadline = time.monotonic() + GUARD
    while not (lines := [r for r in served.log_records() if r.get("event") == "server_started"]):
        assert time.monotonic() < deadline, served.log_path.read_text()
        time.sleep(0.05)
    [started] = lines
    port = served.address.rsplit(":", 1)[1]
    expected = Path(served.env["XDG_DATA_HOME"]) / "nexus" / f"node-{port}"
    assert started["data_dir"] == str(expected)


def test_help_and_readme_list_every_exit_code() -> None:
    """`nexus --help` ends with every exit code and its meaning, and the README shows the same table."""
    from nexus.cli import EXIT_CODES

    result = subprocess.run(
        [sys.executable, "-m", "nexus.cli", "--help"], capture_output=True, text=True, check=True, timeout=GUARD
    )
    epilog = result.stdout.split("exit codes:\n", 1)[1]
    assert [int(line.split()[0]) for line in epilog.splitlines() if line[2:3].isdigit()] == [c for c, _ in EXIT_CODES]
    assert "cancel found no such stream" in epilog
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = "\n".join(line.removeprefix("  ") for line in readme.split("- **Exit codes**", 1)[1].splitlines())
    assert "exit codes:\n" + epilog.rstrip("\n") + "\n```" in shown


# --- serve: logs and shutdown -----------------------------------------------------------------------------------


async def test_serve_logs_streams_as_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`nexus serve` logs each stream's start and end as JSON lines and exits 0 on SIGTERM."""
    server = start_server(tmp_path)
    try:
        result = await run_cli(
            server,
            "request",
            "clidemo:stream_countdown:v1:requested",
            "--server",
            server.address,
            "--payload",
            '{"n": 2}',
        )
        assert result.returncode == 0, result.stderr
        request_id = result.json_lines()[0]["event_id"]
        server.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(asyncio.to_thread(server.process.wait), GUARD)
    finally:
        stop_server(server)
    assert returncode == 0

    records = server.log_records()
    assert records, server.log_path.read_text()
    for record in records:
        assert {"event", "level", "timestamp"} <= set(record), record
    by_event = {str(record["event"]): record for record in records if record.get("correlation_id") == request_id}
    started = by_event["stream_started"]
    assert started["event_type"] == "clidemo:stream_countdown:v1:requested"
    ended = by_event["stream_ended"]
    assert ended["event_type"] == "clidemo:stream_countdown:v1:requested"
    assert ended["outcome"] == "success"
    assert ended["stream_count"] == 2
    assert ended["duration_s"] >= 0
    assert "server_stopped" in {record["event"] for record in records}


# --- subscribe: reconnection, stdout and stderr -----------------------------------------------------------------


@dataclasses.dataclass
class Background:
    """A ``nexus`` command running in the background, its stdout and stderr going to files."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        """Interrupt it as Ctrl-C would and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(GUARD)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_cli(directory: Path, env: dict[str, str], *args: str) -> Background:
    """Start ``nexus ARGS`` in the background."""
    stdout_path, stderr_path = directory / "cli.stdout", directory / "cli.stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus.cli", *args], stdout=stdout, stderr=stderr, env=env, cwd=directory
        )
    return Background(process, stdout_path, stderr_path)


def reconnect_records(stderr: str) -> list[dict[str, Any]]:
    """The ``subscription_reconnecting`` log records among stderr's lines."""
    records = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "subscription_reconnecting":
                records.append(record)
    return records


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_subscribe_against_a_closed_port_backs_off_and_writes_nothing_to_stdout(tmp_path: Path) -> None:
    """`nexus subscribe` against a closed port retries with growing waits (a handful of attempts in 4 s, not
    dozens), logs each retry on stderr, never claims it subscribed, and writes nothing to stdout."""
    env = cli_env(tmp_path)
    command = start_cli(tmp_path, env, "subscribe", ">", "--server", f"127.0.0.1:{free_port()}", "--log-format", "json")
    try:
        time.sleep(4.0)
    finally:
        command.stop()
    assert command.stdout() == ""
    stderr = command.stderr()
    assert "nexus: subscribed" not in stderr
    assert "Traceback" not in stderr
    records = reconnect_records(stderr)
    # 0.1 s doubling: attempts at about 0, 0.1, 0.3, 0.7, 1.5, 3.1 s; a reset backoff would make ~70.
    assert 3 <= len(records) <= 8, stderr
    assert [r["failures"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["code"] == "UNAVAILABLE" for r in records)
    delays = [float(r["delay_s"]) for r in records]
    assert all(later >= earlier * 1.5 for earlier, later in itertools.pairwise(delays)), delays
    every_line_on_stderr = [line for line in stderr.splitlines() if line.strip()]
    assert len(every_line_on_stderr) == len(records), stderr


def test_subscribe_says_subscribed_once_connected_and_prints_only_json_events(tmp_path: Path) -> None:
    """`nexus subscribe` started before its server prints `nexus: subscribed` only once the server answered,
    then each event as one JSON line on stdout, while its reconnection logs stay on stderr."""
    port = free_port()
    env = cli_env(tmp_path)
    command = start_cli(
        tmp_path,
        env,
        "subscribe",
        "clidemo:late:>",
        "--server",
        f"127.0.0.1:{port}",
        "--log-format",
        "json",
        "--reconnect-max-delay",
        "0.5",
    )
    server: Served | None = None
    try:
        wait_for(lambda: len(reconnect_records(command.stderr())) >= 2, "two reconnection attempts")
        assert "nexus: subscribed" not in command.stderr()
        server_dir = tmp_path / "server"
        server_dir.mkdir()
        server = start_server(server_dir, port)
        wait_for(lambda: "nexus: subscribed " in command.stderr(), "nexus: subscribed")
        asyncio.run(_emit_many(server.address, "clidemo:late:v1:done", 3))
        wait_for(lambda: len(command.stdout().splitlines()) >= 3, "three events on stdout")
    finally:
        command.stop()
        if server is not None:
            stop_server(server)
    events = [json.loads(line) for line in command.stdout().splitlines()]
    assert [e["event_type"] for e in events] == ["clidemo:late:v1:done"] * 3
    [subscribed] = [line for line in command.stderr().splitlines() if line.startswith("nexus: subscribed ")]
    assert json.loads(subscribed.removeprefix("nexus: subscribed "))["epoch"] == events[0]["epoch"]


async def _emit_many(address: str, event_type: str, count: int) -> list[int]:
    """Emit ``count`` events through the SDK; returns their offsets."""
    from nexus.client import NexusClient

    async with NexusClient(address) as client:
        return [(await client.emit(event_type, {"i": i})).offset for i in range(count)]


# --- serve: ports in use ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["grpc", "ws"])
async def test_serve_refuses_a_port_in_use_in_one_line(served: Served, tmp_path: Path, which: str) -> None:
    """A second `nexus serve` on the gRPC or WebSocket port of a running one exits 2 with one line naming the port
    and the option to change, no traceback; the first server keeps every client (consecutive offsets)."""
    grpc_port = served.address.rsplit(":", 1)[1] if which == "grpc" else "0"
    ws_port = str(served.ws_port) if which == "ws" else "0"
    result = await run_cli(
        served,
        "serve",
        "--grpc-port",
        grpc_port,
        "--ws-port",
        ws_port,
        "--no-entry-points",
        "--log-format",
        "json",
    )
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    port, option = (grpc_port, "--grpc-port") if which == "grpc" else (ws_port, "--ws-port")
    assert line.startswith("nexus: error: "), line
    assert f":{port} is already in use" in line
    assert option in line
    if which == "ws":
        assert "--no-gateway" in line

    offsets = await _emit_many(served.address, "clidemo:ports:v1:checked", 6)
    assert offsets == list(range(offsets[0], offsets[0] + 6))
