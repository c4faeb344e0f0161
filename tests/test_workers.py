"""Handlers in other processes: the worker protocol (``nexus.v1.WorkerService``) as the server drives it.

The worker here speaks the protocol frame by frame (``worker_support.RawWorker``) so each test can answer as a
well-behaved worker would, or misbehave on purpose. The Python runtime and the TypeScript worker have tests of
their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from nats_support import until
from worker_support import RawWorker, handler, payload

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.testing import StreamFollower, TestServer, run_server

pytestmark = pytest.mark.asyncio

FAST: dict[str, Any] = {"heartbeat_interval": 0.1, "worker_ping_interval_s": 0.1, "worker_timeout_s": 0.5}


class InProcessTicks(StreamingEventHandler):
    event_type = "demo:stream_ticks"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3))):
            await stream.send({"i": i})


class InProcessEcho(EventHandler):
    event_type = "demo:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload}


def lifecycle(events: list[Event]) -> list[tuple[str, dict[str, Any]]]:
    """States and payloads, without the parts that differ run to run (durations, heartbeats' timing)."""
    shown = []
    for event in events:
        body = {k: v for k, v in event.payload.items() if k not in ("duration_s", "elapsed_s")}
        shown.append((event.state, body))
    return shown


async def stored(nexus: TestServer, correlation_id: str) -> list[Event]:
    """Every stored event of a request's lifecycle, read back from the history up to its head (what any client
    replaying would see, not only the first terminal a requester stops at)."""
    head = await nexus.bus.head_offset()
    subscription = await nexus.bus.subscribe([">"], since_offset=0, epoch=nexus.bus.epoch)
    events: list[Event] = []
    try:
        while not events or events[-1].offset < head:
            events.extend(await asyncio.wait_for(subscription.next_batch(), 5.0))
    finally:
        subscription.close()
    return [e for e in events if e.metadata.get("correlation_id") == correlation_id]


def terminals(events: list[Event]) -> list[Event]:
    return [e for e in events if e.state in ("success", "failed", "timeout", "cancelled")]


async def ended_in_history(nexus: TestServer, correlation_id: str, timeout: float = 5.0) -> list[Event]:
    """The stored terminal events of a request, once there is one (its worker's answer is on its way)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := terminals(await stored(nexus, correlation_id))):
        assert asyncio.get_running_loop().time() < deadline, f"{correlation_id} has no terminal event"
        await asyncio.sleep(0.02)
    return found


async def test_a_remote_stream_has_the_lifecycle_of_an_in_process_one() -> None:
    async with run_server(InProcessTicks(), **FAST) as local:
        expected = [e async for e in local.client.request("demo:stream_ticks:v1:requested", {"n": 3}, heartbeats=False)]
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True)) as worker,
    ):
        stream = nexus.client.request("demo:stream_ticks:v1:requested", {"n": 3}, heartbeats=False)
        follower = StreamFollower(stream)
        request = await worker.request()
        assert request.event.event_type == "demo:stream_ticks:v1:requested"
        assert payload(request) == {"n": 3}
        assert request.credit == 100  # the server's buffer size
        cid = request.event.event_id
        worker.started(cid)
        await follower.started()
        for i in range(3):
            worker.chunks(cid, {"i": i})
        worker.result(cid)
        await follower.ended()
        seen = await stored(nexus, cid)
    assert lifecycle(seen) == lifecycle(expected)


async def test_a_plain_remote_handler_answers_with_its_result_and_is_listed_as_remote() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:echo", streaming=False), name="w-a") as worker,
    ):
        call = asyncio.create_task(nexus.client.call("demo:echo:v1:requested", {"x": 1}))
        request = await worker.request()
        assert request.credit == 0
        cid = request.event.event_id
        worker.started(cid)
        listed = await nexus.client.streams()
        assert [(s["correlation_id"], s["worker"]) for s in listed] == [(cid, "w-a")]
        worker.result(cid, {"echo": payload(request)})
        done = await call
        handlers = await nexus.client.handlers()
    assert done.state == "success"
    assert done.payload == {"echo": {"x": 1}}
    assert [(h["event_type"], h["location"], h["workers"]) for h in handlers] == [("demo:echo", "remote", 1)]


async def test_a_worker_cannot_speak_for_a_request_it_was_not_given_nor_end_one_twice() -> None:
    async with run_server(**FAST) as nexus, RawWorker(nexus.address, handler("demo:echo", streaming=False)) as worker:
        worker.result("not-a-request-of-mine", {"forged": True})
        refused = await worker.expect("refused")
        assert (refused.correlation_id, refused.code) == ("not-a-request-of-mine", "unknown_request")
        call = asyncio.create_task(nexus.client.call("demo:echo:v1:requested", {}))
        cid = (await worker.request()).event.event_id
        worker.result(cid, {"n": 1})
        worker.result(cid, {"n": 2})
        worker.error(cid, "and a failure too")
        assert (await worker.expect("refused")).code == "unknown_request"
        assert (await worker.expect("refused")).code == "unknown_request"
        done = await call
        assert done.payload == {"n": 1}
        assert [e.state for e in terminals(await stored(nexus, cid))] == ["success"]


async def test_chunks_beyond_the_credit_are_refused_and_fail_the_stream() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True, buffer_size=2)) as worker,
    ):
        follower = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=False))
        request = await worker.request()
        assert request.credit == 2
        cid = request.event.event_id
        worker.chunks(cid, {"i": 0}, {"i": 1}, {"i": 2})
        refused = await worker.expect("refused")
        ended = await follower.ended()
    assert refused.code == "over_credit"
    assert ended.state == "failed"
    assert ended.payload["error"]["type"] == "handler_error"
    assert "credit" in ended.payload["error"]["message"]


async def test_credit_comes_back_as_chunks_leave_the_buffer() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True, buffer_size=2)) as worker,
    ):
        follower = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=False))
        cid = (await worker.request()).event.event_id
        granted = 0
        for i in range(10):  # five times the buffer, never beyond the credit
            worker.chunks(cid, {"i": i})
            if i % 2 == 1:
                while granted < i + 1:
                    credit = await worker.expect("credit")
                    assert credit.correlation_id == cid
                    granted += credit.chunks
        worker.result(cid)
        ended = await follower.ended()
    assert ended.state == "success"
    assert [c["i"] for c in follower.chunks] == list(range(10))


async def test_a_worker_lost_mid_stream_fails_its_request_and_its_unstarted_ones_move_on() -> None:
    async with run_server(**FAST) as nexus:
        first = RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True, max_in_flight=2), name="first")
        await first.connect()
        running = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {"k": 1}, heartbeats=False))
        cid_running = (await first.request()).event.event_id
        first.started(cid_running)
        first.chunks(cid_running, {"i": 0})
        await running.wait_for(lambda chunks: len(chunks) == 1)
        queued = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {"k": 2}, heartbeats=False))
        cid_queued = (await first.request()).event.event_id  # given, never started
        second = RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True, max_in_flight=2), name="second")
        await second.connect()
        await first.drop()
        ended = await running.ended(timeout=5.0)
        moved = await second.request()
        assert moved.event.event_id == cid_queued
        second.started(cid_queued)
        second.result(cid_queued)
        done = await queued.ended()
        await second.close()
        assert ended.state == "failed"
        assert ended.payload["error"]["type"] == "worker_lost"
        assert ended.payload["stream_count"] == 1
        assert done.state == "success"
        assert [e.state for e in terminals(await stored(nexus, cid_running))] == ["failed"]
        assert [e.state for e in terminals(await stored(nexus, cid_queued))] == ["success"]
        assert [e.state for e in await stored(nexus, cid_queued)].count("started") == 1


async def test_a_worker_that_stops_answering_is_dropped_and_its_request_fails() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True)) as worker,
    ):
        worker.answer_pings = False
        follower = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=False))
        cid = (await worker.request()).event.event_id
        worker.started(cid)
        ended = await follower.ended(timeout=5.0)
        status = await worker.ended(timeout=5.0)
    assert ended.payload["error"]["type"] == "worker_lost"
    assert "sent nothing" in ended.payload["error"]["message"]
    assert status == grpc.StatusCode.UNAVAILABLE
    assert "sent nothing" in worker.details


@pytest.mark.parametrize(
    ("declared", "code", "words"),
    [
        (handler("demo:echo", streaming=False), grpc.StatusCode.ALREADY_EXISTS, "served in-process"),
        (handler("demo:stream_x", streaming=False), grpc.StatusCode.INVALID_ARGUMENT, "streaming event"),
        (handler("demo:plain_x", streaming=True), grpc.StatusCode.INVALID_ARGUMENT, "not a streaming event"),
        (handler("demo", streaming=False), grpc.StatusCode.INVALID_ARGUMENT, "service:action"),
        (handler("demo:x", streaming=False, max_in_flight=100_000), grpc.StatusCode.INVALID_ARGUMENT, "max_in_flight"),
    ],
)
async def test_a_bad_registration_ends_the_call_with_a_clear_status(
    declared: Any, code: grpc.StatusCode, words: str
) -> None:
    async with run_server(InProcessEcho(), **FAST) as nexus:
        worker = RawWorker(nexus.address, declared)
        assert await worker.connect() is None
        await worker.close()
    assert worker.status == code
    assert words in worker.details


async def test_workers_of_one_handler_must_declare_it_alike() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_t", streaming=True, ordering_key="agent")),
    ):
        other = RawWorker(nexus.address, handler("demo:stream_t", streaming=True, ordering_key="user"))
        assert await other.connect() is None
        await other.close()
    assert other.status == grpc.StatusCode.ALREADY_EXISTS
    assert "ordering_key" in other.details


async def test_a_cancel_reaches_the_worker_and_its_late_answers_are_dropped() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True)) as worker,
    ):
        stream = nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=False)
        follower = StreamFollower(stream)
        cid = (await worker.request()).event.event_id
        worker.started(cid)
        await follower.started()
        assert await stream.cancel("changed my mind")
        cancel = await worker.expect("cancel")
        ended = await follower.ended()
        worker.chunks(cid, {"late": True})
        worker.cancelled(cid)
        # The slot is free again: the next request comes, and nothing was refused in between.
        nexus_next = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=False))
        following = await worker.request()
        worker.result(following.event.event_id)
        await nexus_next.ended()
        history = await stored(nexus, cid)
    assert (cancel.correlation_id, cancel.reason) == (cid, "changed my mind")
    assert ended.state == "cancelled"
    assert [e.state for e in history] == ["started", "cancelled"]


async def test_a_remote_stream_times_out_and_heartbeats_while_it_lives() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:stream_ticks", streaming=True, stream_timeout_s=0.5)) as worker,
    ):
        follower = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=True))
        request = await worker.request()
        assert request.timeout_s == 0.5
        cid = request.event.event_id
        worker.started(cid)
        cancel = await worker.expect("cancel", timeout=5.0)
        ended = await follower.ended()
    assert cancel.reason == "timeout"
    assert ended.state == "timeout"
    assert ended.payload["timeout_s"] == 0.5
    assert sum(1 for e in follower.events if e.state == "heartbeat") >= 2


async def test_requests_wait_for_a_worker_within_the_grace_then_fail() -> None:
    async with run_server(**FAST, worker_grace_s=0.6) as nexus:
        worker = RawWorker(nexus.address, handler("demo:echo", streaming=False))
        await worker.connect()
        await worker.close()
        # Within the grace: a request waits, and a worker coming back takes it.
        waiting = asyncio.create_task(nexus.client.call("demo:echo:v1:requested", {"n": 1}))
        await asyncio.sleep(0.2)
        back = RawWorker(nexus.address, handler("demo:echo", streaming=False))
        await back.connect()
        cid = (await back.request()).event.event_id
        back.result(cid, {"ok": 1})
        assert (await waiting).state == "success"
        await back.close()
        # Past the grace: what waits fails, and new requests find no handler.
        late = await nexus.client.call("demo:echo:v1:requested", {"n": 2})
        after = await nexus.client.call("demo:echo:v1:requested", {"n": 3})
    assert (late.state, late.payload["error"]["type"]) == ("failed", "worker_lost")
    assert "no worker of demo:echo connected within 0.6 s" in late.payload["error"]["message"]
    assert (after.state, after.payload["error"]["type"]) == ("failed", "no_handler")


async def test_requests_with_one_ordering_key_run_one_at_a_time_in_order_across_workers() -> None:
    declared = handler("demo:place", streaming=False, ordering_key="agent", max_in_flight=4)
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, declared, name="a") as a,
        RawWorker(nexus.address, declared, name="b") as b,
    ):
        given: asyncio.Queue[tuple[RawWorker, Any]] = asyncio.Queue()

        async def collect(worker: RawWorker) -> None:
            while True:
                given.put_nowait((worker, await worker.request(timeout=60)))

        collectors = [asyncio.create_task(collect(w)) for w in (a, b)]
        # Stored one after the other: offset order is seq order.
        stored_requests = [
            await nexus.client.emit("demo:place:v1:requested", {"agent": "x", "seq": i}) for i in range(5)
        ]
        await nexus.client.emit("demo:place:v1:requested", {"agent": "y", "seq": 0})
        order: list[int] = []
        y_ran_meanwhile = False
        while len(order) < 5:
            worker, request = await asyncio.wait_for(given.get(), 5.0)
            body = payload(request)
            if body["agent"] == "y":
                y_ran_meanwhile = y_ran_meanwhile or bool(order)
                worker.result(request.event.event_id, {"seq": 0})
                continue
            order.append(int(body["seq"]))
            # While it runs, no other request of agent x is given to anyone.
            await asyncio.sleep(0.15)
            while not given.empty():
                later_worker, later = given.get_nowait()
                assert payload(later)["agent"] == "y", "a second request of one key was given while the first ran"
                later_worker.result(later.event.event_id, {"seq": 0})
                y_ran_meanwhile = True
            worker.result(request.event.event_id, {"seq": body["seq"]})
        for task in collectors:
            task.cancel()
        results = [await ended_in_history(nexus, e.event_id) for e in stored_requests]
    assert order == list(range(5))
    assert [[t.payload["seq"] for t in ended] for ended in results] == [[i] for i in range(5)]
    assert y_ran_meanwhile  # another key is not held up by this one


async def test_requests_go_to_the_worker_with_the_most_free_slots() -> None:
    async with (
        run_server(**FAST) as nexus,
        RawWorker(nexus.address, handler("demo:job", streaming=False, max_in_flight=3), name="big") as big,
        RawWorker(nexus.address, handler("demo:job", streaming=False, max_in_flight=1), name="small") as small,
    ):
        calls = [asyncio.create_task(nexus.client.call("demo:job:v1:requested", {"i": i})) for i in range(4)]
        given_big = [await big.request() for _ in range(3)]
        given_small = [await small.request()]
        assert big.received.empty()
        assert small.received.empty()
        for worker, given in ((big, given_big), (small, given_small)):
            for request in given:
                worker.result(request.event.event_id, {"by": worker.name})
        results = await asyncio.gather(*calls)
    assert sorted(r.payload["by"] for r in results) == ["big", "big", "big", "small"]


class PooledEcho(EventHandler):
    event_type = "demo:shared"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"by": "in-process"}


async def test_an_in_process_handler_and_workers_share_requests_when_configured_as_one_pool() -> None:
    async with (
        run_server(PooledEcho(), **FAST, worker_pools=["demo:shared"], worker_local_in_flight=1) as nexus,
        RawWorker(nexus.address, handler("demo:shared", streaming=False), name="remote") as worker,
    ):
        handlers = await nexus.client.handlers()
        first = asyncio.create_task(nexus.client.call("demo:shared:v1:requested", {}))
        second = asyncio.create_task(nexus.client.call("demo:shared:v1:requested", {}))
        request = await worker.request()
        worker.result(request.event.event_id, {"by": "remote"})
        results = sorted([(await first).payload["by"], (await second).payload["by"]])
    assert [(h["location"], h["workers"]) for h in handlers] == [("pool", 1)]
    assert results == ["in-process", "remote"]


async def test_with_authentication_a_worker_serves_only_what_its_token_allows() -> None:
    from nexus.auth import mint_token

    secret = "s" * 32
    async with run_server(**FAST, jwt_secret=secret) as nexus:
        anonymous = RawWorker(nexus.address, handler("demo:echo", streaming=False))
        assert await anonymous.connect() is None
        await anonymous.close()
        publisher = mint_token(secret, "svc", publish=["demo:>"], subscribe=["demo:>"])
        not_a_worker = RawWorker(nexus.address, handler("demo:echo", streaming=False), token=publisher)
        assert await not_a_worker.connect() is None
        await not_a_worker.close()
        other_service = mint_token(secret, "svc", serve=["billing:>"])
        elsewhere = RawWorker(nexus.address, handler("demo:echo", streaming=False), token=other_service)
        assert await elsewhere.connect() is None
        await elsewhere.close()
        serving = mint_token(secret, "svc", serve=["demo:echo:*:requested"])
        async with RawWorker(nexus.address, handler("demo:echo", streaming=False), token=serving) as worker:
            assert worker.registered is not None
    assert anonymous.status == grpc.StatusCode.UNAUTHENTICATED
    assert not_a_worker.status == grpc.StatusCode.PERMISSION_DENIED
    assert "may not serve 'demo:echo'" in not_a_worker.details
    assert elsewhere.status == grpc.StatusCode.PERMISSION_DENIED


# --- several nodes on NATS ---------------------------------------------------------------------------------------


async def test_on_nats_workers_on_different_nodes_share_a_handler_by_free_slots() -> None:
    from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names

    url = shared_nats_url()
    stream, prefix = unique_names("workers")
    settings = nats_settings(url, stream, prefix, heartbeat_interval=0.1, worker_ping_interval_s=0.1)
    try:
        async with run_server(settings=settings) as a, run_server(settings=settings) as b:
            one = handler("demo:stream_ticks", streaming=True, max_in_flight=1)
            three = handler("demo:stream_ticks", streaming=True, max_in_flight=3)
            async with RawWorker(a.address, one, name="on-a") as on_a, RawWorker(b.address, three, name="on-b") as on_b:
                # Each node takes only what its workers can start: four held requests all start at once, one on
                # node a (one slot) and three on node b (three slots), wherever they were sent.
                followers = [
                    StreamFollower(a.client.request("demo:stream_ticks:v1:requested", {"i": i}, heartbeats=False))
                    for i in range(4)
                ]
                given_a = [await on_a.request(timeout=15.0)]
                given_b = [await on_b.request(timeout=15.0) for _ in range(3)]
                for worker, given in ((on_a, given_a), (on_b, given_b)):
                    for request in given:
                        worker.result(request.event.event_id)
                ended = [await f.ended(timeout=15.0) for f in followers]
    finally:
        await delete_stream(url, stream)
    assert sorted(payload(r)["i"] for r in (*given_a, *given_b)) == [0, 1, 2, 3]
    assert [e.state for e in ended] == ["success"] * 4


async def test_a_draining_worker_gets_no_more_requests_and_finishes_what_it_has() -> None:
    from nexus.v1 import nexus_pb2

    async with run_server(**FAST) as nexus, RawWorker(
        nexus.address, handler("demo:echo", streaming=False, max_in_flight=2), name="leaving"
    ) as leaving:
        first = asyncio.create_task(nexus.client.call("demo:echo:v1:requested", {"n": 1}))
        held = await leaving.request()
        leaving.send(drain=nexus_pb2.WorkerDrain())
        await until("the server read the drain", lambda: all(w.draining for w in nexus.server.provider.workers))
        second = asyncio.create_task(nexus.client.call("demo:echo:v1:requested", {"n": 2}))
        async with RawWorker(nexus.address, handler("demo:echo", streaming=False), name="staying") as staying:
            given = await staying.request()
            staying.result(given.event.event_id, {"by": "staying"})
            leaving.result(held.event.event_id, {"by": "leaving"})
            results = [(await first).payload, (await second).payload]
            assert leaving.received.empty()
    assert results == [{"by": "leaving"}, {"by": "staying"}]


async def test_frames_a_worker_gets_wrong_are_refused_one_by_one_and_the_call_goes_on() -> None:
    from nexus.v1 import nexus_pb2

    declared = handler("demo:stream_ticks", streaming=True)
    async with run_server(**FAST) as nexus, RawWorker(nexus.address, declared) as worker:
        follower = StreamFollower(nexus.client.request("demo:stream_ticks:v1:requested", {}, heartbeats=False))
        cid = (await worker.request()).event.event_id
        worker.started(cid)
        worker.send(chunk=nexus_pb2.WorkerChunk(correlation_id=cid, payloads_json=[b"[1, 2]"]))
        not_an_object = await worker.expect("refused")
        worker.send(chunk=nexus_pb2.WorkerChunk(correlation_id=cid, payloads_json=[b'{"x": NaN}']))
        nan = await worker.expect("refused")
        worker.error(cid, "boom", type="node_lost")
        server_only_type = await worker.expect("refused")
        worker.send(register=nexus_pb2.WorkerRegister(worker_name="again"))
        second_register = await worker.expect("refused")
        worker.send()  # a message with no body
        empty = await worker.expect("refused")
        worker.started(cid)
        twice = await worker.expect("refused")
        # None of it touched the stream: it goes on and ends as the worker says.
        worker.chunks(cid, {"i": 0})
        worker.result(cid)
        ended = await follower.ended()
    assert (not_an_object.correlation_id, not_an_object.code) == (cid, "invalid_payload")
    assert nan.code == "invalid_payload"
    assert (server_only_type.code, "handler_error" in server_only_type.message) == ("protocol", True)
    assert second_register.code == empty.code == twice.code == "protocol"
    assert ended.state == "success"
    assert follower.chunks == [{"i": 0}]


async def test_a_call_that_does_not_start_with_register_or_sends_bytes_that_are_no_frame_is_refused() -> None:
    from nexus.v1 import nexus_pb2, nexus_pb2_grpc

    async with run_server(**FAST) as nexus:
        async with grpc.aio.insecure_channel(nexus.address) as channel:
            stub = nexus_pb2_grpc.WorkerServiceStub(channel)

            async def first(frame: nexus_pb2.HandleEventsRequest) -> Any:
                yield frame
                await asyncio.sleep(10)

            call = stub.HandleEvents(first(nexus_pb2.HandleEventsRequest(pong=nexus_pb2.WorkerPong(nonce=1))))
            with pytest.raises(grpc.aio.AioRpcError) as not_register:
                await call.read()
            raw = channel.stream_stream(
                "/nexus.v1.WorkerService/HandleEvents",
                request_serializer=lambda data: data,
                response_deserializer=nexus_pb2.HandleEventsResponse.FromString,
            )

            async def garbage() -> Any:
                yield b"\xff\xff\xff\xff"
                await asyncio.sleep(10)

            broken = raw(garbage())
            with pytest.raises(grpc.aio.AioRpcError) as undecodable:
                await broken.read()
        # The server still takes workers and requests.
        async with RawWorker(nexus.address, handler("demo:echo", streaming=False)) as worker:
            call_task = asyncio.create_task(nexus.client.call("demo:echo:v1:requested", {}))
            worker.result((await worker.request()).event.event_id, {"ok": True})
            done = await call_task
    assert not_register.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must be register" in (not_register.value.details() or "")
    assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert done.payload == {"ok": True}
