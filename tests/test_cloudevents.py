"""Nexus events as CloudEvents 1.0 (docs/cloudevents.md): the mapping, checked against the JSON event format's
rules and read back by the CloudEvents SDK; ``partitionkey`` from ordering keys; ``nexus subscribe --format
cloudevents`` against a real server."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime
from typing import Any

from cloudevents.core.formats.json import JSONFormat

from nexus import Event, EventHandler
from nexus.client import CloudEventsView, to_cloudevent
from nexus.cloudevents import EXTENSION_NAME
from nexus.testing import run_server

CONTEXT_ATTRIBUTES = {"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject", "time"}
GUARD = 30.0
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def stored(event_type: str, payload: dict[str, Any], offset: int, **metadata: str) -> Event:
    return Event.create(event_type, payload, metadata=metadata).evolve(offset=offset, epoch="e-1")


def check_json_format(cloudevent: dict[str, Any]) -> None:
    """The rules of CloudEvents 1.0 and its JSON format that a producer must keep, checked one by one."""
    for name in ("specversion", "id", "source", "type"):
        assert isinstance(cloudevent.get(name), str), name
        assert cloudevent[name], name
    assert cloudevent["specversion"] == "1.0"
    for name, value in cloudevent.items():
        if name == "data":
            continue
        assert isinstance(value, str), (name, value)  # every attribute is a non-empty string here
        assert value, name
        if name not in CONTEXT_ATTRIBUTES:
            assert re.fullmatch(r"[a-z0-9]{1,20}", name), name  # extension names: lowercase alphanumeric, <= 20
            assert EXTENSION_NAME.fullmatch(name)
    assert "data_base64" not in cloudevent
    assert cloudevent["datacontenttype"] == "application/json"
    assert isinstance(cloudevent["data"], dict)
    time = datetime.fromisoformat(cloudevent["time"].replace("Z", "+00:00"))  # RFC 3339
    assert time.utcoffset() is not None


def read_back(cloudevent: dict[str, Any]) -> Any:
    """Parse the JSON text as a CloudEvents consumer does (the SDK validates attributes and extension names)."""
    return JSONFormat().read(None, json.dumps(cloudevent))


def test_a_stored_event_maps_to_every_attribute() -> None:
    """A stored request maps to id, source (its epoch), type, time, subject, data, the zero-padded offset as
    sequence and its traceparent; the SDK reads it back unchanged."""
    event = stored("pumps:monitor:v1:requested", {"pump": "p-7", "rpm": 1200}, 42, traceparent=TRACEPARENT)
    cloudevent = to_cloudevent(event)
    check_json_format(cloudevent)
    assert cloudevent == {
        "specversion": "1.0",
        "id": event.event_id,
        "source": "/nexus/e-1",
        "type": "pumps:monitor:v1:requested",
        "time": event.timestamp,
        "datacontenttype": "application/json",
        "subject": event.event_id,
        "sequence": "00000000000000000042",
        "traceparent": TRACEPARENT,
        "data": {"pump": "p-7", "rpm": 1200},
    }
    parsed = read_back(cloudevent)
    assert (parsed.get_id(), parsed.get_type(), parsed.get_source()) == (event.event_id, event.event_type, "/nexus/e-1")
    assert parsed.get_extension("sequence") == "00000000000000000042"
    assert parsed.get_time() == datetime.fromisoformat(event.timestamp.replace("Z", "+00:00"))
    assert parsed.get_data() == event.payload


def test_sequence_orders_as_text_as_offsets_do_and_heartbeats_have_none() -> None:
    """Sequences compare as strings the way offsets compare as numbers (up to the largest uint64); an event with
    offset 0 (a heartbeat, never stored) has no sequence, and a lifecycle event's subject is its request."""
    offsets = [1, 2, 9, 10, 99, 100, 12345, 2**53 + 1, 2**64 - 1]
    sequences = [to_cloudevent(stored("a:b:v1:done", {}, offset))["sequence"] for offset in offsets]
    assert sorted(sequences) == sequences
    assert all(len(sequence) == 20 for sequence in sequences)
    heartbeat = to_cloudevent(
        stored("a:stream_b:v1:heartbeat", {"stream_count": 1}, 0, correlation_id="req-1").evolve(epoch="")
    )
    check_json_format(heartbeat)
    assert "sequence" not in heartbeat
    assert heartbeat["subject"] == "req-1"
    assert heartbeat["source"] == "/nexus"
    plain = to_cloudevent(stored("a:b:v1:happened", {}, 3))
    assert "subject" not in plain
    read_back(heartbeat)


def test_the_view_gives_a_request_and_its_lifecycle_the_ordering_key_value_as_partitionkey() -> None:
    """With the handler's ordering key known, the request and each of its lifecycle events carry the key's value
    as partitionkey; other requests and events carry none; the view forgets a request at its terminal event."""
    view = CloudEventsView({"places:track_location": "agent_id", "flags:set:v2": "on"})
    request = stored("places:track_location:v1:requested", {"agent_id": "a-9", "lat": 1.0}, 5)
    success = stored("places:track_location:v1:success", {"state": "moving"}, 6, correlation_id=request.event_id)
    converted = [view.convert(request), view.convert(success)]
    assert [c["partitionkey"] for c in converted] == ["a-9", "a-9"]
    assert [c["subject"] for c in converted] == [request.event_id, request.event_id]
    for cloudevent in converted:
        check_json_format(cloudevent)
        assert read_back(cloudevent).get_extension("partitionkey") == "a-9"
    assert "partitionkey" not in view.convert(success)  # the request ended: forgotten
    assert "partitionkey" not in view.convert(stored("places:track_location:v1:requested", {"lat": 1.0}, 7))
    assert "partitionkey" not in view.convert(stored("other:thing:v1:requested", {"agent_id": "a-9"}, 8))
    assert view.convert(stored("flags:set:v2:requested", {"on": True}, 9))["partitionkey"] == "true"
    assert "partitionkey" not in view.convert(stored("flags:set:v1:requested", {"on": True}, 10))


def test_the_view_remembers_a_bounded_number_of_requests() -> None:
    """Past ``remember`` open requests, the oldest one's lifecycle events no longer get its partitionkey."""
    view = CloudEventsView({"a:b": "k"}, remember=2)
    requests = [stored("a:b:v1:requested", {"k": f"key-{i}"}, i + 1) for i in range(3)]
    for request in requests:
        view.convert(request)
    started = [stored("a:b:v1:started", {}, 10 + i, correlation_id=r.event_id) for i, r in enumerate(requests)]
    assert [view.convert(event).get("partitionkey") for event in started] == [None, "key-1", "key-2"]


class Track(EventHandler):
    event_type = "ce:track"
    ordering_key = "agent_id"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"seen": event.payload["agent_id"]}


async def test_subscribe_format_cloudevents_prints_one_valid_cloudevent_per_line() -> None:
    """`nexus subscribe --format cloudevents` prints each event as a CloudEvent JSON line that the SDK reads, with
    the handler's ordering-key value as partitionkey on the request and its result."""
    async with run_server(Track()) as nexus:
        process = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "nexus.cli", "subscribe", "ce:>", "--server", nexus.address],
            *["--count", "2", "--format", "cloudevents"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            async with asyncio.timeout(GUARD):
                while not (await process.stderr.readline()).startswith(b"nexus: subscribed"):
                    pass
                done = await nexus.client.call("ce:track:v1:requested", {"agent_id": "a-1"})
                stdout, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert done.state == "success"
    assert process.returncode == 0
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [line["type"] for line in lines] == ["ce:track:v1:requested", "ce:track:v1:success"]
    for line in lines:
        check_json_format(line)
        read_back(line)
    assert [line["partitionkey"] for line in lines] == ["a-1", "a-1"]
    assert lines[1]["data"] == {"seen": "a-1"}
    assert lines[1]["id"] == done.event_id
    assert lines[0]["sequence"] < lines[1]["sequence"]
    assert lines[0]["source"] == f"/nexus/{done.epoch}"
    assert datetime.fromisoformat(lines[1]["time"].replace("Z", "+00:00")) <= datetime.now(UTC)
