"""What only the NATS bus does: subjects and bodies, node membership, the stream's settings, limits and recovery.

The codec and the membership table are pure and tested without a server; the rest runs against the shared NATS
server (its own stream per test) or, for outages, a private ``nats-server`` process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats_support import (
    GUARD,
    Hold,
    NatsProcess,
    delete_stream,
    free_port,
    nats_queue_of,
    nats_server_binary,
    nats_settings,
    peers,
    shared_nats_url,
    stored_history,
    unique_names,
    until,
    wait_for_jetstream,
)

from nexus import Event, EventHandler
from nexus.bus import Subscription
from nexus.bus.nats import NatsBus, NatsSetupError
from nexus.bus.nats_codec import (
    Subjects,
    SubjectTypes,
    decode_event,
    encode_event,
    event_msg_id,
    filter_for_patterns,
    parse_ack_reply,
    request_consumer_name,
    terminal_msg_id,
)
from nexus.errors import BusUnavailable, PayloadTooLarge
from nexus.events import TERMINAL_STATES
from nexus.queue import RequestRoute
from nexus.queue.nats_members import Claim, Membership, presence_message
from nexus.testing import run_server

# --- subjects and bodies (pure) -----------------------------------------------------------------------------


def test_event_types_and_patterns_map_to_subjects_token_by_token() -> None:
    """An event type's tokens become subject tokens under the prefix; heartbeats and control stay outside."""
    subjects = Subjects("acme.nexus")
    assert subjects.events == "acme.nexus.>"
    assert subjects.for_type("demo:stream_x:v1:started") == "acme.nexus.demo.stream_x.v1.started"
    assert subjects.for_pattern("demo:*:v1:*") == "acme.nexus.demo.*.v1.*"
    assert subjects.for_pattern(">") == "acme.nexus.>"
    assert subjects.requests == "acme.nexus.*.*.*.requested"
    assert subjects.requests_for("demo:echo") == "acme.nexus.demo.echo.*.requested"
    assert subjects.live_for_type("demo:x:v1:heartbeat") == "acme.nexus_live.demo.x.v1.heartbeat"
    assert not subjects.live.startswith(subjects.events[:-1])
    assert not subjects.control.startswith(subjects.events[:-1])
    assert filter_for_patterns(subjects, ["places:>"], False) == "acme.nexus.places.>"
    assert filter_for_patterns(subjects, ["places:>", "demo:>"], False) == "acme.nexus.>"
    assert filter_for_patterns(subjects, ["places:>"], True) == "acme.nexus.>"
    assert request_consumer_name("NEXUS", "demo:echo") == "NEXUS_req_demo_echo"
    assert request_consumer_name("NEXUS", None) == "NEXUS_requests"


def test_subjects_read_back_as_event_types_and_foreign_ones_do_not() -> None:
    """Stream and live subjects turn back into event types; subjects that are no event type give None."""
    types = SubjectTypes(Subjects("nexus"))
    assert types.event_type("nexus.demo.echo.v2.success") == "demo:echo:v2:success"
    assert types.event_type("nexus_live.demo.echo.v2.heartbeat") == "demo:echo:v2:heartbeat"
    assert types.event_type("nexus.Demo.echo.v2.success") is None
    assert types.event_type("nexus.demo.echo.success") is None
    assert types.event_type("other.demo.echo.v2.success") is None


def test_an_event_round_trips_through_its_message_body() -> None:
    """An event's body keeps its id, time, payload and metadata; type and offset come from subject and stream."""
    event = Event.create("demo:x:v1:made", {"n": 1, "s": "é"}, event_id="e1", metadata={"user_id": "u"})
    body = encode_event(event)
    assert json.loads(body) == {
        "v": 1,
        "id": "e1",
        "ts": event.timestamp,
        "payload": event.payload,
        "metadata": {"user_id": "u"},
    }
    back = decode_event("demo:x:v1:made", body, offset=7, epoch="E")
    assert back == event.stored(7, "E")


def test_a_plain_json_object_from_another_tool_is_read_as_a_payload() -> None:
    """A body without the envelope becomes the payload; its id is the Nats-Msg-Id or derived from the offset."""
    foreign = decode_event("demo:x:v1:made", b'{"temperature": 21}', offset=9, epoch="E", msg_id="sensor-1")
    assert foreign is not None
    assert (foreign.payload, foreign.event_id, foreign.offset) == ({"temperature": 21}, "sensor-1", 9)
    assert foreign.timestamp.endswith("Z")
    unnamed = decode_event("demo:x:v1:made", b"{}", offset=3, epoch="E")
    assert unnamed is not None
    assert unnamed.event_id == "nats-3"
    assert decode_event("demo:x:v1:made", b"[1, 2]", offset=1, epoch="E") is None
    assert decode_event("demo:x:v1:made", b"not json", offset=1, epoch="E") is None


def test_ack_subjects_and_message_ids() -> None:
    """Ack subjects give stream and consumer sequences (both forms); ids for events and terminals differ."""
    short = parse_ack_reply("$JS.ACK.S.C.2.15.7.1700000000000000000.3")
    assert short is not None
    assert (short.stream, short.consumer, short.delivered, short.stream_seq, short.consumer_seq, short.pending) == (
        "S",
        "C",
        2,
        15,
        7,
        3,
    )
    long = parse_ack_reply("$JS.ACK.domain.account.S.C.1.16.8.1700000000000000000.0.token")
    assert long is not None
    assert (long.stream, long.stream_seq, long.consumer_seq) == ("S", 16, 8)
    assert parse_ack_reply("_INBOX.abc") is None
    assert event_msg_id("abc") != terminal_msg_id("abc")


# --- membership (pure) --------------------------------------------------------------------------------------


def _presence(node: str, since: float, *, routes: Any = (), claims: Any = (), **extra: Any) -> dict[str, Any]:
    return {
        "node": node,
        "since": since,
        "routes": [list(route) for route in routes],
        "claims": [list(claim) for claim in claims],
        "claims_total": len(claims),
        **extra,
    }


def test_a_node_is_lost_after_missing_three_heartbeats() -> None:
    """A node not heard from for three intervals is lost, with the requests it held."""
    table = Membership("me", since=0.0, interval=1.0)
    table.observe(_presence("a", 1.0, claims=[("c1", 5, True)]), now=10.0)
    table.observe(_presence("b", 2.0), now=10.0)
    assert table.expire(12.9) == []
    table.observe(_presence("b", 2.0), now=12.0)
    [lost] = table.expire(13.5)
    assert lost.node == "a"
    assert list(lost.claims) == ["c1"]
    assert [member.node for member in table.others] == ["b"]


def test_claims_follow_heartbeats_announcements_and_terminal_events() -> None:
    """A full heartbeat replaces a node's claims, announcements add, a stored terminal event removes."""
    table = Membership("me", since=0.0, interval=1.0)
    table.observe(_presence("a", 1.0, claims=[("c1", 5, True), ("c2", 6, False)]), now=1.0)
    table.add_claims({"node": "a", "claims": [["c3", 7, False]]}, now=1.0)
    assert table.holder("c3") == "a"
    table.ended("c1")
    assert table.holder("c1") is None
    table.observe(_presence("a", 1.0, claims=[("c2", 6, False)]), now=2.0)
    assert sorted(table.others[0].claims) == ["c2"]
    partial = _presence("a", 1.0, claims=[("c4", 8, False)])
    partial["claims_total"] = 5
    table.observe(partial, now=3.0)
    assert sorted(table.others[0].claims) == ["c2", "c4"]


def test_a_node_that_leaves_is_removed_at_once() -> None:
    """A heartbeat saying 'leaving' removes the node and hands back what it still held."""
    table = Membership("me", since=0.0, interval=1.0)
    table.observe(_presence("a", 1.0), now=1.0)
    left = table.observe(_presence("a", 1.0, claims=[("c9", 3, False)], leaving=True), now=2.0)
    assert left is not None
    assert list(left.claims) == ["c9"]
    assert table.others == []


def test_an_ordered_handler_has_one_active_node_that_newcomers_defer_to() -> None:
    """The oldest node serving an ordered handler is active; a node already active stays so when others join."""
    table = Membership("me", since=5.0, interval=1.0)
    table.own.routes = (RequestRoute("demo:keyed", ordered=True),)
    assert table.exclusive("demo:keyed")
    assert table.active("demo:keyed") == "me"
    older = _presence("old", 1.0, routes=[("demo:keyed", True)])
    table.observe(older, now=1.0)
    assert table.active("demo:keyed") == "old"
    table.observe({**older, "active": ["demo:keyed"]}, now=1.0)
    table.own.active = frozenset()
    table.observe(_presence("older-still", 0.5, routes=[("demo:keyed", True)]), now=1.0)
    assert table.active("demo:keyed") == "old"
    assert table.serves("demo:keyed:v3:requested")
    assert not table.serves("demo:other:v1:requested")


def test_a_heartbeat_lists_claims_that_fit_and_announces_the_rest() -> None:
    """Claims beyond one message's share go out as announcements; the heartbeat says its list is partial."""
    table = Membership("me", since=1.0, interval=1.0)
    claims = [Claim(f"c{n}", n, False) for n in range(4500)]
    message, extra = presence_message(table.own, claims)
    assert message["claims_total"] == 4500
    assert len(message["claims"]) + sum(len(item["claims"]) for item in extra) == 4500


# --- against a NATS server ----------------------------------------------------------------------------------


@pytest.fixture
async def names() -> AsyncIterator[tuple[str, str, str]]:
    """The shared server's URL and a stream and prefix for this test, deleted afterwards."""
    url = shared_nats_url()
    stream, prefix = unique_names("nats")
    try:
        yield url, stream, prefix
    finally:
        await delete_stream(url, stream)


async def _take(sub: Subscription, count: int) -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(GUARD):
        while len(events) < count:
            batch = await sub.next_batch()
            assert batch, "the subscription ended"
            events.extend(batch)
    return events


@pytest.mark.nats
async def test_the_stream_is_created_as_configured_and_updated_at_start_up(names: tuple[str, str, str]) -> None:
    """A node creates the stream with its settings; a node started with other settings updates it."""
    url, stream, prefix = names
    first = NatsBus(nats_settings(url, stream, prefix, history_size=500, dedupe_window_s=30.0).nats_bus_settings())
    await first.start()
    nc = await nats.connect(url)
    created = (await nc.jetstream().stream_info(stream)).config
    await nc.close()
    assert (created.max_msgs, created.duplicate_window) == (500, 30.0)
    second = NatsBus(nats_settings(url, stream, prefix, history_size=800, nats_max_age_s=3600.0).nats_bus_settings())
    await second.start()
    try:
        nc = await nats.connect(url)
        info = await nc.jetstream().stream_info(stream)
        await nc.close()
        config = info.config
        assert config.subjects == [f"{prefix}.>"]
        assert (config.max_msgs, config.max_age, config.num_replicas) == (800, 3600.0, 1)
        assert str(config.retention) in ("limits", "RetentionPolicy.LIMITS")
        assert config.duplicate_window == 120.0
        assert first.epoch == second.epoch
        assert first.epoch.startswith(f"{stream}@")
    finally:
        await first.close()
        await second.close()


@pytest.mark.nats
async def test_events_a_node_never_read_end_its_subscriptions_instead_of_leaving_a_silent_gap(
    names: tuple[str, str, str],
) -> None:
    """A node's tail that lost events it never read (its consumer gone while the stream moved past them) ends its
    subscriptions, so they resume from their last offset and are told the gap could not be replayed."""
    url, stream, prefix = names
    settings = nats_settings(url, stream, prefix, history_size=5).nats_bus_settings()
    reader, publisher = NatsBus(settings), NatsBus(settings)
    await reader.start()
    await publisher.start()
    try:
        sub = await reader.subscribe([">"])
        for n in range(3):
            await publisher.publish(Event.create("demo:x:v1:made", {"n": n}))
        assert [event.offset for event in await _take(sub, 3)] == [1, 2, 3]
        # The fault: the reader's tail consumer disappears on the server (as an in-memory consumer does when its
        # NATS server restarts); while it is gone the stream moves on and drops offsets 4 to 8 (history_size 5).
        nc = await nats.connect(url)
        try:
            await nc.jetstream().delete_consumer(stream, reader._tail.consumer)
        finally:
            await nc.close()
        for n in range(3, 13):
            await publisher.publish(Event.create("demo:x:v1:made", {"n": n}))
        late: list[Event] = []
        with anyio.fail_after(GUARD):
            while batch := await sub.next_batch():
                late.extend(batch)
        assert late == []
        assert sub.closed
        await until("the reader's tail read the rest", lambda: reader.received == 13)
        resumed = await reader.subscribe([">"], since_offset=3, epoch=reader.epoch)
        assert resumed.recovered is False
    finally:
        await reader.close()
        await publisher.close()


@pytest.mark.nats
async def test_a_recreated_stream_is_a_new_epoch(names: tuple[str, str, str]) -> None:
    """A stream deleted and created again has another epoch, so resuming with the old one says recovered False."""
    url, stream, prefix = names
    bus = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    await bus.start()
    await bus.publish(Event.create("demo:x:v1:made"))
    old_epoch = bus.epoch
    await bus.close()
    await delete_stream(url, stream)
    again = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    await again.start()
    try:
        assert again.epoch != old_epoch
        sub = await again.subscribe([">"], since_offset=1, epoch=old_epoch)
        assert sub.recovered is False
    finally:
        await again.close()


@pytest.mark.nats
async def test_start_fails_clearly_when_nats_cannot_carry_the_payload_limit(names: tuple[str, str, str]) -> None:
    """A payload limit the server's max_payload cannot carry stops start-up with an error saying what to change."""
    url, stream, prefix = names
    bus = NatsBus(nats_settings(url, stream, prefix, max_payload_bytes=1024 * 1024).nats_bus_settings())
    with pytest.raises(NatsSetupError, match=r"max_payload.*max_payload_bytes \(1048576\)"):
        await bus.start()
    assert not bus.healthy


@pytest.mark.nats
async def test_start_fails_with_unavailable_when_nats_does_not_answer() -> None:
    """With no NATS server at the URL, start raises BusUnavailable naming the URL."""
    url = f"nats://127.0.0.1:{free_port()}"
    bus = NatsBus(nats_settings(url, "NOPE", "nope").nats_bus_settings(), connect_timeout_s=0.5)
    with pytest.raises(BusUnavailable, match=r"cannot connect to NATS at nats://127\.0\.0\.1"):
        await bus.start()


@pytest.mark.nats
async def test_an_event_too_large_for_nats_is_refused(names: tuple[str, str, str]) -> None:
    """An event whose payload and metadata together exceed the server's max_payload raises PayloadTooLarge."""
    url, stream, prefix = names
    bus = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    await bus.start()
    try:
        # Built directly: Event.create would refuse it (over max_event_bytes); the bus checks its own limit too.
        event = Event("demo:x:v1:made", {"blob": "x" * 999_000}, metadata={"note": "y" * 60_000})
        with pytest.raises(PayloadTooLarge, match="max_payload"):
            await bus.publish(event)
        assert await bus.head_offset() == 0
    finally:
        await bus.close()


@pytest.mark.nats
async def test_messages_other_nats_tools_publish_on_nexus_subjects_are_events(names: tuple[str, str, str]) -> None:
    """A JSON object published with a NATS tool on a Nexus subject reaches subscribers as an event."""
    url, stream, prefix = names
    bus = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    await bus.start()
    try:
        sub = await bus.subscribe(["sensors:>"])
        nc = await nats.connect(url)
        await nc.jetstream().publish(
            f"{prefix}.sensors.temp.v1.read", b'{"celsius": 21.5}', headers={"Nats-Msg-Id": "r1"}
        )
        await nc.close()
        [event] = await _take(sub, 1)
        assert (event.event_type, event.payload, event.event_id, event.offset) == (
            "sensors:temp:v1:read",
            {"celsius": 21.5},
            "r1",
            1,
        )
    finally:
        await bus.close()


class Waiter(EventHandler):
    """Answers once ``release`` is set."""

    event_type = "nats:wait"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def handle(self, event: Event) -> dict[str, Any]:
        self.started.set()
        await self.release.wait()
        return {"done": True}


class EchoV2(EventHandler):
    event_type = "nats:echo:v2"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"version": 2}


class EchoAny(EventHandler):
    event_type = "nats:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"version": "any"}


@pytest.mark.nats
async def test_a_request_for_a_version_only_another_node_serves_goes_to_it(names: tuple[str, str, str]) -> None:
    """Nodes serving different versions of one action share its consumer; each version reaches a node serving it."""
    url, stream, prefix = names
    settings = nats_settings(url, stream, prefix)
    async with run_server(EchoV2(), settings=settings) as pinned, run_server(EchoAny(), settings=settings) as anyv:
        await until("the nodes know each other", lambda: peers(pinned) == 1)
        async with asyncio.timeout(GUARD):
            for _ in range(6):
                v1 = await pinned.client.call("nats:echo:v1:requested", {})
                assert (v1.state, v1.payload) == ("success", {"version": "any"})
            v3 = await anyv.client.call("nats:echo:v3:requested", {})
        assert v3.state == "success"


@pytest.mark.nats
async def test_a_terminal_event_that_could_not_be_stored_is_stored_once_nats_is_back(tmp_path: Path) -> None:
    """A request that ends while NATS is down gets its terminal event stored, and delivered, after the restart."""
    nats_server_binary()
    server = NatsProcess(tmp_path / "nats")
    server.start()
    await server.wait_listening()
    await wait_for_jetstream(server.url)
    stream, prefix = unique_names("outbox")
    waiter = Waiter()
    try:
        settings = nats_settings(server.url, stream, prefix, nats_storage="file")
        async with run_server(waiter, settings=settings) as node:
            request = node.client.request("nats:wait:v1:requested", {})
            events: list[Event] = []

            async def follow() -> None:
                async for event in request:
                    events.append(event)

            following = asyncio.create_task(follow())
            with anyio.fail_after(GUARD):
                await waiter.started.wait()
            server.stop()
            await until("the node notices", lambda: not node.bus.healthy)
            waiter.release.set()
            await until("the handler's success waits to be stored", lambda: bool(nats_queue_of(node).outbox))
            server.start()
            with anyio.fail_after(GUARD):
                await following
            assert [(event.state, event.payload) for event in events] == [("success", {"done": True})]
            # The requester stops at its first terminal event: the stream itself shows it was stored once.
            await until("the node's outbox is empty", lambda: not nats_queue_of(node).outbox)
            terminals = [
                event.state
                for event in await stored_history(node.bus)
                if event.correlation_id == request.correlation_id and event.state in TERMINAL_STATES
            ]
            assert terminals == ["success"]
    finally:
        server.stop()


@pytest.mark.nats
async def test_a_node_counted_lost_lets_its_requests_go(names: tuple[str, str, str]) -> None:
    """When the others count a silent node lost, they fail its requests once and it publishes nothing more for them."""
    url, stream, prefix = names
    settings = nats_settings(url, stream, prefix, heartbeat_interval=0.05)
    hold = Hold()
    async with run_server(hold, settings=settings) as silent, run_server(settings=settings) as other:
        await until("the nodes know each other", lambda: peers(other) == 1)
        watcher = await other.record("nodes:stream_hold:>")
        stream_events: list[Event] = []
        request = other.client.request("nodes:stream_hold:v1:requested", {}, heartbeats=False)
        async with asyncio.timeout(GUARD):
            async for event in request:
                stream_events.append(event)
                if event.state == "stream":

                    async def quiet(**_: Any) -> None:
                        return None

                    nats_queue_of(silent)._announce = quiet  # type: ignore[method-assign]
        assert [event.state for event in stream_events] == ["started", "stream", "failed"]
        assert stream_events[-1].payload["error"]["type"] == "node_lost"
        await until("the silent node let the stream go", lambda: hold.cancelled == [request.correlation_id])
        await asyncio.sleep(0.3)
        after = [e for e in watcher.events if e.offset > stream_events[-1].offset or e.state == "heartbeat"]
        assert [e for e in after if e.correlation_id == request.correlation_id and e.state != "heartbeat"] == []
        terminals = [e for e in watcher.events if e.state in TERMINAL_STATES]
        assert len(terminals) == 1
        assert silent.server.provider.streams() == []
        await watcher.stop()


# --- windowed publishing and tail batches -------------------------------------------------------------------


def _windowed(
    url: str, stream: str, prefix: str, window: int, window_bytes: int = 1 << 22, **overrides: Any
) -> NatsBus:
    settings = nats_settings(url, stream, prefix, **overrides).nats_bus_settings()
    return NatsBus(dataclasses.replace(settings, publish_window=window, publish_window_bytes=window_bytes))


@pytest.mark.nats
@pytest.mark.parametrize(("window", "window_bytes"), [(64, 1 << 22), (256, 1000)])
async def test_concurrent_publishes_each_get_their_own_offset_in_call_order(
    names: tuple[str, str, str], window: int, window_bytes: int
) -> None:
    """500 publishes called at once (more than the window holds, in messages or in bytes) are stored in the
    order they were called, each caller told its own offset, and a subscriber receives them in that order,
    several per batch."""
    url, stream, prefix = names
    bus = _windowed(url, stream, prefix, window, window_bytes)
    await bus.start()
    try:
        sub = await bus.subscribe(["load:>"], max_pending=1000)
        handed: list[int] = []
        bus.on_delivery(lambda batch: handed.append(len(batch)))
        events = [Event.create("load:item:v1:made", {"i": i}) for i in range(500)]
        with anyio.fail_after(GUARD):
            results = await asyncio.gather(*(bus.publish(event) for event in events))
        assert [r.event.offset for r in results] == list(range(1, 501))
        assert [r.event.event_id for r in results] == [e.event_id for e in events]
        assert not any(r.duplicate for r in results)
        batches: list[list[Event]] = []
        with anyio.fail_after(GUARD):
            while sum(map(len, batches)) < 500:
                batches.append(await sub.next_batch())
        received = [event for batch in batches for event in batch]
        assert [(e.offset, e.payload["i"]) for e in received] == [(i + 1, i) for i in range(500)]
        assert sum(handed) == 500
        assert len(handed) < 250, "the tail hands the fan-out whole batches, not one event at a time"
    finally:
        await bus.close()


@pytest.mark.nats
async def test_a_duplicate_inside_a_window_is_answered_with_the_original(names: tuple[str, str, str]) -> None:
    """Two publishes of one event_id in flight together: the first is stored, the second gets that original."""
    url, stream, prefix = names
    bus = _windowed(url, stream, prefix, 256)
    await bus.start()
    try:
        first = Event.create("dup:item:v1:made", {"v": "first"}, event_id="same-id")
        again = Event.create("dup:item:v1:made", {"v": "again"}, event_id="same-id")
        others = [Event.create("dup:item:v1:made", {"v": i}) for i in range(20)]
        with anyio.fail_after(GUARD):
            results = await asyncio.gather(*(bus.publish(e) for e in [*others[:10], first, again, *others[10:]]))
        original, duplicate = results[10], results[11]
        assert (original.duplicate, original.event.offset, original.event.payload) == (False, 11, {"v": "first"})
        assert duplicate.duplicate
        assert (duplicate.event.offset, duplicate.event.payload) == (11, {"v": "first"})
        assert [r.event.offset for r in results[12:]] == list(range(12, 22))
        assert await bus.head_offset() == 21
    finally:
        await bus.close()


@pytest.mark.nats
async def test_a_server_lost_mid_window_fails_the_unacknowledged_publishes_at_once(tmp_path: Path) -> None:
    """NATS stopped with publishes in flight: each one either has its offset or fails with BusUnavailable, long
    before the ack timeout; once NATS is back, publishing works again."""
    nats_server_binary()
    server = NatsProcess(tmp_path / "nats")
    server.start()
    await server.wait_listening()
    await wait_for_jetstream(server.url)
    stream, prefix = unique_names("window")
    bus = _windowed(server.url, stream, prefix, 32, nats_storage="file", nats_ack_timeout_s=120.0)
    try:
        await bus.start()
        events = [Event.create("lost:item:v1:made", {"i": i}) for i in range(3000)]
        tasks = [asyncio.create_task(bus.publish(event)) for event in events]
        await until("some publishes are stored", lambda: sum(task.done() for task in tasks) >= 50)
        server.stop()
        with anyio.fail_after(GUARD):  # far less than the 120 s ack timeout
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        stored = [o for o in outcomes if not isinstance(o, BaseException)]
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(stored) >= 50
        assert failed, "the server stopped with publishes in flight"
        assert all(isinstance(error, BusUnavailable) for error in failed), failed[:3]
        offsets = [published.event.offset for published in stored]
        assert offsets == sorted(set(offsets))

        server.start()
        await until("the bus is healthy again", lambda: bus.healthy)
        with anyio.fail_after(GUARD):
            after = await bus.publish(Event.create("lost:item:v1:made", {"i": "after"}))
        assert after.event.offset > max(offsets)
    finally:
        await bus.close()
        server.stop()


@pytest.mark.nats
async def test_a_bad_message_in_a_tail_batch_is_quarantined_alone(names: tuple[str, str, str]) -> None:
    """Among messages the tail reads together, one that is no event is skipped and counted; the rest arrive."""
    url, stream, prefix = names
    bus = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    await bus.start()
    try:
        sub = await bus.subscribe(["bad:>"])
        nc = await nats.connect(url)
        js = nc.jetstream()
        bodies = [encode_event(Event.create("bad:item:v1:made", {"i": i})) for i in range(6)]
        bodies[2] = b'{"v": 1, "payload": {"i": 2'  # cut short: not JSON
        futures = [await js.publish_async(f"{prefix}.bad.item.v1.made", body) for body in bodies]
        await asyncio.gather(*futures)
        await nc.close()
        received = await _take(sub, 5)
        assert [(e.offset, e.payload["i"]) for e in received] == [(1, 0), (2, 1), (4, 3), (5, 4), (6, 5)]
        assert bus.quarantined == 1
        assert bus.stats().quarantined == 1
    finally:
        await bus.close()


@pytest.mark.nats
async def test_an_event_this_node_sends_is_read_back_as_any_node_reads_it(names: tuple[str, str, str]) -> None:
    """The sending node delivers what another node reads from the stream: the same event, and an event no node
    accepts (a timestamp that is no time, built without the checks) is quarantined on the sender too."""
    url, stream, prefix = names
    sender = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    other = NatsBus(nats_settings(url, stream, prefix).nats_bus_settings())
    await sender.start()
    await other.start()
    try:
        here, there = await sender.subscribe(["same:>"]), await other.subscribe(["same:>"])
        bad = Event("same:item:v1:made", {"i": 0}, timestamp="yesterday")
        good = Event.create("same:item:v1:made", {"i": 1, "text": "é\u2028"}, metadata={"k": "v"})
        assert (await sender.publish(bad)).event.offset == 1
        assert (await sender.publish(good)).event.offset == 2
        [mine], [theirs] = await _take(here, 1), await _take(there, 1)
        assert mine == theirs == good.stored(2, sender.epoch)
        assert sender.quarantined == other.quarantined == 1
    finally:
        await sender.close()
        await other.close()


@pytest.mark.nats
async def test_publishes_jetstream_does_not_acknowledge_in_time_fail_alone(tmp_path: Path) -> None:
    """A frozen NATS server (connection up, no answer): each publish in flight fails with BusUnavailable after the
    ack timeout, saying it may be stored; once the server runs again, publishing works."""
    nats_server_binary()
    server = NatsProcess(tmp_path / "nats")
    server.start()
    await server.wait_listening()
    await wait_for_jetstream(server.url)
    stream, prefix = unique_names("frozen")
    bus = _windowed(server.url, stream, prefix, 4, nats_ack_timeout_s=0.5)
    try:
        await bus.start()
        await server.freeze()
        try:
            with anyio.fail_after(GUARD):
                outcomes = await asyncio.gather(
                    *(bus.publish(Event.create("frozen:item:v1:made", {"i": i})) for i in range(10)),
                    return_exceptions=True,
                )
        finally:
            server.thaw()
        assert all(isinstance(outcome, BusUnavailable) for outcome in outcomes), outcomes
        assert all("did not acknowledge the event within 0.5s" in str(outcome) for outcome in outcomes), outcomes
        await until("the bus is healthy", lambda: bus.healthy)
        with anyio.fail_after(GUARD):
            after = await bus.publish(Event.create("frozen:item:v1:made", {"i": "after"}))
        assert after.event.offset >= 1
    finally:
        await bus.close()
        server.stop()
