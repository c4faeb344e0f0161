"""The bytes the server sends for an event, and the opt-in JSON payload encoding (``payload_json``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import fuzz_strategies
import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus import Event, EventHandler
from nexus.client import NexusClient
from nexus.errors import InvalidPayload, NexusError
from nexus.events import timestamp_of_ns
from nexus.grpc.convert import (
    PROTOBUF_MAX_PAYLOAD_DEPTH,
    EncodeCache,
    Unsendable,
    encode_response,
    event_from_response,
    event_to_response,
    timestamp_to_proto,
)
from nexus.testing import run_server
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

GUARD = 10.0
"""Seconds any awaited condition may take before the test fails (a guard, not a measurement)."""


def _valid_event(event_type: str, event_id: str, metadata: dict[str, str], payload: Any) -> Event | None:
    try:
        return Event.create(event_type, payload, event_id=event_id or None, metadata=metadata)
    except NexusError:
        return None


TIMESTAMPS = st.one_of(
    st.integers(0, 2**62).map(timestamp_of_ns),
    st.integers(-(2**61), 0).map(lambda ns: timestamp_of_ns(ns)),
    st.sampled_from(["", "2026-11-27T07:19:24Z", "2026-11-27T09:19:24.5+02:00", "1969-12-31T23:59:59.999999Z"]),
)


@given(
    event_type=fuzz_strategies.event_types(),
    event_id=fuzz_strategies.event_ids(),
    metadata=fuzz_strategies.metadata(),
    payload=fuzz_strategies.payloads(),
    timestamp=TIMESTAMPS,
    offset=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 300)),
    epoch=st.sampled_from(["", "0123456789abcdef", "é"]),
    message=st.sampled_from(["", "stored", "duplicate"]),
    json_payload=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_hand_assembled_responses_parse_to_the_protobuf_message(
    event_type: str,
    event_id: str,
    metadata: dict[str, str],
    payload: Any,
    timestamp: str,
    offset: int,
    epoch: str,
    message: str,
    json_payload: bool,
) -> None:
    """For any valid event, the bytes the server writes parse to exactly the ``EventResponse`` the protobuf API
    builds (type, id, payload as Struct or JSON, metadata, offset, epoch, timestamp, message)."""
    created = _valid_event(event_type, event_id, metadata, payload)
    if created is None:
        return
    event = created.evolve(timestamp=timestamp).stored(offset, epoch)
    try:
        expected = event_to_response(event, message=message, json_payload=json_payload)
        expected.SerializeToString()
    except Exception:  # a payload protobuf cannot carry (too deep, a number past a double): refused here too
        with pytest.raises(Unsendable, match=r"nests deeper|too large"):
            encode_response(event, message=message, json_payload=json_payload)
        return
    if not json_payload and max_depth(event.payload) > PROTOBUF_MAX_PAYLOAD_DEPTH:
        with pytest.raises(Unsendable, match="nests deeper"):
            encode_response(event, message=message, json_payload=json_payload)
        return
    data = encode_response(event, message=message, json_payload=json_payload)
    assert nexus_pb2.EventResponse.FromString(data) == expected
    assert event_from_response(nexus_pb2.EventResponse.FromString(data)) == event_from_response(expected)


def max_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((max_depth(item) for item in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((max_depth(item) for item in value), default=0)
    return 0


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-27T07:19:24.123456Z",
        "2026-11-27T07:19:24.000000Z",
        "1970-01-01T00:00:00.000000Z",
        "1969-12-31T23:59:59.500000Z",
        "2026-11-27T09:19:24.123456+02:00",
        "2026-11-27T07:19:24Z",
        "2026-11-27T07:19:24.1Z",
    ],
)
def test_timestamps_read_the_same_with_the_cached_second(text: str) -> None:
    """A timestamp becomes the same protobuf Timestamp as protobuf's own RFC 3339 parser gives, read twice
    (once parsing the second, once from the cache)."""
    from google.protobuf import timestamp_pb2

    reference = timestamp_pb2.Timestamp()
    reference.FromJsonString(text)
    assert timestamp_to_proto(text) == reference
    assert timestamp_to_proto(text) == reference
    event = Event.create("t:s:v1:x", {}).evolve(timestamp=text)
    parsed = nexus_pb2.EventResponse.FromString(encode_response(event))
    assert parsed.timestamp == reference
    parsed = nexus_pb2.EventResponse.FromString(encode_response(event))
    assert parsed.timestamp == reference


def test_a_batch_is_the_events_in_order_and_skips_what_no_client_could_read() -> None:
    """A batch parses to its events in order, in either encoding; an event nested deeper than protobuf clients
    read is left out of Struct batches (and counted once) but still goes as JSON."""
    events = [Event.create("t:s:v1:x", {"i": i, "f": 0.5}).stored(i + 1, "e") for i in range(3)]
    deep = Event.create("t:s:v1:x", fuzz_strategies.nested({"x": 1}, 32)).stored(4, "e")
    deeper = Event(deep.event_type, {"n": {"n": deep.payload}}, deep.event_id, offset=5, epoch="e")  # 34 levels
    for json_payload in (False, True):
        cache = EncodeCache(json_payload=json_payload)
        batch = nexus_pb2.SubscribeEventBatchesResponse.FromString(cache.encode_batch([*events, deep, deeper]))
        got = [event_from_response(item) for item in batch.events]
        expected = [*events, deep] if not json_payload else [*events, deep, deeper]
        assert [(e.offset, e.payload) for e in got] == [(e.offset, e.payload) for e in expected]
        assert all(bool(item.payload_json) == json_payload for item in batch.events)
        assert cache.skipped == (0 if json_payload else 1)


# --- end to end ---------------------------------------------------------------------------------------------------


class Echo(EventHandler):
    event_type = "enc:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


PAYLOADS: list[dict[str, Any]] = [
    {},
    {"n": 3, "f": 2.5, "whole": 10.0, "neg": -0.0, "big": 2**53 - 1, "t": True, "z": None},
    {"text": 'é\u2028"\\\n\U0001f600', "list": [1, [2, {"a": []}], "x"], "o": {"p": {"q": {}}}},
    {"s": "x" * 5000},
]


async def test_both_encodings_give_a_user_the_same_events() -> None:
    """Events published and received with JSON payloads read exactly as with Struct payloads: emit replies,
    client-streamed publishes, subscriptions and a request's lifecycle."""
    async with run_server(Echo()) as nexus:
        struct_client = nexus.client
        json_client = NexusClient(nexus.address, payload_encoding="json")
        try:
            by_struct = await nexus.record("enc:>")
            by_json_sub = json_client.subscribe("enc:>")
            seen_json: list[Event] = []

            async def collect() -> None:
                async for event in by_json_sub:
                    seen_json.append(event)

            reader = asyncio.create_task(collect())
            try:
                await wait_until(lambda: by_json_sub.connects > 0)
                replies: list[Event] = []
                for index, payload in enumerate(PAYLOADS):
                    client = json_client if index % 2 else struct_client
                    replies.append(await client.emit("enc:thing:v1:made", payload, metadata={"k": "v"}))
                    # The same event_id again, on the same connection, with the payload in the other encoding.
                    repeat = _request(event_id=replies[-1].event_id, metadata={"k": "v"})
                    if index % 2:
                        repeat.payload.CopyFrom(fuzz_strategies.to_struct(payload))
                    else:
                        repeat.payload_json = json.dumps(payload).encode()
                    reply = await nexus_pb2_grpc.NexusServiceStub(client.channel).EmitEvent(repeat)
                    assert reply.message == "duplicate"
                    assert bool(reply.payload_json) == (not index % 2)
                    again = event_from_response(reply)
                    assert again == replies[-1]  # the duplicate's reply, in the other encoding
                summary = await json_client.publish_many(
                    [Event.create("enc:thing:v1:made", payload) for payload in PAYLOADS]
                )
                assert summary.stored == len(PAYLOADS)
                by_struct_request = await struct_client.call("enc:echo:v1:requested", PAYLOADS[1])
                by_json_request = await json_client.call("enc:echo:v1:requested", PAYLOADS[1])
                assert by_json_request.payload == by_struct_request.payload == {"echo": PAYLOADS[1]}
                total = 2 * len(PAYLOADS) + 4
                struct_seen = await by_struct.wait_count(total, timeout=GUARD)
                await wait_until(lambda: len(seen_json) >= total)
            finally:
                by_json_sub.close()
                reader.cancel()
            assert seen_json == struct_seen[:total]
            assert [e.payload for e in replies] == PAYLOADS
            for a, b in zip(seen_json, struct_seen, strict=True):
                assert {k: type(v) for k, v in a.payload.items()} == {k: type(v) for k, v in b.payload.items()}
            assert [e.payload for e in seen_json[: len(PAYLOADS)]] == PAYLOADS
            # Past 2**53 a Struct's double rounds; JSON keeps the integer.
            exact = await json_client.emit("enc:thing:v1:made", {"n": 2**60 + 1})
            assert exact.payload == {"n": 2**60 + 1}
        finally:
            await json_client.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds (at most :data:`GUARD` seconds)."""
    async with asyncio.timeout(GUARD):
        while not condition():  # noqa: ASYNC110 - a condition on another task's progress, polled
            await asyncio.sleep(0.01)


def _request(**fields: Any) -> nexus_pb2.EventRequest:
    return nexus_pb2.EventRequest(**{"event_type": "enc:thing:v1:made", **fields})


DEEP = b'{"a":' * 40 + b"1" + b"}" * 40


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"payload_json": b"{not json"}, "payload_json is not JSON: Expecting property name"),
        ({"payload_json": b"[1, 2]"}, "payload must be a JSON object, not an array"),
        ({"payload_json": b'"text"'}, "payload must be a JSON object, not a string"),
        ({"payload_json": b"null"}, "payload must be a JSON object, not null"),
        ({"payload_json": DEEP}, "nests deeper than 32 levels"),
        ({"payload_json": b"[" * 100_000 + b"]" * 100_000}, "payload"),
        ({"payload_json": b'{"x": NaN}'}, "NaN and Infinity are not valid JSON"),
        ({"payload_json": b'{"x": -Infinity}'}, "NaN and Infinity are not valid JSON"),
        ({"payload_json": b'{"x": 1e999}'}, "too large for a JSON number"),
        ({"payload_json": b'{"x": ' + b"9" * 400 + b"}"}, "integer too large for a JSON number"),
        ({"payload_json": b'{"x": "\xff\xfe"}'}, "payload_json is not valid UTF-8 (byte 7)"),
        ({"payload_json": b'{"x": "\\ud800"}'}, "lone surrogate"),
        ({"payload_json": b'{"s": "' + b"x" * 1_000_001 + b'"}'}, "payload is 1000009 bytes, over the limit"),
        ({"payload_json": b'{"a": 1}', "payload": fuzz_strategies.to_struct({"a": 1})}, "payload or payload_json"),
    ],
)
async def test_hostile_payload_json_is_refused_with_a_clear_message(
    request_fields: dict[str, Any], message: str
) -> None:
    """A ``payload_json`` that is not UTF-8 JSON of one object within the limits (or that comes with a Struct
    payload too) ends the call with INVALID_ARGUMENT (RESOURCE_EXHAUSTED when too large, as for a Struct payload)
    naming the problem; the server keeps serving."""
    async with run_server() as nexus:
        stub = nexus_pb2_grpc.NexusServiceStub(nexus.client.channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.EmitEvent(_request(**request_fields))
        # Too large is RESOURCE_EXHAUSTED, as for a Struct payload; the rest is INVALID_ARGUMENT.
        too_large = "over the limit" in message
        expected = grpc.StatusCode.RESOURCE_EXHAUSTED if too_large else grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.code() == expected
        assert message in (raised.value.details() or "")
        reply = await stub.EmitEvent(_request(payload_json=b' { "ok" : [1, 2.0] } '))
        assert reply.payload_json == b'{"ok":[1,2]}'
        assert not reply.HasField("payload")


async def test_an_unknown_payload_encoding_is_refused() -> None:
    """A subscribe or request naming a payload encoding that does not exist ends with INVALID_ARGUMENT."""
    async with run_server() as nexus:
        stub = nexus_pb2_grpc.NexusServiceStub(nexus.client.channel)
        calls = [
            stub.SubscribeEventBatches(
                nexus_pb2.SubscribeEventBatchesRequest(
                    event_types=[">"], payload_encoding=nexus_pb2.PayloadEncoding.ValueType(7)
                )
            ),
            stub.SubscribeEvents(
                nexus_pb2.SubscribeRequest(event_types=[">"], payload_encoding=nexus_pb2.PayloadEncoding.ValueType(3))
            ),
            stub.RequestEvent(
                nexus_pb2.RequestEventRequest(
                    event=_request(event_type="enc:x:v1:requested"),
                    payload_encoding=nexus_pb2.PayloadEncoding.ValueType(9),
                )
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in call:
                    pass
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a PayloadEncoding" in (raised.value.details() or "")


@given(payload=fuzz_strategies.payloads(), max_depth=st.integers(0, 40))
@settings(max_examples=300, deadline=None)
def test_struct_payloads_read_as_the_path_naming_conversion_reads_them(payload: Any, max_depth: int) -> None:
    """Any Struct payload converts to the same object as the conversion that names paths gives, or is refused
    with the same message (NaN, Infinity, too deep)."""
    from nexus.grpc.convert import _from_struct, struct_to_payload

    if not isinstance(payload, dict):
        return
    try:
        struct = fuzz_strategies.to_struct(payload)
    except Exception:  # not representable in a Struct at all (a number past a double): nothing to convert
        return

    def outcome(convert: Callable[[], Any]) -> Any:
        try:
            return ("ok", convert())
        except InvalidPayload as exc:
            return ("refused", exc.message)

    expected = outcome(lambda: _from_struct(struct, "", 1, max_depth))
    got = outcome(lambda: struct_to_payload(struct, max_depth))
    assert got == expected
    if got[0] == "ok":
        assert {k: type(v) for k, v in got[1].items()} == {k: type(v) for k, v in expected[1].items()}
