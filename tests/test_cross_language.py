"""A client in another language, built from ``protos/`` alone, emits events and subscribes with patterns.

``tests/node/client.mjs`` loads ``protos/nexus/v1/nexus.proto`` with ``@grpc/proto-loader`` and talks to a
server started here; it prints one JSON line per result, which this test checks, next to what a Python client
subscribed to the same server saw.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
from ci_support import skip_or_fail

from nexus.testing import run_server

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "node" / "client.mjs"
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")
# Far above what the script needs; it gives up by itself after 20 s. Only guards against a stuck process.
PROCESS_LIMIT_S = 60.0

# What the script emits, in order (kept in step with tests/node/client.mjs).
PING = {"n": 1}
OTHER = {"n": 2}
PONG = {"n": 3, "half": 0.5, "text": "héllo", "ok": True, "none": None, "list": [1, "two"], "nested": {"k": "v"}}
EMITTED = [
    ("demo:ping:v1:happened", PING),
    ("other:ping:v1:happened", OTHER),
    ("demo:pong:v1:happened", PONG),
]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node is not installed: the cross-language client needs Node.js")
    for package in NODE_PACKAGES:
        if not (REPO / "node_modules" / package / "package.json").is_file():
            skip_or_fail(f"{package} is missing from node_modules: run 'npm ci' in {REPO}")
    return node


async def _run_node(node: str, address: str) -> tuple[int, str, str]:
    """Run the Node client against ``address`` without blocking this event loop (the server runs on it)."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        address,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), PROCESS_LIMIT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _by_kind(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["kind"] == kind]


async def test_node_client_emits_and_subscribes_with_patterns() -> None:
    """The Node client's pattern subscription gets exactly its two events, in order, with payloads intact."""
    node = _node()
    async with run_server() as nexus:
        watcher = await nexus.record("demo:>", "other:>")
        code, stdout, stderr = await _run_node(node, nexus.address)
        assert code == 0, f"the Node client exited {code}:\n{stderr}\n{stdout}"
        lines: list[dict[str, Any]] = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        seen_by_python = await watcher.wait_count(len(EMITTED))
        await watcher.stop()
        epoch = nexus.bus.epoch

    # The subscription was live (initial metadata) before anything was emitted.
    [metadata] = _by_kind(lines, "metadata")
    assert metadata["epoch"] == epoch
    head_offset = metadata["head_offset"]

    # Every emit was stored, in order, with increasing offsets in the server's epoch.
    emitted = _by_kind(lines, "emitted")
    assert [(line["event_type"], line["payload"]) for line in emitted] == EMITTED
    assert all(line["success"] is True and line["message"] == "stored" for line in emitted)
    assert all(line["epoch"] == epoch for line in emitted)
    offsets = [line["offset"] for line in emitted]
    assert head_offset < offsets[0] < offsets[1] < offsets[2]

    # The pattern 'demo:*:v1:*' delivered the two demo events and not the other one, in offset order,
    # each exactly as it was stored.
    received = _by_kind(lines, "received")
    assert [line["event_type"] for line in received] == ["demo:ping:v1:happened", "demo:pong:v1:happened"]
    assert [line["payload"] for line in received] == [PING, PONG]
    assert [line["offset"] for line in received] == [offsets[0], offsets[2]]
    assert [line["event_id"] for line in received] == [emitted[0]["event_id"], emitted[2]["event_id"]]
    # As sent, plus what the server says of the sender: anonymous (auth none), its connection the owner.
    assert all(line["epoch"] == epoch for line in received)
    assert all(line["metadata"]["client"] == "node" and line["metadata"]["auth"] == "none" for line in received)

    # A Python client reads what the Node client sent as the same JSON (whole numbers as ints).
    assert [(event.event_type, event.payload) for event in seen_by_python] == list(EMITTED)
    assert [event.offset for event in seen_by_python] == offsets
    assert isinstance(seen_by_python[0].payload["n"], int)

    # Malformed event types were refused with INVALID_ARGUMENT and a message naming what is wrong.
    errors = {line["event_type"]: line for line in _by_kind(lines, "error")}
    assert sorted(errors) == ["Demo:ping:v1:happened", "Demo:x"]
    assert all(line["code"] == INVALID_ARGUMENT for line in errors.values())
    assert "'Demo:x'" in errors["Demo:x"]["details"]
    assert "4 ':'-separated tokens" in errors["Demo:x"]["details"]
    assert "service 'Demo'" in errors["Demo:ping:v1:happened"]["details"]
