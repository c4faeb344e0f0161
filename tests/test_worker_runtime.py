"""The Python worker runtime (nexus.worker): handler classes served out of process over WorkerService, against a
real in-process server; what the worker declares, and how it answers requests, cancels, timeouts and failures."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from worker_handlers import Countdown, Echo, Flood, Ordered, Publisher, Slow

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.errors import HandlerConfigError, NexusError
from nexus.testing import StreamFollower, run_server, start_worker
from nexus.v1 import nexus_pb2
from nexus.worker import Worker, _Outbox, declaration

GUARD = 15.0


class Bare(EventHandler):
    event_type = "wdemo:bare"

    async def handle(self, event: Event) -> None:
        return None


class Tuned(StreamingEventHandler):
    event_type = "wdemo:stream_tuned:v2"
    stream_timeout = None
    ordering_key = "agent_id"
    buffer_size = 7

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        return None


# --- the declaration, the outbox ----------------------------------------------------------------------------------


def test_declaration_maps_class_attributes_to_the_protocol() -> None:
    """SERVER_DEFAULT timeout and buffer go as 0, None timeout as -1; kind, key, version and slots as declared."""
    plain = declaration(Bare(), name="bare", max_in_flight=3)
    assert (plain.event_type, plain.streaming, plain.ordering_key) == ("wdemo:bare", False, "")
    assert (plain.stream_timeout_s, plain.buffer_size, plain.max_in_flight, plain.name) == (0.0, 0, 3, "bare")
    tuned = declaration(Tuned(), name="t", max_in_flight=16)
    assert (tuned.event_type, tuned.streaming, tuned.ordering_key) == ("wdemo:stream_tuned:v2", True, "agent_id")
    assert (tuned.stream_timeout_s, tuned.buffer_size) == (-1.0, 7)
    assert declaration(Slow(), name="s", max_in_flight=1).stream_timeout_s == 0.3


@pytest.mark.parametrize(
    ("attribute", "value", "words"),
    [
        ("stream_timeout", -1, "stream_timeout must be a positive number"),
        ("buffer_size", 0, "buffer_size must be at least 1"),
        ("buffer_size", 2.5, "buffer_size must be a whole number"),
        ("ordering_key", "", "ordering_key must be a payload field"),
    ],
)
def test_declaration_refuses_attributes_no_server_would_take(attribute: str, value: Any, words: str) -> None:
    """A bad class attribute is refused before connecting, naming the handler and the attribute."""
    cls = type("Odd", (Bare,), {attribute: value})
    with pytest.raises(HandlerConfigError, match=words) as refused:
        declaration(cls(), name="odd", max_in_flight=1)
    assert "odd" in str(refused.value)
    with pytest.raises(HandlerConfigError, match="max_in_flight must be at least 1"):
        declaration(Bare(), name="bare", max_in_flight=0)


async def test_consecutive_chunks_of_one_stream_share_a_message_in_order() -> None:
    """Chunks queued back to back travel in one message; another stream's chunk or a pong keeps its place."""
    outbox = _Outbox()
    outbox.chunk("a", b'{"i":0}')
    outbox.chunk("a", b'{"i":1}')
    outbox.chunk("b", b'{"i":0}')
    outbox.put(nexus_pb2.HandleEventsRequest(pong=nexus_pb2.WorkerPong(nonce=1)))
    outbox.chunk("b", b'{"i":1}')
    outbox.close()
    sent = [message async for message in outbox]
    assert [m.WhichOneof("body") for m in sent] == ["chunk", "chunk", "pong", "chunk"]
    assert [(m.chunk.correlation_id, list(m.chunk.payloads_json)) for m in sent if m.HasField("chunk")] == [
        ("a", [b'{"i":0}', b'{"i":1}']),
        ("b", [b'{"i":0}']),
        ("b", [b'{"i":1}']),
    ]


def test_a_worker_needs_a_handler() -> None:
    """A worker with nothing to serve is refused before it connects."""
    with pytest.raises(HandlerConfigError, match="at least one handler"):
        Worker("127.0.0.1:1", [])


# --- against a server ---------------------------------------------------------------------------------------------


async def test_a_plain_handler_answers_through_the_worker() -> None:
    """requested -> success with the handler's result, computed in the worker (it names itself in the result)."""
    async with run_server() as nexus, nexus.start_worker(Echo(), name="w-echo") as worker:
        done = await nexus.client.call("wdemo:echo:v1:requested", {"x": 1})
        assert done.state == "success"
        assert done.payload == {"echo": {"x": 1}, "worker": "w-echo"}
        assert worker.registered
        assert worker.worker_id
        assert worker.handled == 1


async def test_failures_are_reported_with_their_type() -> None:
    """An exception is handler_error, InvalidPayload and a payload outside `takes` are invalid_payload, a result
    that is not JSON is handler_error; the worker goes on serving."""
    async with run_server() as nexus, nexus.start_worker(Echo()):
        call = nexus.client.call
        raised = await call("wdemo:echo:v1:requested", {"mode": "raise"})
        assert raised.state == "failed"
        assert raised.payload["error"] == {"type": "handler_error", "message": "RuntimeError: boom"}
        invalid = await call("wdemo:echo:v1:requested", {"mode": "invalid"})
        assert invalid.payload["error"] == {"type": "invalid_payload", "message": "x is not welcome here"}
        outside = await call("wdemo:echo:v1:requested", {"x": "one"})
        assert outside.payload["error"]["type"] == "invalid_payload"
        assert "x" in outside.payload["error"]["message"]
        bad_result = await call("wdemo:echo:v1:requested", {"mode": "not_json"})
        assert bad_result.payload["error"]["type"] == "handler_error"
        assert "invalid result" in bad_result.payload["error"]["message"]
        assert (await call("wdemo:echo:v1:requested", {"x": 2})).state == "success"


async def test_a_stream_runs_its_lifecycle_through_the_worker() -> None:
    """started, every chunk in order, heartbeats while it lives, then success with the chunk count."""
    async with run_server(heartbeat_interval=0.05) as nexus, nexus.start_worker(Countdown(), name="w1"):
        events = [e async for e in nexus.client.request("wdemo:stream_countdown:v1:requested", {"n": 4, "every": 0.04})]
        states = [e.state for e in events]
        assert states[0] == "started"
        assert states[-1] == "success"
        assert "heartbeat" in states
        assert [e.payload for e in events if e.state == "stream"] == [{"i": i, "worker": "w1"} for i in range(4)]
        assert events[-1].payload["stream_count"] == 4


async def test_send_waits_for_credit_and_every_chunk_arrives() -> None:
    """A handler sending 2,000 chunks into a buffer of 4 never overruns its credit: all arrive, in order."""
    async with run_server() as nexus, nexus.start_worker(Flood()):
        events = [
            e async for e in nexus.client.request("wdemo:stream_flood:v1:requested", {"n": 2000}, heartbeats=False)
        ]
        assert events[-1].state == "success", events[-1].payload
        assert [e.payload["i"] for e in events if e.state == "stream"] == list(range(2000))


async def test_a_cancel_stops_the_handler_in_the_worker() -> None:
    """The requester cancels: the stream ends cancelled, the handler's task is gone and its slot is free."""
    async with run_server() as nexus, nexus.start_worker(Countdown(), max_in_flight=1) as worker:
        follower = StreamFollower(
            nexus.client.request("wdemo:stream_countdown:v1:requested", {"n": 1, "linger": 60}, heartbeats=False)
        )
        await follower.wait_for(lambda chunks: len(chunks) == 1)
        assert (await follower.cancel()).state == "cancelled"
        await worker.wait_idle(GUARD)
        again = await nexus.client.call("wdemo:stream_countdown:v1:requested", {"n": 1}, heartbeats=False)
        assert again.state == "success"


async def test_a_timeout_ends_the_stream_and_cancels_the_handler() -> None:
    """A stream outliving its declared 0.3 s ends with timeout; the worker's handler is stopped."""
    async with run_server() as nexus, nexus.start_worker(Slow()) as worker:
        ended = await nexus.client.call("wdemo:stream_slow:v1:requested", {}, heartbeats=False)
        assert ended.state == "timeout"
        assert ended.payload["timeout_s"] == pytest.approx(0.3)
        await worker.wait_idle(GUARD)


async def test_context_publishes_keeps_state_and_follows_out_of_process() -> None:
    """ctx.publish carries causation_id; ctx.kv keeps a counter; ctx.config is the plugin's section; ctx.follow
    replays the history and follows live."""
    async with run_server() as nexus:
        await nexus.client.emit("wdemo:note:v1:set", {"n": 1})
        recorder = await nexus.record("wdemo:side:v1:*")
        async with nexus.start_worker(Publisher(), handler_config={"worker_handlers:Publisher": {"greeting": "hi"}}):
            note = await nexus.client.emit("wdemo:note:v1:set", {"n": 2})
            first = await nexus.client.call("wdemo:publish:v1:requested", {"note_offset": note.offset})
            assert first.state == "success", first.payload
            assert first.payload["count"] == 1
            assert first.payload["notes"] == [{"n": 1}, {"n": 2}]
            second = await nexus.client.call("wdemo:publish:v1:requested", {})
            assert second.payload["count"] == 2
        sides = await recorder.wait_count(2)
        await recorder.stop()
        assert [side.payload for side in sides] == [{"greeting": "hi"}] * 2
        assert sides[0].event_id == first.payload["side_event_id"]
        assert sides[0].metadata["causation_id"] == first.metadata["correlation_id"]


async def test_a_refused_registration_ends_the_worker_with_the_reason() -> None:
    """A type an in-process handler already serves is refused: start_worker raises the server's error."""
    async with run_server(Echo()) as nexus:
        with pytest.raises(NexusError, match="wdemo:echo"):
            async with start_worker(nexus.address, Echo()):
                pass


async def test_ordering_keys_hold_across_workers() -> None:
    """Requests with one key never run at the same time, whichever of two workers runs them."""
    async with (
        run_server() as nexus,
        nexus.start_worker(Ordered(), name="a"),
        nexus.start_worker(Ordered(), name="b"),
    ):
        calls = [nexus.client.call("wdemo:ordered:v1:requested", {"key": f"k{n % 5}", "seq": n}) for n in range(100)]
        done = await asyncio.gather(*calls)
    assert all(event.state == "success" for event in done)
    assert {event.payload["worker"] for event in done} == {"a", "b"}
    for key in {event.payload["key"] for event in done}:
        runs = sorted((e.payload["began"], e.payload["ended"]) for e in done if e.payload["key"] == key)
        assert all(previous[1] <= following[0] for previous, following in itertools.pairwise(runs))


async def test_kv_lives_in_the_workers_data_directory(tmp_path: Path) -> None:
    """ctx.kv in a worker is SQLite in its data directory: a worker started again on it finds its keys."""
    async with run_server() as nexus:
        for expected in (1, 2):
            async with nexus.start_worker(Publisher(), data_dir=str(tmp_path)):
                done = await nexus.client.call("wdemo:publish:v1:requested", {})
                assert done.payload["count"] == expected
    assert (tmp_path / "kv.sqlite3").exists()
