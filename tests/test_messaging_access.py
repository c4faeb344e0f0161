"""Messaging with authentication on: participants, who may read and write a conversation, who the sender is, and
who receives its events. Real servers (two nodes, each with its own database) on the memory and the NATS bus,
tokens minted with the test's secret."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from nexus.handlers.messaging.conversations import Message as StoredMessage
from nexus.handlers.messaging.conversations import (
    PermissionDenied,
    Requester,
    check_access,
    new_message_id,
    participants_after,
    rfc3339,
)
from nexus.handlers.messaging.store import MessageStore
from test_messaging import messaging_handlers

from nexus import Event
from nexus.auth import mint_token
from nexus.bus.memory import MemoryBus
from nexus.client import NexusClient
from nexus.queue import MemoryRequestQueue
from nexus.testing import Recorder, StreamFollower, TestServer, run_server

GUARD = 10.0
SECRET = "messaging-secret-" + "z" * 32
SEND = "messaging:send_message:v1:requested"
STREAM = "messaging:stream_messages:v1:requested"
SET_TYPING = "messaging:set_typing:v1:requested"
STREAM_TYPING = "messaging:stream_typing:v1:requested"
STREAM_PRESENCE = "messaging:stream_presence:v1:requested"


def token(sub: str, *, subscribe: tuple[str, ...] = (), admin: bool = False) -> str:
    return mint_token(SECRET, sub, subscribe=subscribe, admin=admin)


# --- pure: the rule ----------------------------------------------------------------------------------------------


def test_the_first_message_makes_the_participants_and_only_they_may_go_on() -> None:
    """The first sender and the users they name take part; a participant may add users, anyone else is refused
    (with a message saying why); admins and unverified requesters (authentication off) are not checked."""
    alice, bob = Requester("alice", True, False), Requester("bob", True, False)
    first = participants_after(alice, "c", frozenset(), ["carol"])
    assert first == {"alice", "carol"}
    assert participants_after(Requester("carol", True, False), "c", first, ["dan"]) == {"alice", "carol", "dan"}
    with pytest.raises(PermissionDenied, match="'bob' is not a participant of conversation 'c'"):
        participants_after(bob, "c", first, [])
    with pytest.raises(PermissionDenied, match="'bob' is not a participant"):
        check_access(bob, "c", first)
    with pytest.raises(PermissionDenied, match="has no messages yet"):
        check_access(bob, "new", frozenset())
    check_access(Requester("root", True, True), "c", first)
    check_access(Requester("bob", False, False), "c", first)


def test_a_version_1_database_gets_its_senders_as_participants(tmp_path: Path) -> None:
    """Opening a database of schema version 1 (messages only) makes each conversation's senders its participants."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, "
        "conversation_id TEXT NOT NULL, sender TEXT NOT NULL, text TEXT NOT NULL, sent_at TEXT NOT NULL, "
        "sent_ts REAL NOT NULL); PRAGMA user_version=1;"
    )
    for i, (conversation, sender) in enumerate((("c", "ada"), ("c", "bob"), ("c", "ada"), ("d", "cy"))):
        at = 1000.0 + i
        db.execute(
            "INSERT INTO messages VALUES (NULL, ?, ?, ?, 'hi', ?, ?)",
            (new_message_id(at, bytes(9) + bytes([i])), conversation, sender, rfc3339(at), at),
        )
    db.commit()
    db.close()
    store = MessageStore(path)
    store.open()
    assert store.participants("c") == {"ada", "bob"}
    assert store.participants("d") == {"cy"}
    assert store.participants("none") == frozenset()
    store.add(StoredMessage(new_message_id(2000, bytes(10)), "c", "ada", "new", rfc3339(2000), 2000))
    store.close()


# --- end to end --------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nodes(tmp_path: Path, bus_kind: str) -> AsyncIterator[list[TestServer]]:
    """Two nodes with authentication on, one bus, a database each; `root` is a messaging admin."""
    async with contextlib.AsyncExitStack() as stack:
        shared: dict[str, Any] = {}
        if bus_kind == "memory":
            bus = MemoryBus()
            shared = {"bus": bus, "queue": MemoryRequestQueue(bus)}
        else:
            url = shared_nats_url()
            stream, prefix = unique_names("msgacl")
            stack.push_async_callback(delete_stream, url, stream)
            shared = {"settings": nats_settings(url, stream, prefix)}
        servers = []
        for name in ("a", "b"):
            handler_config = {"messaging": {"db_path": str(tmp_path / f"{name}.sqlite3"), "admins": ["root"]}}
            servers.append(
                await stack.enter_async_context(
                    run_server(
                        *messaging_handlers(),
                        handler_config=handler_config,
                        heartbeat_interval=0,
                        jwt_secret=SECRET,
                        **shared,
                    )
                )
            )
        yield servers


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[TestServer]]:
    async with nodes(tmp_path, request.param) as servers:
        yield servers


@contextlib.asynccontextmanager
async def user(server: TestServer, sub: str, **claims: Any) -> AsyncIterator[NexusClient]:
    async with NexusClient(server.address, token=token(sub, **claims)) as client:
        yield client


async def call(client: NexusClient, event_type: str, payload: dict[str, Any], **kwargs: Any) -> Event:
    return await asyncio.wait_for(client.call(event_type, payload, **kwargs), GUARD)


async def sent(client: NexusClient, conversation: str, text: str, **extra: Any) -> dict[str, Any]:
    done = await call(client, SEND, {"conversation_id": conversation, "text": text, **extra})
    assert done.state == "success", done.payload
    return done.payload


def follow(client: NexusClient, event_type: str, payload: dict[str, Any]) -> StreamFollower:
    return StreamFollower(client.request(event_type, payload, heartbeats=False))


async def refused(client: NexusClient, event_type: str, payload: dict[str, Any]) -> str:
    """Send a request that must end `failed` with a permission error; its message."""
    request = StreamFollower(client.request(event_type, payload, heartbeats=False))
    terminal = await request.ended(GUARD)
    assert terminal.state == "failed", (event_type, terminal.payload)
    assert request.chunks == []
    error = terminal.payload["error"]
    assert error["type"] == "handler_error"
    message: str = error["message"]
    assert message.startswith("PermissionDenied: "), message
    return message


async def test_only_participants_read_and_write_a_conversation(cluster: list[TestServer]) -> None:
    """alice's first message names carol: they two take part. bob, who does not, cannot stream its history (from
    the start or since a message), typing or presence, nor type or send in it; carol can do all of it and sees
    alice's messages, history and live, and alice sees hers."""
    a, b = cluster
    async with user(a, "alice") as alice, user(b, "bob") as bob, user(b, "carol") as carol:
        first = await sent(alice, "plans", "surprise party", participants=["carol"])
        assert (first["sender"], first["participants"]) == ("alice", ["alice", "carol"])

        presence = follow(carol, STREAM_PRESENCE, {"conversation_id": "plans"})
        await presence.wait_for(lambda chunks: bool(chunks) and chunks[-1]["present"] == ["carol"])
        not_in = "'bob' is not a participant of conversation 'plans'"
        assert not_in in await refused(bob, STREAM, {"conversation_id": "plans"})
        assert not_in in await refused(bob, STREAM, {"conversation_id": "plans", "since": first["message_id"]})
        assert not_in in await refused(bob, STREAM, {"conversation_id": "plans", "since": "2000-01-01T00:00:00Z"})
        assert not_in in await refused(bob, STREAM_TYPING, {"conversation_id": "plans"})
        assert not_in in await refused(bob, STREAM_PRESENCE, {"conversation_id": "plans"})
        assert not_in in await refused(bob, SET_TYPING, {"conversation_id": "plans", "typing": True})
        assert not_in in await refused(
            bob, SEND, {"conversation_id": "plans", "text": "let me in", "participants": ["bob"]}
        )
        assert "has no messages yet" in await refused(bob, STREAM, {"conversation_id": "nothing-yet"})

        carols = follow(carol, STREAM, {"conversation_id": "plans"})
        [history] = await carols.wait_for(lambda chunks: len(chunks) == 1)
        assert (history["text"], history["sender"], history["live"]) == ("surprise party", "alice", False)
        alices = follow(alice, STREAM, {"conversation_id": "plans"})
        await alices.wait_for(lambda chunks: len(chunks) == 1)
        await sent(alice, "plans", "bring cake")
        await sent(carol, "plans", "on it")
        for stream in (carols, alices):
            chunks = await stream.wait_for(lambda chunks: len(chunks) == 3)
            assert [(c["sender"], c["text"], c["live"]) for c in chunks] == [
                ("alice", "surprise party", False),
                ("alice", "bring cake", True),
                ("carol", "on it", True),
            ]
        # bob's refused attempts never made him present, and his message was never stored
        changes = await presence.wait_for(lambda chunks: chunks[-1]["present"] == ["alice", "carol"])
        assert all("bob" not in c["present"] and c["user_id"] != "bob" for c in changes)
        later = follow(alice, STREAM, {"conversation_id": "plans"})
        chunks = await later.wait_for(lambda chunks: len(chunks) == 3)
        assert "let me in" not in [c["text"] for c in chunks]
        for stream in (carols, alices, presence, later):
            await stream.cancel()


async def test_a_participant_adds_users_by_naming_them(cluster: list[TestServer]) -> None:
    """A later message from a participant that names dan makes him a participant; nobody is removed."""
    a, b = cluster
    async with user(a, "alice") as alice, user(b, "dan") as dan:
        await sent(alice, "team", "hello")
        assert "'dan' is not a participant" in await refused(dan, STREAM, {"conversation_id": "team"})
        added = await sent(alice, "team", "welcome dan", participants=["dan"])
        assert added["participants"] == ["alice", "dan"]
        stream = follow(dan, STREAM, {"conversation_id": "team"})
        chunks = await stream.wait_for(lambda chunks: len(chunks) == 2)
        assert [c["text"] for c in chunks] == ["hello", "welcome dan"]
        assert (await sent(dan, "team", "thanks"))["participants"] == ["alice", "dan"]
        await stream.cancel()


async def test_alice_cannot_impersonate_bob(cluster: list[TestServer]) -> None:
    """Whatever alice writes as user_id (payload or metadata), the stored message's sender is alice; typing is
    hers too; and she cannot create a conversation in bob's name."""
    a, b = cluster
    async with user(a, "alice") as alice, user(b, "bob") as bob:
        forged = await sent(alice, "chat", "it was me, bob", user_id="bob", participants=["bob"])
        assert forged["sender"] == "alice"
        spoofed = await call(
            alice,
            SEND,
            {"conversation_id": "chat", "text": "really bob", "user_id": "bob"},
            metadata={"user_id": "bob"},
        )
        assert spoofed.payload["sender"] == "alice"
        typing = await call(alice, SET_TYPING, {"conversation_id": "chat", "typing": True, "user_id": "bob"})
        assert typing.payload["user_id"] == "alice"
        stream = follow(bob, STREAM, {"conversation_id": "chat"})
        chunks = await stream.wait_for(lambda chunks: len(chunks) == 2)
        assert [(c["sender"], c["text"]) for c in chunks] == [("alice", "it was me, bob"), ("alice", "really bob")]
        await stream.cancel()
        # alice starts a conversation claiming to be bob: it is hers, and bob's own token is what makes him bob
        mine = await sent(alice, "bobs-own", "hi", user_id="bob")
        assert mine["participants"] == ["alice"]
        assert "'bob' is not a participant" in await refused(bob, STREAM, {"conversation_id": "bobs-own"})


async def test_messages_and_typing_reach_only_participants_and_admins_on_the_bus(cluster: list[TestServer]) -> None:
    """Subscribed to `messaging:>`, live and in replay: bob (no participant) receives neither alice's message nor
    her typing; carol (a participant) receives her typing; an admin token receives both."""
    a, b = cluster
    everything = ("messaging:>",)
    async with (
        user(a, "alice") as alice,
        user(b, "bob", subscribe=everything) as bob,
        user(b, "carol", subscribe=everything) as carol,
        user(a, "root", admin=True) as root,
    ):
        live = {
            name: await Recorder(client.subscribe("messaging:>")).start()
            for name, client in (("bob", bob), ("carol", carol), ("root", root))
        }
        message = await sent(alice, "secret", "the code is 1234", participants=["carol"])
        await call(alice, SET_TYPING, {"conversation_id": "secret", "typing": True})
        # markers: each reader's own typing in a conversation of its own comes after alice's events
        for client in (bob, carol):
            await sent(client, f"mine-{id(client)}", "marker")
            await call(client, SET_TYPING, {"conversation_id": f"mine-{id(client)}", "typing": True})

        def texts(events: list[Event]) -> list[str]:
            return [e.payload["text"] for e in events if e.event_type.endswith("send_message:v1:success")]

        def typers(events: list[Event]) -> list[str]:
            return [e.payload["user_id"] for e in events if e.event_type == "messaging:typing:v1:changed"]

        await live["bob"].wait_for(lambda events: "bob" in typers(events))
        await live["carol"].wait_for(lambda events: "carol" in typers(events))
        await live["root"].wait_for(lambda events: {"alice", "bob", "carol"} <= set(typers(events)))
        assert "the code is 1234" not in texts(live["bob"].events)
        assert "alice" not in typers(live["bob"].events)
        assert typers(live["carol"].events).count("alice") == 1
        assert "the code is 1234" not in texts(live["carol"].events)  # a request's result goes to its sender
        assert "the code is 1234" in texts(live["root"].events)
        assert typers(live["root"].events).count("alice") == 1
        for recorder in live.values():
            await recorder.stop()

        replay = {
            name: await Recorder(client.subscribe("messaging:>", since_offset=1)).start()
            for name, client in (("bob", bob), ("root", root))
        }
        await replay["bob"].wait_for(lambda events: "bob" in typers(events))
        await replay["root"].wait_for(lambda events: "bob" in typers(events))
        assert "the code is 1234" not in texts(replay["bob"].events)
        assert "alice" not in typers(replay["bob"].events)
        assert not any(e.payload.get("text") == "the code is 1234" for e in replay["bob"].events)
        assert "the code is 1234" in texts(replay["root"].events)
        for recorder in replay.values():
            await recorder.stop()
        assert message["participants"] == ["alice", "carol"]


async def test_an_admin_reads_every_conversation(cluster: list[TestServer]) -> None:
    """root, a messaging admin, streams the history, typing and presence of a conversation it takes no part in;
    its messages there make it a participant."""
    a, b = cluster
    async with user(a, "alice") as alice, user(b, "root", admin=True) as root:
        await sent(alice, "private", "just us")
        stream = follow(root, STREAM, {"conversation_id": "private"})
        [chunk] = await stream.wait_for(lambda chunks: len(chunks) == 1)
        assert (chunk["sender"], chunk["text"]) == ("alice", "just us")
        typing = follow(root, STREAM_TYPING, {"conversation_id": "private"})
        await typing.wait_for(lambda chunks: len(chunks) == 1)
        presence = follow(root, STREAM_PRESENCE, {"conversation_id": "private"})
        await presence.wait_for(lambda chunks: len(chunks) == 1)
        assert (await sent(root, "private", "hello from ops"))["participants"] == ["alice", "root"]
        for follower in (stream, typing, presence):
            await follower.cancel()


async def test_every_node_keeps_the_participants_of_private_messages(cluster: list[TestServer], tmp_path: Path) -> None:
    """The success events are private to their sender, yet every node's followers store each message and the
    conversation's participants in the node's own database, so either node checks access the same way."""
    a, b = cluster
    async with user(a, "alice") as alice, user(b, "carol") as carol:
        ids = [(await sent(alice, "shared", f"m{i}", participants=["carol"]))["message_id"] for i in range(4)]
        for name in ("a", "b"):
            store = MessageStore(tmp_path / f"{name}.sqlite3")
            store.open()
            try:
                for _ in range(200):
                    if store.count("shared") == len(ids) and store.participants("shared") == {"alice", "carol"}:
                        break
                    await asyncio.sleep(0.05)
                rows, _ = store.history("shared", None, 100)
                assert sorted(m.message_id for _, m in rows) == sorted(ids), name
                assert store.participants("shared") == {"alice", "carol"}, name
            finally:
                store.close()
        for _ in range(4):  # streams go to either node: each one lets carol in
            stream = follow(carol, STREAM, {"conversation_id": "shared"})
            assert len(await stream.wait_for(lambda chunks: len(chunks) == 4)) == 4
            await stream.cancel()


async def test_an_admin_token_reads_every_conversation_without_being_listed(cluster: list[TestServer]) -> None:
    """ops is no messaging admin by configuration, but its token is an admin token: the node marks its requests
    (metadata.admin, which no client can set) and ops reads a conversation it takes no part in; dave, whose
    request claims admin in its metadata, is refused."""
    a, b = cluster
    async with user(a, "alice") as alice, user(b, "ops", admin=True) as ops, user(b, "dave") as dave:
        await sent(alice, "secret", "for alice")
        stream = follow(ops, STREAM, {"conversation_id": "secret"})
        [chunk] = await stream.wait_for(lambda chunks: len(chunks) == 1)
        assert chunk["text"] == "for alice"
        await stream.cancel()
        refused = await dave.call(STREAM, {"conversation_id": "secret"}, metadata={"admin": "true"})
        assert refused.state == "failed"
        assert "is not a participant" in refused.payload["error"]["message"]
