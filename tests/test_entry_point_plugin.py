"""A plugin installed as its own distribution is found through the ``nexus.handlers`` entry points by ``nexus
serve`` and ``nexus handlers``, and its handlers are driven through every way a request can end.

The example plugin (``tests/plugin_pkg``) is really installed with pip, into a directory of its own, and a real
``nexus serve`` runs in a subprocess with that directory on ``PYTHONPATH``: nothing is registered by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nexus.client import NexusClient
from nexus.events import Event

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = REPO / "tests" / "plugin_pkg"
DISTRIBUTION = "nexus-demo-plugin"
SOURCE = f"entry point {DISTRIBUTION}"

# Entry-point name -> (event type, streaming, class path).
EXPECTED_HANDLERS: dict[str, tuple[str, bool, str]] = {
    "demo_echo": ("demo:echo", False, "nexus_demo_plugin.handlers:Echo"),
    "demo_stream_count": ("demo:stream_count", True, "nexus_demo_plugin.handlers:StreamCount"),
    "demo_stream_fail": ("demo:stream_fail", True, "nexus_demo_plugin.handlers:StreamFail"),
    "demo_stream_hang": ("demo:stream_hang", True, "nexus_demo_plugin.handlers:StreamHang"),
    "demo_stream_wait": ("demo:stream_wait", True, "nexus_demo_plugin.handlers:StreamWait"),
}
# The handlers that set stream_timeout themselves (None: until cancelled); the others get the server's.
EXPLICIT_TIMEOUTS: dict[str, float | None] = {"demo_stream_hang": 0.5, "demo_stream_wait": None}
RELEASED = "demo:stream_wait:v1:released"
STARTUP_LIMIT_S = 60.0
SHUTDOWN_LIMIT_S = 15.0


@dataclass(frozen=True)
class PluginServer:
    """A ``nexus serve`` subprocess that loaded the installed plugin."""

    address: str
    site_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _env_with(site_dir: Path) -> dict[str, str]:
    """This environment with the plugin's directory on PYTHONPATH and no NEXUS_* settings leaking in."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    previous = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(site_dir) + (os.pathsep + previous if previous else "")
    return env


def _install_plugin(tmp: Path) -> Path:
    """pip-install the example plugin into a directory of its own (the venv is left untouched)."""
    source = tmp / "src"
    # Built from a copy, so the build leaves nothing in the repository.
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site_dir = tmp / "site"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
        str(site_dir),
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"installing the plugin failed:\n{result.stdout}\n{result.stderr}"
    assert (site_dir / "nexus_demo_plugin" / "handlers.py").is_file()
    return site_dir


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Return once the port accepts connections; fail with the server's log if it exits or never listens."""
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"nexus serve exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"nexus serve did not listen on {port}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=SHUTDOWN_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginServer]:
    """Install the example plugin for real and run ``nexus serve`` with entry points loaded."""
    tmp = tmp_path_factory.mktemp("entry_point_plugin")
    site_dir = _install_plugin(tmp)
    env = _env_with(site_dir)
    port = _free_port()
    log_path = tmp / "server.log"
    command = [
        sys.executable,
        "-m",
        "nexus.cli",
        "serve",
        "--grpc-port",
        str(port),
        "--no-gateway",
        "--host",
        "127.0.0.1",
        "--heartbeat-interval",
        "0.1",
        "--log-format",
        "json",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_listening(process, port, log_path)
        yield PluginServer(f"127.0.0.1:{port}", site_dir, env, process, log_path)
    finally:
        _stop(process)


def _cli(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    """Run ``nexus ARGS`` and return its JSON lines; fail with its output if it exits non-zero."""
    result = subprocess.run(
        [sys.executable, "-m", "nexus.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"nexus {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _ours(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The listed handlers that belong to the demo plugin, by name (built-in plugins may be listed too)."""
    return {str(item["name"]): item for item in items if str(item["class_path"]).startswith("nexus_demo_plugin.")}


def _check_listing(items: list[dict[str, Any]]) -> None:
    ours = _ours(items)
    assert sorted(ours) == sorted(EXPECTED_HANDLERS)
    for name, (event_type, streaming, class_path) in EXPECTED_HANDLERS.items():
        item = ours[name]
        assert item["event_type"] == event_type, name
        assert item["streaming"] is streaming, name
        assert item["class_path"] == class_path, name
    for name, timeout_s in EXPLICIT_TIMEOUTS.items():
        assert ours[name]["stream_timeout_s"] == timeout_s, name


async def _lifecycle(client: NexusClient, event_type: str, payload: dict[str, Any]) -> tuple[Event, list[Event]]:
    """Send a request; return the stored request and its lifecycle without heartbeats, terminal last."""
    stream = client.request(event_type, payload, heartbeats=False)
    events = [event async for event in stream]
    assert stream.request is not None
    return stream.request, events


def _check_correlated(request: Event, events: list[Event]) -> None:
    assert all(event.metadata.get("correlation_id") == request.event_id for event in events)
    offsets = [request.offset] + [event.offset for event in events]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(offsets)


async def test_server_lists_the_plugin_handlers(plugin_server: PluginServer) -> None:
    """ListHandlers on the server shows every handler of the plugin under its entry-point name."""
    async with NexusClient(plugin_server.address) as client:
        _check_listing(await client.handlers())


def test_cli_lists_handlers_of_a_running_server(plugin_server: PluginServer) -> None:
    """``nexus handlers --server`` prints the running server's plugin handlers as JSON lines."""
    _check_listing(_cli(plugin_server.env, "handlers", "--server", plugin_server.address))


def test_cli_lists_installed_handlers_with_their_source(plugin_server: PluginServer) -> None:
    """``nexus handlers`` without a server finds the installed entry points and names their distribution."""
    items = _cli(plugin_server.env, "handlers")
    _check_listing(items)
    for item in _ours(items).values():
        assert item["source"] == SOURCE


def test_cli_without_the_plugin_on_the_path_does_not_list_it(plugin_server: PluginServer) -> None:
    """The plugin's handlers come from the installed distribution only: without it on the path they are gone."""
    env = dict(plugin_server.env)
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in env["PYTHONPATH"].split(os.pathsep) if part != str(plugin_server.site_dir)
    )
    assert _ours(_cli(env, "handlers")) == {}


async def test_streaming_handler_runs_to_success(plugin_server: PluginServer) -> None:
    """demo:stream_count goes started, n stream chunks in order, then success counting them."""
    async with NexusClient(plugin_server.address) as client:
        request, events = await _lifecycle(client, "demo:stream_count:v1:requested", {"n": 5})
    assert [event.state for event in events] == ["started"] + ["stream"] * 5 + ["success"]
    assert [event.payload for event in events[1:-1]] == [{"i": i} for i in range(5)]
    assert events[-1].payload["stream_count"] == 5
    assert all(event.event_type.startswith("demo:stream_count:v1:") for event in events)
    _check_correlated(request, events)


async def test_raising_handler_ends_with_failed(plugin_server: PluginServer) -> None:
    """demo:stream_fail sends one chunk, then its ValueError ends the stream with failed and the message."""
    async with NexusClient(plugin_server.address) as client:
        request, events = await _lifecycle(client, "demo:stream_fail:v1:requested", {})
    assert [event.state for event in events] == ["started", "stream", "failed"]
    assert events[1].payload == {"step": 1}
    error = events[-1].payload["error"]
    assert error["type"] == "handler_error"
    assert "boom" in error["message"]
    assert "ValueError" in error["message"]
    assert events[-1].payload["stream_count"] == 1
    _check_correlated(request, events)


async def test_hanging_handler_ends_with_timeout(plugin_server: PluginServer) -> None:
    """demo:stream_hang never returns, so its stream ends with timeout naming its 0.5 s stream_timeout."""
    async with NexusClient(plugin_server.address) as client:
        request, events = await _lifecycle(client, "demo:stream_hang:v1:requested", {})
        assert await client.streams() == []
    assert [event.state for event in events] == ["started", "timeout"]
    assert events[-1].payload["timeout_s"] == 0.5
    assert events[-1].payload["stream_count"] == 0
    _check_correlated(request, events)


async def test_cancelled_stream_ends_and_its_task_is_gone(plugin_server: PluginServer) -> None:
    """A requester's cancel ends a waiting stream with cancelled, its task unwinds and the server moves on."""
    async with NexusClient(plugin_server.address) as client:
        stream = client.request("demo:stream_wait:v1:requested", {"who": "test"}, heartbeats=False)
        events: list[Event] = []
        async for event in stream:
            events.append(event)
            if event.state == "started":
                listed = await client.streams()
                assert [item["correlation_id"] for item in listed] == [stream.correlation_id]
                assert listed[0]["handler"] == "demo_stream_wait"
                assert await client.cancel(stream.correlation_id, "the test is done") is True
        assert [event.state for event in events] == ["started", "cancelled"]
        assert events[-1].payload["reason"] == "the test is done"
        assert stream.request is not None

        # The handler's task is gone: its finally block ran (the note it published on the way out is stored
        # before 'cancelled'), the server lists no stream, and it still answers.
        released = client.subscribe(
            RELEASED, since_offset=stream.request.offset, epoch=stream.request.epoch, reconnect=False
        )
        notes: list[Event] = []
        async for note in released:
            notes.append(note)
            released.close()
            break
        assert released.recovered is True
        note = notes[0]
        assert note.offset < events[-1].offset
        assert note.payload == {"correlation_id": stream.correlation_id}
        assert note.metadata.get("causation_id") == stream.correlation_id
        assert await client.streams() == []
        assert await client.cancel(stream.correlation_id) is False
        echo = await client.call("demo:echo:v1:requested", {"after": "cancel"})
    assert echo.state == "success"
    assert echo.payload == {"echo": {"after": "cancel"}}


async def test_plain_handler_from_the_plugin_answers(plugin_server: PluginServer) -> None:
    """demo:echo, a plain EventHandler of the same package, answers with success and the echoed payload."""
    async with NexusClient(plugin_server.address) as client:
        request, events = await _lifecycle(client, "demo:echo:v1:requested", {"x": [1, "two"]})
    assert [event.state for event in events] == ["success"]
    assert events[0].payload == {"echo": {"x": [1, "two"]}}
    _check_correlated(request, events)
