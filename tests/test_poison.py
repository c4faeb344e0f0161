"""The poison acceptance of issue 9, on the memory bus and on NATS, against a real ``nexus serve`` with its
default limits.

Lone surrogates in each field of a WebSocket publish (type, event_id, metadata keys and values, payload keys and
strings), payloads nested 33 to 10,000 levels, a 5,000-digit version, 3.9 MB of metadata, 100,000 patterns (a gRPC
subscribe and a WebSocket subscribe frame) and random protobuf bytes each get a clear error; subscribers on gRPC,
WebSocket and SSE matching '>' keep receiving every later event; SIGTERM ends the server within 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuzz_harness import GUARD, MAX_MESSAGE, SERVICE, Served, Target, finish, target_server, ws_client
from fuzz_strategies import deep_struct, field
from nexus.gateway.protocol import CloseCode
from websockets.exceptions import ConnectionClosed

from nexus.v1 import nexus_pb2, nexus_pb2_grpc

DEPTHS = [33, 34, 49, 50, 100, 101, 400, 950, 1_000, 5_000, 10_000]
NINES = "9" * 5_000


def nested_json(depth: int) -> str:
    """A payload object nesting ``depth`` objects (the payload itself is level 1), as JSON text."""
    return '{"n":' * (depth - 1) + "{}" + "}" * (depth - 1)


def publish(event_type: str = '"poison:x:v1:sent"', **fields: str) -> str:
    """A publish frame as JSON text; the type and ``fields`` are JSON text (so they may hold ``\\ud800``)."""
    parts = [f'"type":{event_type}']
    parts += [f'"{name}":{value}' for name, value in fields.items()]
    return "{" + ",".join(parts) + "}"


def letters(number: int) -> str:
    """``number`` in base 26 with the letters a to z: a short, distinct service name."""
    text = ""
    while True:
        number, digit = divmod(number, 26)
        text = chr(97 + digit) + text
        if not number:
            return text


SHORT_PATTERNS = [f"{letters(i)}:>" for i in range(100_000)]
"""100,000 distinct patterns that fit one 1 MiB frame."""

WS_POISON: list[tuple[str, str, set[str]]] = [
    ("a lone surrogate in the type", publish('"poison:x:v1:\\ud800"'), {"invalid_event_type"}),
    ("a lone surrogate in event_id", publish(event_id='"\\ud800"'), {"invalid_payload"}),
    ("a lone surrogate in a metadata key", publish(metadata='{"\\udc00":"v"}'), {"invalid_payload"}),
    ("a lone surrogate in a metadata value", publish(metadata='{"k":"\\ud800"}'), {"invalid_payload"}),
    ("a lone surrogate in a payload key", publish(payload='{"\\udfff":1}'), {"invalid_payload"}),
    ("a lone surrogate in a payload string", publish(payload='{"s":["ok","\\ud83d"]}'), {"invalid_payload"}),
    ("a 5,000-digit version", publish(f'"poison:x:v{NINES}:sent"'), {"invalid_event_type"}),
    ("a version over 31 bits", publish('"poison:x:v99999999999999999999999:sent"'), {"invalid_event_type"}),
    *[
        (f"a payload {depth} levels deep", publish(payload=nested_json(depth)), {"invalid_payload", "invalid_json"})
        for depth in DEPTHS
    ],
    (
        "100,000 patterns in one subscribe frame",
        json.dumps({"type": "subscribe", "event_types": SHORT_PATTERNS}, separators=(",", ":")),
        {"invalid_frame", "resource_exhausted"},
    ),
    ("a 5,000-digit number", publish(payload='{"n":' + NINES + "}"), {"invalid_json"}),
]


async def ws_poison(port: int) -> list[str]:
    """Each poison frame on one connection gets its error frame (in order); the socket stays open."""
    problems = []
    async with ws_client(port) as ws:
        assert json.loads(await ws.recv())["type"] == "connection"
        for what, frame, codes in WS_POISON:
            await ws.send(frame)
            await ws.send(json.dumps({"type": "ping", "ref": what}))
            answers = []
            async with asyncio.timeout(GUARD):
                while True:
                    answer = json.loads(await ws.recv())
                    if answer.get("type") == "pong" and answer.get("ref") == what:
                        break
                    if answer.get("type") in ("error", "published", "subscribed"):
                        answers.append(answer)
            if len(answers) != 1 or answers[0].get("code") not in codes:
                problems.append(f"{what}: {str(answers)[:300]}, wanted one of {codes}")
            elif not 0 < len(answers[0]["message"]) <= MAX_MESSAGE:
                problems.append(f"{what}: a {len(answers[0]['message'])}-character message")
        assert ws.close_code is None
    return problems


async def ws_too_big(port: int) -> list[str]:
    """3.9 MB of metadata over WebSocket is a frame over the 1 MiB limit: closed with 1009, as documented."""
    code: int | None = None
    # The client library's own close of a socket the server already dropped can fail inside asyncio (its transport
    # is gone: AttributeError on the loop); what the server answered was read before that.
    with contextlib.suppress(AttributeError):
        async with ws_client(port) as ws:
            assert json.loads(await ws.recv())["type"] == "connection"
            await ws.send(publish(metadata=json.dumps({"k": "v" * 3_900_000})))
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(GUARD):
                    async for _ in ws:
                        pass
            code = ws.close_code
    if code != CloseCode.MESSAGE_TOO_BIG:
        return [f"3.9 MB of metadata over WebSocket: closed with {code}, not 1009"]
    return []


def deep_request(depth: int) -> bytes:
    return deep_struct(depth)


def random_protobuf(seed: int) -> bytes:
    rng = random.Random(seed)
    while True:
        data = rng.randbytes(rng.randint(8, 120))
        try:
            nexus_pb2.EventRequest.FromString(data)
        except Exception:
            return data


GRPC_POISON: list[tuple[str, str, bytes, grpc.StatusCode]] = [
    (
        "a 5,000-digit version",
        "EmitEvent",
        nexus_pb2.EventRequest(event_type=f"poison:x:v{NINES}:sent").SerializeToString(),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "3.9 MB of metadata",
        "EmitEvent",
        nexus_pb2.EventRequest(event_type="poison:x:v1:sent", metadata={"k": "v" * 3_900_000}).SerializeToString(),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    *[
        (f"a payload {depth} levels deep", "EmitEvent", deep_request(depth), grpc.StatusCode.INVALID_ARGUMENT)
        for depth in (33, 49, 100, 101, 400, 1_000)
    ],
    *[
        (f"random protobuf bytes to {method}", method, random_protobuf(seed), grpc.StatusCode.INVALID_ARGUMENT)
        for seed, method in enumerate(["EmitEvent", "CancelStream", "ListHandlers", "ListStreams"] * 3)
    ],
    *[
        (f"random protobuf bytes to {method}", method, random_protobuf(seed), grpc.StatusCode.INVALID_ARGUMENT)
        for seed, method in enumerate(["SubscribeEvents", "SubscribeEventBatches", "RequestEvent"] * 3, 100)
    ],
    (
        "100,000 patterns",
        "SubscribeEvents",
        nexus_pb2.SubscribeRequest(event_types=[f"poison:p{i}:*:*" for i in range(100_000)]).SerializeToString(),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    (
        "random protobuf bytes in a publish stream",
        "PublishEvents",
        field(1, random_protobuf(7)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
]
STREAMING = {"SubscribeEvents", "SubscribeEventBatches", "RequestEvent"}


async def grpc_poison(served: Served) -> list[str]:
    problems = []
    options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(served.address, options=options) as channel:
        for what, method, data, code in GRPC_POISON:
            try:
                async with asyncio.timeout(GUARD):
                    if method in STREAMING:
                        call: Any = channel.unary_stream(SERVICE + method)(data)
                        async for _ in call:
                            pass
                    elif method == "PublishEvents":
                        await channel.stream_unary(SERVICE + method)(iter([data]))
                    else:
                        await channel.unary_unary(SERVICE + method)(data)
                problems.append(f"{what}: accepted")
            except grpc.aio.AioRpcError as error:
                details = error.details() or ""
                if error.code() != code or not 0 < len(details) <= MAX_MESSAGE:
                    problems.append(f"{what}: {error.code().name} {details[:200]!r}, wanted {code.name}")
        # The server still serves the ordinary calls.
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        assert (await stub.EmitEvent(nexus_pb2.EventRequest(event_type="poison:ok:v1:sent"))).offset > 0
    return problems


@pytest.fixture(params=["memory", "nats"])
def poisoned(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    with target_server(request.param, tmp_path) as target:
        yield target


def test_poison_gets_clear_errors_and_subscribers_keep_receiving(poisoned: Target) -> None:
    """With every default limit, each poison input gets its clear error: an error frame with its code over
    WebSocket (the socket stays open), close 1009 for a frame over 1 MiB, INVALID_ARGUMENT or RESOURCE_EXHAUSTED
    over gRPC. Then canaries on gRPC (SubscribeEvents and SubscribeEventBatches), WebSocket and SSE subscribed to
    '>' before the attack receive every later event in order, nothing is logged at error level, and SIGTERM
    ends the server within 2 s."""
    clients, port = poisoned.clients, poisoned.served.ws_port
    problems = clients.run(ws_poison(port)) + clients.run(ws_too_big(port)) + clients.run(grpc_poison(poisoned.served))
    assert not problems, "\n".join(problems)
    finish(poisoned)
