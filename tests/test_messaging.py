"""The messaging plugin: conversation state (pure), the SQLite store, and every event end to end."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from nexus.handlers.messaging.conversations import (
    AfterMessage,
    InvalidRequest,
    Message,
    PresenceBoard,
    SinceTime,
    TypingBoard,
    actor,
    new_message_id,
    parse_since,
    rfc3339,
)
from nexus.handlers.messaging.plugin import (
    FellBehind,
    SendMessage,
    SetTyping,
    StreamMessages,
    StreamPresence,
    StreamTyping,
    _Inbox,
)
from nexus.handlers.messaging.store import MessageStore, UnknownMessage

from nexus import Event, parse_time
from nexus.bus.memory import MemoryBus
from nexus.plugins import HandlerSpec, discover
from nexus.queue import MemoryRequestQueue
from nexus.testing import StreamFollower, TestServer, run_server

GUARD = 10.0
SEND = "messaging:send_message:v1:requested"
STREAM = "messaging:stream_messages:v1:requested"


# --- pure: ids, cursors, typing, presence ------------------------------------------------------------------------


def test_message_ids_are_ulids_that_sort_by_time() -> None:
    """An id is 26 Crockford base32 characters; the first ten encode the milliseconds, so later ids sort later."""
    zero = new_message_id(0, bytes(10))
    assert zero == "0" * 26
    # 1 ms later and all-ones entropy: the time part is ...01, the 80 random bits all 1 (Z = 31)
    assert new_message_id(0.001, b"\xff" * 10) == "0000000001" + "Z" * 16
    ids = [new_message_id(1736150400 + i / 1000, os.urandom(10)) for i in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


def test_since_is_a_message_id_or_a_time() -> None:
    """since reads as a message id when it has an id's shape, otherwise as RFC 3339 text or epoch seconds."""
    message_id = new_message_id(1736150400, bytes(10))
    assert parse_since(None) is None
    assert parse_since(message_id) == AfterMessage(message_id)
    assert parse_since("2025-01-06T08:00:00Z") == SinceTime(1736150400.0)
    assert parse_since(1736150400) == SinceTime(1736150400.0)
    with pytest.raises(InvalidRequest, match="neither a message id nor a time"):
        parse_since("yesterday")
    with pytest.raises(InvalidRequest, match="since must be"):
        parse_since(True)


def test_the_authenticated_user_acts_before_any_claimed_one() -> None:
    """metadata.user_id wins over the payload's user_id, which wins over the anonymous name; the payload's claim
    counts only when the server marked the request unverified (`auth: none`, authentication off)."""
    unverified = {"auth": "none"}
    assert actor({"user_id": "ada", **unverified}, {"user_id": "eve"}, "anon") == "ada"
    assert actor(unverified, {"user_id": "eve"}, "anon") == "eve"
    assert actor(unverified, {}, "anon") == "anon"
    assert actor({"user_id": "ada"}, {"user_id": "eve"}, "anon") == "ada"
    assert actor({}, {"user_id": "eve"}, "anon") == "anon"  # verified (the server's own request): no claims


def test_typing_indicator_expires_by_itself_and_refreshing_extends_it() -> None:
    """Set at 0 with ttl 5 it lapses at 5; set again at 3 it lapses at 8; clearing reports 'stopped'."""
    board = TypingBoard()
    change = board.set("c", "ada", True, 5.0, now=0.0)
    assert change is not None
    assert (change.reason, change.users) == ("typing", ("ada",))
    assert board.set("c", "ada", True, 5.0, now=3.0) is None  # a refresh changes nothing visible
    assert board.expire(7.9) == []
    [expired] = board.expire(8.0)
    assert (expired.user_id, expired.typing, expired.reason, expired.users) == ("ada", False, "expired", ())
    assert len(board) == 0  # the idle conversation is gone
    board.set("c", "ada", True, 5.0, now=10.0)
    board.set("c", "bob", True, 5.0, now=11.0)
    stopped = board.set("c", "ada", False, 5.0, now=12.0)
    assert stopped is not None
    assert (stopped.reason, stopped.users) == ("stopped", ("bob",))
    assert [c.user_id for c in board.expire(100.0)] == ["bob"]  # ada's old deadline is stale, not reported


def test_typing_board_is_bounded() -> None:
    """Past max_conversations the least recently changed conversation is dropped; typers per room are capped."""
    board = TypingBoard(max_conversations=2, max_typers=2)
    for conversation in ("a", "b", "c"):
        board.set(conversation, "u", True, 5.0, now=0.0)
    assert len(board) == 2
    assert board.typing("a") == ()
    for i, user in enumerate(("x", "y", "z")):
        board.set("c", user, True, 5.0, now=float(i))
    assert len(board.typing("c")) == 2


def test_presence_counts_each_users_streams() -> None:
    """A user joins with their first started stream and leaves with their last; requests that never start count not."""
    board = PresenceBoard()
    board.requested("r1", "c", "ada")
    board.requested("r2", "c", "ada")
    board.requested("r3", "c", "bob")
    [joined] = board.started("r1")
    assert (joined.user_id, joined.status, joined.present) == ("ada", "joined", ("ada",))
    assert board.started("r2") == []  # ada's second stream
    assert board.ended("r3") == []  # bob's request failed before it started
    assert board.present("c") == ("ada",)
    assert board.ended("r1") == []
    [left] = board.ended("r2")
    assert (left.user_id, left.status, left.present) == ("ada", "left", ())
    assert board.ended("r2") == []  # a repeated terminal event changes nothing
    assert board.streams == 0


def test_presence_board_is_bounded() -> None:
    """Past max_streams the oldest stream is forgotten and reported as its user leaving."""
    board = PresenceBoard(max_streams=1, max_pending=1)
    board.requested("r1", "c", "ada")
    board.started("r1")
    board.requested("r2", "c", "bob")
    board.requested("r3", "c", "cy")  # pushes r2 out of the pending requests
    assert board.started("r2") == []
    changes = board.started("r3")
    assert [(c.user_id, c.status) for c in changes] == [("ada", "left"), ("cy", "joined")]
    assert (board.streams, board.pending) == (1, 0)


# --- the store ---------------------------------------------------------------------------------------------------


def message(conversation: str, text: str, at: float) -> Message:
    return Message(new_message_id(at, os.urandom(10)), conversation, "ada", text, rfc3339(at), at)


def test_store_history_since_a_message_a_time_and_a_limit(tmp_path: Path) -> None:
    """History is oldest first; since an id excludes it, since a time includes it; the limit keeps the newest."""
    store = MessageStore(tmp_path / "m.sqlite3")
    store.open()
    sent = [message("c", f"m{i}", 1000.0 + i) for i in range(5)]
    seqs = [store.add(m) for m in sent]
    store.add(message("other", "x", 1000.0))

    def texts(rows: Any) -> list[str]:
        return [m.text for _, m in rows]

    rows, head = store.history("c", None, 100)
    assert texts(rows) == ["m0", "m1", "m2", "m3", "m4"]
    assert head == seqs[-1]
    assert texts(store.history("c", AfterMessage(sent[1].message_id), 100)[0]) == ["m2", "m3", "m4"]
    assert texts(store.history("c", SinceTime(1002.0), 100)[0]) == ["m2", "m3", "m4"]
    assert texts(store.history("c", None, 2)[0]) == ["m3", "m4"]
    assert store.history("empty", None, 10) == ([], 0)
    with pytest.raises(UnknownMessage, match="has no message"):
        store.history("other", AfterMessage(sent[0].message_id), 10)
    store.close()


def test_store_insert_is_idempotent_by_message_id(tmp_path: Path) -> None:
    """Storing a message again (replicated from the bus) keeps one copy and returns its first seq."""
    store = MessageStore(tmp_path / "m.sqlite3")
    store.open()
    first = message("c", "hello", 1.0)
    seq = store.add(first)
    assert store.add(first) == seq
    assert store.count("c") == 1
    store.close()


def test_store_refuses_a_bad_synchronous_mode(tmp_path: Path) -> None:
    """The synchronous setting is checked before anything is opened."""
    with pytest.raises(ValueError, match="synchronous must be one of"):
        MessageStore(tmp_path / "m.sqlite3", synchronous="sometimes")


async def test_inbox_ends_a_stream_that_falls_behind() -> None:
    """Past its capacity an inbox drops what waits and makes the stream end, so the client resumes with since."""
    inbox: Any = _Inbox(2)
    inbox.put(1)
    inbox.put(2)
    assert await inbox.get() == 1
    inbox.put(3)
    inbox.put(4)  # 2, 3 wait: full
    with pytest.raises(FellBehind):
        await inbox.get()


# --- end to end ----------------------------------------------------------------------------------------------------


def messaging_handlers() -> list[HandlerSpec]:
    """Fresh instances of the five handlers, named as their entry points."""
    classes = {
        "messaging.send_message": SendMessage,
        "messaging.stream_messages": StreamMessages,
        "messaging.set_typing": SetTyping,
        "messaging.stream_typing": StreamTyping,
        "messaging.stream_presence": StreamPresence,
    }
    return [HandlerSpec(name, cls(), "test") for name, cls in classes.items()]


def config(tmp_path: Path, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"messaging": {"db_path": str(tmp_path / "messages.sqlite3"), **extra}}


def follow(nexus: TestServer, event_type: str, payload: dict[str, Any], user: str | None = None) -> StreamFollower:
    metadata = {"user_id": user} if user else None
    return StreamFollower(nexus.client.request(event_type, payload, metadata=metadata, heartbeats=False))


def message_of(payload: dict[str, Any]) -> dict[str, Any]:
    """A send_message success payload without the conversation's participants: the message as streams send it."""
    return {key: value for key, value in payload.items() if key != "participants"}


async def send(nexus: TestServer, conversation: str, text: str, user: str = "ada") -> Event:
    done = await asyncio.wait_for(
        nexus.client.call(SEND, {"conversation_id": conversation, "text": text}, metadata={"user_id": user}), GUARD
    )
    assert done.state == "success", done.payload
    return done


async def test_send_message_stores_it_with_the_authenticated_sender(tmp_path: Path) -> None:
    """send_message answers {message_id, conversation_id, sender, text, sent_at, participants}, the sender being
    metadata.user_id."""
    async with run_server(*messaging_handlers(), handler_config=config(tmp_path)) as nexus:
        done = await send(nexus, "team", "hello", user="ada")
        payload = done.payload
        assert set(payload) == {"message_id", "conversation_id", "sender", "text", "sent_at", "participants"}
        assert (payload["conversation_id"], payload["sender"], payload["text"]) == ("team", "ada", "hello")
        assert payload["participants"] == ["ada"]
        assert abs(parse_time(payload["sent_at"]) - parse_time(done.timestamp)) < 60
        claimed = await nexus.client.call(SEND, {"conversation_id": "team", "text": "hi", "user_id": "eve"})
        assert claimed.payload["sender"] == "eve"  # no authenticated user: the claimed one
        spoof = await nexus.client.call(
            SEND, {"conversation_id": "team", "text": "hi", "user_id": "eve"}, metadata={"user_id": "bob"}
        )
        assert spoof.payload["sender"] == "bob"
        anonymous = await nexus.client.call(SEND, {"conversation_id": "team", "text": "hi"})
        assert anonymous.payload["sender"] == "anonymous"


async def test_stream_messages_sends_history_then_live_messages(tmp_path: Path) -> None:
    """A stream sends the stored messages (live false), then new ones (live true), until cancelled."""
    async with run_server(*messaging_handlers(), handler_config=config(tmp_path), heartbeat_interval=0) as nexus:
        old = [(await send(nexus, "team", f"old {i}")).payload for i in range(3)]
        await send(nexus, "elsewhere", "not this conversation")
        stream = follow(nexus, STREAM, {"conversation_id": "team"})
        await stream.wait_for(lambda chunks: len(chunks) == 3)
        new = [(await send(nexus, "team", f"new {i}")).payload for i in range(2)]
        chunks = await stream.wait_for(lambda chunks: len(chunks) == 5)
        assert [c["message_id"] for c in chunks] == [m["message_id"] for m in old + new]
        assert [c["live"] for c in chunks] == [False, False, False, True, True]
        assert chunks[0] == {**message_of(old[0]), "live": False}
        terminal = await stream.cancel()
        assert terminal.state == "cancelled"
        assert terminal.payload["stream_count"] == 5


async def test_no_gap_or_duplicate_between_history_and_live(tmp_path: Path) -> None:
    """Messages sent while a stream starts reach it exactly once each, in the order they were stored."""
    async with run_server(*messaging_handlers(), handler_config=config(tmp_path), heartbeat_interval=0) as nexus:
        first = [asyncio.create_task(send(nexus, "race", f"m{i}")) for i in range(15)]
        stream = follow(nexus, STREAM, {"conversation_id": "race"})
        second = [asyncio.create_task(send(nexus, "race", f"n{i}")) for i in range(15)]
        sent = [task.result().payload["message_id"] for task in await asyncio.wait_for(_all(first + second), GUARD)]
        last = (await send(nexus, "race", "last")).payload["message_id"]
        chunks = await stream.wait_for(lambda chunks: any(c["message_id"] == last for c in chunks))
        ids = [c["message_id"] for c in chunks]
        assert len(ids) == len(set(ids)) == 31
        assert set(ids) == {*sent, last}
        history = follow(nexus, STREAM, {"conversation_id": "race"})
        stored = await history.wait_for(lambda chunks: len(chunks) == 31)
        assert [c["message_id"] for c in stored] == ids  # live order = store order
        await stream.cancel()
        await history.cancel()


async def _all(tasks: list[asyncio.Task[Event]]) -> list[asyncio.Task[Event]]:
    await asyncio.gather(*tasks)
    return tasks


async def test_stream_messages_since_an_id_a_time_and_the_limit(tmp_path: Path) -> None:
    """since = a message id starts after it; since = a time starts at it; history keeps the most recent limit."""
    async with run_server(
        *messaging_handlers(), handler_config=config(tmp_path, history_limit=3), heartbeat_interval=0
    ) as nexus:
        sent = [(await send(nexus, "team", f"m{i}")).payload for i in range(5)]

        async def history(payload: dict[str, Any], count: int) -> list[str]:
            stream = follow(nexus, STREAM, {"conversation_id": "team", **payload})
            chunks = await stream.wait_for(lambda chunks: len(chunks) >= count)
            await stream.cancel()
            assert len(stream.chunks) == count
            return [c["text"] for c in chunks]

        assert await history({"since": sent[2]["message_id"]}, 2) == ["m3", "m4"]
        assert await history({"since": sent[3]["sent_at"]}, 2) == ["m3", "m4"]
        assert await history({"since": parse_time(sent[4]["sent_at"])}, 1) == ["m4"]
        assert await history({}, 3) == ["m2", "m3", "m4"]  # history_limit 3: the most recent three
        assert await history({"limit": 1}, 1) == ["m4"]
        stream = follow(nexus, STREAM, {"conversation_id": "team", "since": sent[4]["message_id"]})
        await send(nexus, "team", "after")
        assert [c["text"] for c in await stream.wait_for(lambda chunks: len(chunks) == 1)] == ["after"]
        await stream.cancel()


async def _wait_until_stored(path: Path, count: int) -> None:
    """Wait (bounded) until the SQLite file at ``path`` holds ``count`` messages."""
    store = MessageStore(path)
    store.open()
    try:
        for _ in range(200):
            if store.count() >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path.name} holds {store.count()} messages, not {count}")
    finally:
        store.close()


async def test_message_sent_through_another_node_arrives_live_and_is_kept(tmp_path: Path) -> None:
    """Two nodes on one bus, each with its own database: a stream gets every message whichever node stored it,
    and each node's database ends up with all of them."""

    class CountingSend(SendMessage):  # type: ignore[misc]  # mypy sees nexus.handlers as Any
        calls = 0

        async def handle(self, event: Event) -> Any:
            self.calls += 1
            return await super().handle(event)

    bus = MemoryBus()
    queue = MemoryRequestQueue(bus)  # one queue for both nodes: they share its requests
    nodes = []
    for name in ("a", "b"):
        specs = messaging_handlers()
        specs[0] = HandlerSpec("messaging.send_message", CountingSend(), "test")
        nodes.append((specs[0].handler, {"messaging": {"db_path": str(tmp_path / f"{name}.sqlite3")}}, specs))
    (send_a, config_a, specs_a), (send_b, config_b, specs_b) = nodes
    async with (
        run_server(*specs_a, handler_config=config_a, bus=bus, queue=queue, heartbeat_interval=0) as node_a,
        run_server(*specs_b, handler_config=config_b, bus=bus, queue=queue, heartbeat_interval=0),
    ):
        stream = follow(node_a, STREAM, {"conversation_id": "team"})
        marker = (await send(node_a, "team", "marker")).payload["message_id"]
        await stream.wait_for(lambda chunks: len(chunks) == 1)  # from now on the stream is live
        sent = [(await send(node_a, "team", f"m{i}")).payload["message_id"] for i in range(6)]
        chunks = await stream.wait_for(lambda chunks: len(chunks) == 7)
        assert [c["message_id"] for c in chunks] == [marker, *sent]
        assert all(c["live"] for c in chunks[1:])
        sent.insert(0, marker)
        assert isinstance(send_a, CountingSend)
        assert isinstance(send_b, CountingSend)
        assert send_a.calls > 0
        assert send_b.calls > 0  # requests are shared between the nodes: both stored some
        await stream.cancel()
        # Each node copies the other's messages as their success events reach it: wait for both copies.
        for name in ("a", "b"):
            await _wait_until_stored(tmp_path / f"{name}.sqlite3", len(sent))
    for name in ("a", "b"):
        store = MessageStore(tmp_path / f"{name}.sqlite3")
        store.open()
        rows, _ = store.history("team", None, 100)
        # Every message is kept on every node. The order of a node's history is the order that node stored
        # them in, which can differ between nodes for messages sent at nearly the same time.
        assert sorted(m.message_id for _, m in rows) == sorted(sent)
        assert len(rows) == len(sent)
        store.close()


async def test_a_success_event_published_by_another_node_is_streamed_and_replicated(tmp_path: Path) -> None:
    """A send_message success on the bus that this node never handled is delivered live and then in history."""
    async with run_server(*messaging_handlers(), handler_config=config(tmp_path), heartbeat_interval=0) as nexus:
        stream = follow(nexus, STREAM, {"conversation_id": "team"})
        marker = (await send(nexus, "team", "marker")).payload
        await stream.wait_for(lambda chunks: len(chunks) == 1)  # from now on the stream is live
        remote = {
            "message_id": new_message_id(1736150400, os.urandom(10)),
            "conversation_id": "team",
            "sender": "zoe",
            "text": "from node b",
            "sent_at": "2025-01-06T08:00:00Z",
        }
        # As another node's provider stores them on a shared bus (clients may not publish a handled type's success).
        await nexus.bus.publish(Event.create("messaging:send_message:v1:success", remote))
        await nexus.bus.publish(
            Event.create("messaging:send_message:v1:success", {"conversation_id": "team", "text": 3})
        )
        live = await stream.wait_for(lambda chunks: len(chunks) == 2)
        assert live[1] == {**remote, "live": True}  # the malformed one is skipped
        later = follow(nexus, STREAM, {"conversation_id": "team"})
        stored = await later.wait_for(lambda chunks: len(chunks) == 2)
        assert stored == [{**message_of(marker), "live": False}, {**remote, "live": False}]
        await stream.cancel()
        await later.cancel()


async def test_messages_survive_a_restart(tmp_path: Path) -> None:
    """Messages sent to one server are the history of the next server started on the same database file."""
    specs = [s for s in discover(True, (), ()) if s.name.startswith("messaging.")]
    assert sorted(s.name for s in specs) == sorted(s.name for s in messaging_handlers())
    async with run_server(*specs, handler_config=config(tmp_path)) as first:
        sent = [(await send(first, "team", f"before restart {i}")).payload for i in range(3)]
    specs = [s for s in discover(True, (), ()) if s.name.startswith("messaging.")]  # new instances
    async with run_server(*specs, handler_config=config(tmp_path), heartbeat_interval=0) as second:
        stream = follow(second, STREAM, {"conversation_id": "team"})
        chunks = await stream.wait_for(lambda chunks: len(chunks) == 3)
        assert [{k: v for k, v in c.items() if k != "live"} for c in chunks] == [message_of(m) for m in sent]
        await send(second, "team", "after restart")
        chunks = await stream.wait_for(lambda chunks: len(chunks) == 4)
        assert chunks[-1]["text"] == "after restart"
        await stream.cancel()


async def test_typing_indicators_stream_and_expire_by_themselves(tmp_path: Path) -> None:
    """stream_typing shows who types now, each change, and an indicator lapsing after typing_ttl_s unless renewed."""
    async with run_server(
        *messaging_handlers(), handler_config=config(tmp_path, typing_ttl_s=0.3), heartbeat_interval=0
    ) as nexus:
        done = await nexus.client.call(
            "messaging:set_typing:v1:requested",
            {"conversation_id": "team", "typing": True},
            metadata={"user_id": "ada"},
        )
        assert done.state == "success"
        assert (done.payload["user_id"], done.payload["typing"]) == ("ada", True)
        assert parse_time(done.payload["expires_at"]) > parse_time(done.timestamp)
        stream = follow(nexus, "messaging:stream_typing:v1:requested", {"conversation_id": "team"}, user="cy")
        await stream.wait_for(lambda chunks: any(c["change"] == "expired" for c in chunks))
        await nexus.client.call(
            "messaging:set_typing:v1:requested",
            {"conversation_id": "team", "typing": True},
            metadata={"user_id": "bob"},
        )
        cleared = await nexus.client.call(
            "messaging:set_typing:v1:requested",
            {"conversation_id": "team", "typing": False},
            metadata={"user_id": "bob"},
        )
        assert cleared.payload["expires_at"] is None
        chunks = await stream.wait_for(lambda chunks: any(c["change"] == "stopped" for c in chunks))
        # the snapshot may or may not catch ada before her indicator lapses, so start from her expiry
        assert chunks[0]["change"] == "snapshot"
        tail = chunks[[c["change"] for c in chunks].index("expired") :]
        assert [(c["change"], c["user_id"], c["users"]) for c in tail] == [
            ("expired", "ada", []),
            ("typing", "bob", ["bob"]),
            ("stopped", "bob", []),
        ]
        await stream.cancel()


async def test_presence_follows_streams_starting_ending_and_connections_dropping(tmp_path: Path) -> None:
    """A user joins when they start any stream in the conversation and leaves when it ends or their client drops."""
    async with run_server(*messaging_handlers(), handler_config=config(tmp_path), heartbeat_interval=0) as nexus:
        watcher = follow(nexus, "messaging:stream_presence:v1:requested", {"conversation_id": "team"}, user="ada")
        await watcher.wait_for(lambda chunks: bool(chunks) and chunks[-1]["present"] == ["ada"])
        bob = follow(nexus, STREAM, {"conversation_id": "team"}, user="bob")
        await watcher.wait_for(lambda chunks: chunks[-1]["present"] == ["ada", "bob"])
        bob_typing = follow(nexus, "messaging:stream_typing:v1:requested", {"conversation_id": "team"}, user="bob")
        await bob_typing.wait_for(lambda chunks: len(chunks) == 1)
        await bob.cancel()  # bob still has his typing stream: still present
        # cy connects with a client of her own, then the connection drops
        client = await nexus.client_for()
        cy = StreamFollower(
            client.request(
                "messaging:stream_typing:v1:requested",
                {"conversation_id": "team"},
                metadata={"user_id": "cy"},
                heartbeats=False,
            )
        )
        await watcher.wait_for(lambda chunks: "cy" in chunks[-1]["present"])
        await cy.wait_for(lambda chunks: len(chunks) == 1)  # her stream is live on her side too
        await client.close()
        await watcher.wait_for(lambda chunks: chunks[-1]["present"] == ["ada", "bob"])
        assert cy.events[0].state == "started"  # her stream ran; it ended (cancelled) when her client went
        await bob_typing.cancel()
        chunks = await watcher.wait_for(lambda chunks: chunks[-1]["present"] == ["ada"])
        changes = [(c["change"], c["user_id"]) for c in chunks if c["change"] != "snapshot"]
        assert [c for c in changes if c[1] != "ada"] == [
            ("joined", "bob"),
            ("joined", "cy"),
            ("left", "cy"),
            ("left", "bob"),
        ]
        await watcher.cancel()


async def test_presence_of_another_conversation_is_not_shown(tmp_path: Path) -> None:
    """Streams in one conversation do not make anyone present in another."""
    async with run_server(*messaging_handlers(), handler_config=config(tmp_path), heartbeat_interval=0) as nexus:
        other = follow(nexus, "messaging:stream_typing:v1:requested", {"conversation_id": "elsewhere"}, user="bob")
        await other.wait_for(lambda chunks: len(chunks) == 1)
        watcher = follow(nexus, "messaging:stream_presence:v1:requested", {"conversation_id": "team"}, user="ada")
        chunks = await watcher.wait_for(lambda chunks: bool(chunks) and chunks[-1]["present"] == ["ada"])
        assert all("bob" not in c["present"] for c in chunks)
        await other.cancel()
        await watcher.cancel()


@pytest.mark.parametrize(
    ("event_type", "payload", "message"),
    [
        (SEND, {"text": "hi"}, "'conversation_id' is a required property"),
        (SEND, {"conversation_id": "c"}, "'text' is a required property"),
        (SEND, {"conversation_id": "c", "text": 5}, "payload.text: 5 is not of type 'string'"),
        (SEND, {"conversation_id": "", "text": "hi"}, "payload.conversation_id: '' should be non-empty"),
        (SEND, {"conversation_id": "c", "text": "x" * 101}, "101 characters, more than max_text_length (100)"),
        (STREAM, {"conversation_id": "c", "since": "last tuesday"}, "neither a message id nor a time"),
        (STREAM, {"conversation_id": "c", "since": "01JGZ8Q4V6M3T0D1XH2B7C9KEF"}, "has no message"),
        (STREAM, {"conversation_id": 7}, "payload.conversation_id: 7 is not of type 'string'"),
        ("messaging:set_typing:v1:requested", {"conversation_id": "c", "typing": "yes"}, "is not of type 'boolean'"),
        ("messaging:stream_typing:v1:requested", {}, "'conversation_id' is a required property"),
        ("messaging:stream_presence:v1:requested", {"conversation_id": None}, "None is not of type 'string'"),
    ],
)
async def test_bad_payloads_fail_clearly_and_leave_the_conversation_intact(
    tmp_path: Path, event_type: str, payload: dict[str, Any], message: str
) -> None:
    """A bad request ends with failed/invalid_payload naming the problem; others' messages are untouched."""
    async with run_server(
        *messaging_handlers(), handler_config=config(tmp_path, max_text_length=100), heartbeat_interval=0
    ) as nexus:
        kept = (await send(nexus, "c", "kept")).payload
        bad = await asyncio.wait_for(nexus.client.call(event_type, payload), GUARD)
        assert bad.state == "failed"
        assert bad.payload["error"]["type"] == "invalid_payload"
        assert message in bad.payload["error"]["message"]
        stream = follow(nexus, STREAM, {"conversation_id": "c"})
        [chunk] = await stream.wait_for(lambda chunks: len(chunks) == 1)
        assert chunk == {**message_of(kept), "live": False}
        await stream.cancel()


async def test_a_bad_config_value_stops_the_server_at_start_up(tmp_path: Path) -> None:
    """A config key of the wrong type (or out of range) is refused before the server starts, naming the key."""
    with pytest.raises(ValueError, match=r"\[handlers\.messaging\] history_limit must be an integer, got 'lots'"):
        async with run_server(*messaging_handlers(), handler_config=config(tmp_path, history_limit="lots")):
            pass
    with pytest.raises(ValueError, match=r"\[handlers\.messaging\] history_limit must be a positive integer"):
        async with run_server(*messaging_handlers(), handler_config=config(tmp_path, history_limit=0)):
            pass
