"""Fuzzing every edge of a real ``nexus serve``, on the memory bus and on NATS (hypothesis, bounded time).

Per bus, one server process (``nexus serve`` with :data:`~fuzz_harness.RAISED_LIMITS`: rates and per-connection
counts raised so they do not throttle the fuzz; every per-event and per-subscription limit at its default) takes:

- gRPC: 10,000 generated ``EventRequest``s (4,000 to EmitEvent, 3,000 to RequestEvent, 3,000 in 1,000
  PublishEvents streams of 3), 10,000 generated ``SubscribeRequest``s (half SubscribeEvents, half
  SubscribeEventBatches), and 10,000 raw byte strings spread over all 8 methods (1,250 each) through a generic
  channel with identity serializers;
- WebSocket: 10,000 frames (text close to the protocol, raw JSON oddities, binary) over 5 connections;
- SSE: 10,000 query strings with ``Last-Event-ID`` headers.

Every answer must be a success or a clean refusal (gRPC OK / INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND /
FAILED_PRECONDITION / PERMISSION_DENIED / ALREADY_EXISTS; error frames with a code from the table, never a 1011
close; SSE 200/400/401/405). Canaries
on gRPC, WebSocket and SSE subscribed to ``>`` before the fuzz must then receive every event published after it,
in order; the server logs nothing at error level, and exits within 2 s of SIGTERM.

The pure parsers (``EventType.parse``, ``parse_pattern``, ``Event.create``) take 10,000 inputs each. Inputs are
drawn once per session with a fixed seed (``derandomize``), so the memory and NATS runs see the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuzz_harness import (
    CLEAN_SSE_STATUS,
    CLEAN_STATUS,
    GUARD,
    MAX_MESSAGE,
    RAISED_LIMITS,
    SERVICE,
    Served,
    Target,
    WsCanary,
    drive,
    finish,
    shown,
    target_server,
    ws_client,
)
from fuzz_strategies import (
    HANDLED_TYPES,
    draw,
    event_ids,
    event_request_inputs,
    event_types,
    field,
    metadata,
    patterns,
    payloads,
    raw_requests,
    sse_inputs,
    subscribe_requests,
    ws_frames,
)
from nexus.gateway.protocol import ERRORS

from nexus.errors import NexusError
from nexus.events import Event, EventType
from nexus.patterns import parse_pattern
from nexus.v1 import nexus_pb2, nexus_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timing]

COUNT = 10_000
"""Generated inputs per edge and bus."""
GRPC_CONCURRENCY = 32
WS_CONNECTIONS = 5
SSE_CONCURRENCY = 16


# --- the inputs, drawn once per session ------------------------------------------------------------------------


def _event_requests() -> list[nexus_pb2.EventRequest]:
    return event_request_inputs(COUNT)


def _subscribe_requests() -> list[nexus_pb2.SubscribeRequest]:
    return draw(subscribe_requests(), COUNT)


def _raw_requests() -> list[bytes]:
    return raw_requests(COUNT)


def _websocket_frames() -> list[str | bytes]:
    return draw(ws_frames(), COUNT)


def _sse_requests() -> list[tuple[str, str | None]]:
    return sse_inputs(COUNT)


def _parser_inputs() -> dict[str, list[Any]]:
    rng = random.Random(11)
    types = draw(event_types(surrogates=True), COUNT)
    bodies = draw(payloads(surrogates=True), 2500)
    ids = draw(event_ids(surrogates=True), 1000)
    metas = draw(metadata(surrogates=True), 1000)
    events = [(rng.choice(types), rng.choice(bodies), rng.choice(ids), rng.choice(metas)) for _ in range(COUNT)]
    return {"types": types, "patterns": draw(patterns(surrogates=True), COUNT), "events": events}


DRAWS: dict[str, Callable[[], Any]] = {
    # the longest first (seconds on one core: ~14, 13, 10, 10), so the two processes end close together
    "parsers": _parser_inputs,
    "sse": _sse_requests,
    "frames": _websocket_frames,
    "subscribe": _subscribe_requests,
}
"""Drawn in other processes; the EventRequests (~8 s) and raw requests (~1 s) are built here meanwhile: some
nest structs deeper than protobuf parses, so they cannot be sent between processes."""
DRAW_PROCESSES = 2


@functools.cache
def drawn() -> dict[str, Any]:
    """Every input of this module, drawn once per session, by three processes at once.

    Drawing is hypothesis's own work (about a millisecond an example, ~55 s for all of them on one core), and each
    draw is seeded on its own (``derandomize``, a seeded ``random.Random``), so the inputs do not depend on which
    process draws them or in what order: they are the ones one process would draw. New processes (``spawn``), so no
    state of this one (grpc's threads) is copied; hypothesis has the global random of each to itself.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(DRAW_PROCESSES, mp_context=context) as pool:
        futures = {name: pool.submit(job) for name, job in DRAWS.items()}
        here = {"events": _event_requests(), "raw": _raw_requests()}
        return here | {name: future.result() for name, future in futures.items()}


def grpc_event_requests() -> list[nexus_pb2.EventRequest]:
    result: list[nexus_pb2.EventRequest] = drawn()["events"]
    return result


def grpc_subscribe_requests() -> list[nexus_pb2.SubscribeRequest]:
    result: list[nexus_pb2.SubscribeRequest] = drawn()["subscribe"]
    return result


def grpc_raw_requests() -> list[bytes]:
    result: list[bytes] = drawn()["raw"]
    return result


def websocket_frames() -> list[str | bytes]:
    result: list[str | bytes] = drawn()["frames"]
    return result


def sse_requests() -> list[tuple[str, str | None]]:
    result: list[tuple[str, str | None]] = drawn()["sse"]
    return result


def parser_inputs() -> dict[str, list[Any]]:
    result: dict[str, list[Any]] = drawn()["parsers"]
    return result


def all_inputs() -> None:
    drawn()


# --- the server under attack -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["memory", "nats"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    all_inputs()  # drawn before any client runs: hypothesis wants the global random to itself
    with target_server(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}"), *RAISED_LIMITS) as target:
        yield target


def assert_clean(problems: list[str], count: int, what: str) -> None:
    assert not problems, f"{len(problems)} of {count} {what} got no clean answer, for example:\n" + "\n".join(
        problems[:10]
    )


# --- gRPC --------------------------------------------------------------------------------------------------------


def status_problem(code: grpc.StatusCode, details: str | None, sent: Any) -> str | None:
    if code not in CLEAN_STATUS and code != grpc.StatusCode.CANCELLED:
        return f"{code.name} {shown(details)} for {shown(sent)}"
    if details is not None and len(details) > MAX_MESSAGE:
        return f"{code.name} with a {len(details)}-character message for {shown(sent)}"
    return None


async def send_event_requests(served: Served, requests: list[nexus_pb2.EventRequest]) -> list[str]:
    """EmitEvent, RequestEvent (read to the end) and PublishEvents (streams of 3) for each request.

    The wrapping messages are built as bytes: protobuf refuses to copy a request nested near its depth limit
    into another message, which the server must refuse, not the client.
    """
    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    async with grpc.aio.insecure_channel(served.address, options=options) as channel:
        emit = channel.unary_unary(SERVICE + "EmitEvent")
        publish = channel.stream_unary(SERVICE + "PublishEvents")
        request_event = channel.unary_stream(
            SERVICE + "RequestEvent", response_deserializer=nexus_pb2.RequestEventResponse.FromString
        )
        jobs: list[tuple[str, list[nexus_pb2.EventRequest]]] = []
        for start in range(0, len(requests), 10):
            group = requests[start : start + 10]
            jobs += [("emit", [r]) for r in group[:4]] + [("request", [r]) for r in group[4:7]]
            jobs.append(("publish", group[7:10]))

        async def send(job: tuple[str, list[nexus_pb2.EventRequest]]) -> str | None:
            kind, batch = job
            try:
                async with asyncio.timeout(GUARD):
                    if kind == "emit":
                        await emit(batch[0].SerializeToString())
                    elif kind == "publish":
                        await publish(iter([wrap(r) for r in batch]))
                    else:
                        call = request_event(wrap(batch[0]))
                        replies = [reply async for reply in call]
                        if replies and batch[0].event_type in HANDLED_TYPES:
                            last = replies[-1].event.event_type
                            if not last.endswith(":success"):
                                return f"RequestEvent of {batch[0].event_type} ended with {last}"
            except grpc.aio.AioRpcError as error:
                if kind == "publish" and client_write_failed(error):
                    return None
                return status_problem(error.code(), error.details(), (kind, batch))
            except TimeoutError:
                return f"{kind} got no answer within {GUARD}s for {shown(batch)}"
            return None

        return await drive(jobs, send, GRPC_CONCURRENCY)


def client_write_failed(error: grpc.aio.AioRpcError) -> bool:
    """Whether grpcio's client failed to write a stream's next message because the server had already ended the
    call (it refused an earlier message): grpcio then reports its own INTERNAL instead of the server's status."""
    return error.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in (error.debug_error_string() or "")


def wrap(request: nexus_pb2.EventRequest) -> bytes:
    """``request`` as field 1 of a PublishEventsRequest or RequestEventRequest (the same bytes)."""
    return field(1, request.SerializeToString())


def test_grpc_event_requests(target: Target) -> None:
    """10,000 generated EventRequests per bus: 4,000 EmitEvent, 3,000 RequestEvent, 3,000 in PublishEvents
    streams of 3; each answered OK or with a clean refusal."""
    requests = grpc_event_requests()
    problems = target.clients.run(send_event_requests(target.served, requests))
    assert_clean(problems, len(requests), "EventRequests")


async def send_subscribe_requests(served: Served, requests: list[nexus_pb2.SubscribeRequest]) -> list[str]:
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = nexus_pb2_grpc.NexusServiceStub(channel)
        numbered = list(enumerate(requests))

        async def send(item: tuple[int, nexus_pb2.SubscribeRequest]) -> str | None:
            index, request = item
            call: Any
            if index % 2:
                call = stub.SubscribeEventBatches(
                    nexus_pb2.SubscribeEventBatchesRequest(
                        event_types=request.event_types, since_offset=request.since_offset, epoch=request.epoch
                    )
                )
            else:
                call = stub.SubscribeEvents(request)
            try:
                async with asyncio.timeout(GUARD):
                    initial = dict(await call.initial_metadata() or ())
                    if "nexus-epoch" in initial:
                        return None  # live: a success
                    code = await call.code()
                    if code == grpc.StatusCode.OK:
                        return f"a subscription ended at once without metadata for {shown(request)}"
                    return status_problem(code, await call.details(), request)
            except TimeoutError:
                return f"no answer within {GUARD}s to {shown(request)}"
            finally:
                call.cancel()

        return await drive(numbered, send, GRPC_CONCURRENCY)


def test_grpc_subscribe_requests(target: Target) -> None:
    """10,000 generated SubscribeRequests per bus (patterns, offsets, epochs; half to SubscribeEventBatches):
    each goes live (initial metadata) or is refused cleanly."""
    requests = grpc_subscribe_requests()
    problems = target.clients.run(send_subscribe_requests(target.served, requests))
    assert_clean(problems, len(requests), "SubscribeRequests")


METHODS: list[tuple[str, str]] = [
    ("EmitEvent", "unary_unary"),
    ("CancelStream", "unary_unary"),
    ("ListHandlers", "unary_unary"),
    ("ListStreams", "unary_unary"),
    ("SubscribeEvents", "unary_stream"),
    ("SubscribeEventBatches", "unary_stream"),
    ("RequestEvent", "unary_stream"),
    ("PublishEvents", "stream_unary"),
]


async def send_raw(served: Served, data: list[bytes]) -> list[str]:
    async with grpc.aio.insecure_channel(served.address) as channel:
        jobs = [(METHODS[index % len(METHODS)], item) for index, item in enumerate(data)]

        async def send(job: tuple[tuple[str, str], bytes]) -> str | None:
            (method, kind), item = job
            path = SERVICE + method
            call: Any = None
            try:
                async with asyncio.timeout(GUARD):
                    if kind == "unary_unary":
                        await channel.unary_unary(path)(item)
                    elif kind == "stream_unary":
                        await channel.stream_unary(path)(iter([item, item]))
                    else:
                        call = channel.unary_stream(path)(item)
                        initial = dict(await call.initial_metadata() or ())
                        if method == "RequestEvent" or "nexus-epoch" not in initial:
                            async for _ in call:
                                pass
            except grpc.aio.AioRpcError as error:
                if kind == "stream_unary" and client_write_failed(error):
                    return None
                return status_problem(error.code(), error.details(), (method, item))
            except TimeoutError:
                return f"{method} got no answer within {GUARD}s for {shown(item)}"
            finally:
                if call is not None:
                    call.cancel()
            return None

        return await drive(jobs, send, GRPC_CONCURRENCY)


def test_grpc_raw_bytes(target: Target) -> None:
    """10,000 raw byte strings per bus (random, mutated valid messages, invalid UTF-8, structs nested past 100
    levels), 1,250 to each of the 8 methods through a generic channel: never UNKNOWN or INTERNAL."""
    data = grpc_raw_requests()
    problems = target.clients.run(send_raw(target.served, data))
    assert_clean(problems, len(data), "raw requests")


# --- WebSocket ---------------------------------------------------------------------------------------------------


def frame_problem(frame: dict[str, Any]) -> str | None:
    if frame.get("type") != "error":
        return None
    code, message = frame.get("code"), frame.get("message")
    if code not in ERRORS:
        return f"an error frame with the unknown code {code!r}: {shown(frame)}"
    if code == "internal" or ERRORS[code].fatal:
        return f"an error frame {shown(frame)}"
    if not isinstance(message, str) or not 0 < len(message) <= MAX_MESSAGE:
        return f"an error frame with a bad message: {shown(frame)}"
    return None


def on_the_wire(frame: str | bytes) -> str | bytes:
    """What a client can put on the wire for ``frame``: text that is not valid UTF-8 (a raw lone surrogate, which no
    text frame can carry) goes as a binary frame of its bytes."""
    if isinstance(frame, str):
        try:
            frame.encode("utf-8")
        except UnicodeEncodeError:
            return frame.encode("utf-8", "surrogatepass")
    return frame


async def send_frames(port: int, frames: list[str | bytes], name: str) -> list[str]:
    """Send ``frames`` on one connection while reading every answer; end with a ping that must be answered."""
    problems: list[str] = []
    async with ws_client(port) as ws:

        async def read() -> None:
            async for message in ws:
                frame = json.loads(message)
                problem = frame_problem(frame)
                if problem is not None:
                    problems.append(problem)
                if frame.get("type") == "pong" and frame.get("ref") == name:
                    return

        reader = asyncio.create_task(read())
        try:
            for frame in frames:
                await ws.send(on_the_wire(frame))
            await ws.send(json.dumps({"type": "ping", "ref": name}))
            await asyncio.wait_for(reader, 120.0)
        except Exception as exc:
            code = ws.close_code
            problems.append(f"{name} ended with {type(exc).__name__} {shown(str(exc))}, close code {code}")
        finally:
            reader.cancel()
        if ws.close_code is not None:
            problems.append(f"{name} was closed with {ws.close_code}")
    return problems


async def send_all_frames(port: int, frames: list[str | bytes]) -> list[str]:
    shares = [frames[index::WS_CONNECTIONS] for index in range(WS_CONNECTIONS)]
    results = await asyncio.gather(*(send_frames(port, share, f"conn-{n}") for n, share in enumerate(shares)))
    return [problem for result in results for problem in result]


def test_websocket_frames(target: Target) -> None:
    """10,000 WebSocket frames per bus over 5 connections: subscribe/unsubscribe/cancel/ping/publish frames with
    hostile fields (lone surrogates as \\ud800 escapes, NaN, 5,000-digit numbers, deep nesting), truncated JSON
    and random binary frames. Every error frame has a code from the table and a short message; no connection is
    closed, and each answers a last ping."""
    frames = websocket_frames()
    problems = target.clients.run(send_all_frames(target.served.ws_port, frames))
    assert_clean(problems, len(frames), "WebSocket frames")
    ws_canary = next(c for c in target.canaries if isinstance(c, WsCanary))
    assert ws_canary.ended is None, ws_canary.ended


# --- SSE ---------------------------------------------------------------------------------------------------------


async def sse_request(port: int, target: str, last_event_id: str | None) -> str | None:
    """One ``GET``: a 200 must start with a ``subscribed`` message, a refusal must carry a short JSON message."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=16 * 1024 * 1024)
    try:
        head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if last_event_id is not None:
            head += f"Last-Event-ID: {last_event_id}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n")
        async with asyncio.timeout(GUARD):
            status_line = await reader.readline()
            parts = status_line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                return f"no status line ({status_line!r}) for {shown((target, last_event_id))}"
            status = int(parts[1])
            headers: dict[bytes, bytes] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if status not in CLEAN_SSE_STATUS:
                return f"HTTP {status} for {shown((target, last_event_id))}"
            if status == 200:
                while line := await reader.readline():
                    if line.startswith(b"data: "):
                        kind = json.loads(line[6:]).get("type")
                        return None if kind == "subscribed" else f"SSE began with {shown(line)}"
                return f"an SSE stream ended before its first message for {shown((target, last_event_id))}"
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            message = json.loads(body)["message"] if body.startswith(b"{") else body.decode()
            if not 0 < len(message) <= MAX_MESSAGE:
                return f"HTTP {status} with a bad message {shown(body)}"
    except TimeoutError:
        return f"no answer within {GUARD}s for {shown((target, last_event_id))}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return None


async def send_sse(port: int, requests: list[tuple[str, str | None]]) -> list[str]:
    async def send(item: tuple[str, str | None]) -> str | None:
        return await sse_request(port, *item)

    return await drive(requests, send, SSE_CONCURRENCY)


def test_sse_requests(target: Target) -> None:
    """10,000 SSE requests per bus: generated query strings (patterns, offsets, epochs, unknown and repeated
    fields, bad percent escapes) with generated Last-Event-ID headers: 200 streams or 400/401/405 with a short
    message, never 500."""
    requests = sse_requests()
    problems = target.clients.run(send_sse(target.served.ws_port, requests))
    assert_clean(problems, len(requests), "SSE requests")


# --- after the fuzz ----------------------------------------------------------------------------------------------


def test_zz_canaries_receive_everything_after_the_fuzz_and_sigterm_stops_the_server(target: Target) -> None:
    """After the fuzz (the tests above, same server), gRPC, WebSocket and SSE subscribers to '>' receive 20
    events published after it, in order and nothing else; SIGTERM ends the server within 2 s."""
    finish(target)


# --- with the default limits -------------------------------------------------------------------------------------


def test_the_default_limits_answer_fuzz_cleanly_too(tmp_path: Path) -> None:
    """A memory-bus server with every default limit (publish rate, frames per second, 1 MiB frames...) takes
    2,000 EventRequests, 2,000 raw requests and 2,000 WebSocket frames (those over 1 MiB left out: they close the
    socket with 1009, as documented), all answered cleanly; the canaries and SIGTERM as above."""
    all_inputs()
    with target_server("memory", tmp_path) as target:
        requests = grpc_event_requests()[:2000]
        assert_clean(target.clients.run(send_event_requests(target.served, requests)), 2000, "EventRequests")
        data = grpc_raw_requests()[:2000]
        assert_clean(target.clients.run(send_raw(target.served, data)), 2000, "raw requests")
        frames = [f for f in websocket_frames()[:2100] if len(f) < 1024 * 1024 - 1024][:2000]
        assert_clean(target.clients.run(send_all_frames(target.served.ws_port, frames)), 2000, "frames")
        finish(target)


# --- the pure parsers --------------------------------------------------------------------------------------------


def assert_nexus_error(call: Any, *args: Any, **kwargs: Any) -> str | None:
    try:
        call(*args, **kwargs)
    except NexusError as error:
        message = error.message
        if not 0 < len(message) <= 300:
            return f"a {len(message)}-character message for {shown(args)}"
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:
            return f"a message that is not valid UTF-8 for {shown(args)}: {message!r}"
    except Exception as exc:
        return f"{type(exc).__name__}: {shown(str(exc))} for {shown(args)}"
    return None


def test_event_types_parse_or_raise_a_short_nexus_error() -> None:
    """10,000 generated event types (lone surrogates included): EventType.parse returns or raises a NexusError
    whose message is at most 300 characters of valid UTF-8."""
    types = parser_inputs()["types"]
    problems = [p for p in (assert_nexus_error(EventType.parse, text) for text in types) if p]
    assert_clean(problems, len(types), "event types")


def test_patterns_parse_or_raise_a_short_nexus_error() -> None:
    """10,000 generated patterns: parse_pattern returns or raises a short NexusError."""
    items = parser_inputs()["patterns"]
    problems = [p for p in (assert_nexus_error(parse_pattern, text) for text in items) if p]
    assert_clean(problems, len(items), "patterns")


def test_events_are_created_or_refused_with_a_short_nexus_error() -> None:
    """10,000 generated (type, payload, id, metadata) combinations, with lone surrogates, NaN, huge integers and
    deep nesting: Event.create returns an event that encodes as strict UTF-8 JSON, or raises a short NexusError."""
    problems = []
    for event_type, payload, event_id, meta in parser_inputs()["events"]:
        args = (event_type, payload)
        problem = assert_nexus_error(Event.create, *args, event_id=event_id or None, metadata=meta)
        if problem is None:
            try:
                event = Event.create(event_type, payload, event_id=event_id or None, metadata=meta)
            except NexusError:
                continue
            try:
                json.dumps(event.to_dict(), allow_nan=False, ensure_ascii=False).encode("utf-8")
            except Exception as exc:
                problem = f"a created event cannot be sent ({exc!r}): {shown(event)}"
        if problem is not None:
            problems.append(problem)
    assert_clean(problems, COUNT, "events")
