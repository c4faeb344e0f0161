"""Regression tests for bugs the fuzz suite (tests/test_fuzz.py) found, one per fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats_support import delete_stream, nats_bus_of, nats_settings, shared_nats_url, unique_names
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from nexus import Event, EventHandler
from nexus.errors import NexusError
from nexus.events import DEFAULT_LIMITS, DERIVED_METADATA_ENTRIES, EventType, check_event, derived_event_limits, quote
from nexus.patterns import parse_pattern
from nexus.testing import run_server
from nexus.v1 import nexus_pb2


def test_a_quote_of_escaped_characters_stays_short() -> None:
    """`quote` bounds the escaped text, not the raw one: 100 NUL characters used to become a 400-character repr,
    and error messages quoting them grew past 500 characters."""
    for char in ("\x00", "\ud800", "\U0010ffff", "\n", "x"):
        quoted = quote(char * 300)
        assert len(quoted) <= 100 + 2 + len("... (300 characters)"), quoted
        assert quoted.endswith("... (300 characters)")
    assert quote("\x00\x01") == repr("\x00\x01")


@pytest.mark.parametrize(
    "text",
    [
        "\x00" * 2000,
        "a:b:v1:" + "\x00" * 2000,
        "v01:z_b_zza:" + "x" * 1800,
        "v7:x_1:" + "\U0001f600" * 2000,
    ],
)
def test_parse_errors_quote_a_little_of_the_input(text: str) -> None:
    """Event types and patterns with long bad tokens are refused with a message of at most 300 characters (the
    type is quoted to 60 characters, the bad token to 40)."""
    for parse in (EventType.parse, parse_pattern):
        with pytest.raises(NexusError) as caught:
            parse(text)
        assert 0 < len(caught.value.message) <= 300, caught.value.message


async def test_a_cancel_of_a_long_unknown_correlation_id_gets_a_short_error_frame() -> None:
    """A WebSocket cancel for a correlation_id of 5,000 characters is answered not_found with a short message and
    ref, instead of repeating the whole id (twice) in the error frame."""
    async with (
        run_server(gateway=True) as server,
        connect(server.ws_url, subprotocols=[Subprotocol("nexus.v1")]) as ws,
    ):
        assert json.loads(await ws.recv())["type"] == "connection"
        for correlation_id in ("é" * 5000, "\x00" * 5000):
            await ws.send(json.dumps({"type": "cancel", "correlation_id": correlation_id}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10.0))
            assert error["type"] == "error", error
            assert error["code"] == "not_found", error
            assert len(error["message"]) <= 300, error["message"]
            assert len(error["ref"]) <= 256


class Echo(EventHandler):
    event_type = "fix:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"ok": True}


def test_stored_lifecycle_events_of_a_request_at_the_limits_are_read_back() -> None:
    """A lifecycle event carries its request's metadata plus correlation_id: one entry (and ~300 bytes) more than
    a request the edge accepted. check_event (what the NATS tail reads) leaves that room to events carrying a
    correlation_id, and only to them."""
    metadata = {f"k{i}": "v" * 16_000 for i in range(64)}
    base = Event.create("fix:echo:v1:requested", event_id="i" * 256, metadata=metadata).size()
    metadata["k0"] += "v" * (DEFAULT_LIMITS.max_event_bytes - base - 10)
    request = Event.create("fix:echo:v1:requested", event_id="i" * 256, metadata=metadata)
    assert DEFAULT_LIMITS.max_event_bytes - 20 < request.size() <= DEFAULT_LIMITS.max_event_bytes
    metadata = {**request.metadata, "correlation_id": request.event_id}
    lifecycle = Event("fix:echo:v1:success", {"ok": True}, metadata=metadata)
    assert lifecycle.size() > DEFAULT_LIMITS.max_event_bytes
    assert check_event(lifecycle) is lifecycle
    assert derived_event_limits(DEFAULT_LIMITS).max_metadata_entries == 64 + DERIVED_METADATA_ENTRIES
    foreign = Event("fix:echo:v1:success", {"ok": True}, metadata={f"k{i}": "v" for i in range(65)})
    with pytest.raises(NexusError, match="65 entries"):
        check_event(foreign)  # written by another tool: no entry of a node's, the client limits hold
    extra = {f"x{i}": "v" for i in range(DERIVED_METADATA_ENTRIES)}
    with pytest.raises(NexusError):
        check_event(Event("fix:echo:v1:success", metadata={**metadata, **extra}))


async def test_a_request_with_64_metadata_entries_completes_on_nats() -> None:
    """On the NATS bus, a request carrying the most metadata entries allowed (64) used to hang: its lifecycle
    events (64 entries plus the node's owner, auth, correlation_id and traceparent) were stored, then quarantined
    by the node's own tail."""
    url = shared_nats_url()
    stream, prefix = unique_names("fix")
    try:
        async with run_server(Echo(), settings=nats_settings(url, stream, prefix)) as server:
            request = nexus_pb2.RequestEventRequest(
                event=nexus_pb2.EventRequest(
                    event_type="fix:echo:v1:requested", metadata={f"k{i}": "v" for i in range(64)}
                )
            )
            call = server.client.stub.RequestEvent(request)
            async with asyncio.timeout(10.0):
                replies = [reply.event async for reply in call]
            assert [reply.event_type for reply in replies] == ["fix:echo:v1:requested", "fix:echo:v1:success"]
            # owner, auth (anonymous), correlation_id, and traceparent (the handler run's span)
            assert len(replies[-1].metadata) == 64 + 4
            assert nats_bus_of(server).stats().quarantined == 0
    finally:
        await delete_stream(url, stream)
