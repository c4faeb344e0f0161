"""The messaging plugin's message store: an embedded SQLite database (stdlib ``sqlite3``).

Synchronous and blocking: the plugin calls it from a worker thread, one call at a time per store (see
``plugin.py``), never on the event loop. Tested directly.

Each message gets a ``seq``, this database's insertion order: histories are read in ``seq`` order, and a
stream that read its history up to ``seq`` N delivers live only messages with a greater ``seq``, so nothing is
missed or repeated between history and live. Inserting is idempotent by ``message_id``: a node replicating
messages it saw on the bus (sent through another node) can insert the same message again harmlessly.

The database runs in WAL mode, so readers never block the writer and several connections (the plugin's
handlers, or several nodes on one machine) can share the file; ``synchronous`` is ``NORMAL`` by default (a
committed message survives a crash of the process; ``FULL`` also survives a power cut, at some write cost).

Participants: who takes part in each conversation (see the plugin's docstring for the rule), one row per
conversation and user. Adding them is idempotent too, and nobody is ever removed, so nodes replicating them from
the bus in any order agree. Schema version 2 added them: a version 1 database gets the senders of its stored
messages as the participants of their conversations.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Concatenate, Final, ParamSpec, TypeVar

from .conversations import AfterMessage, Cursor, InvalidRequest, Message, SinceTime

SCHEMA_VERSION: Final = 2
SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    sent_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, seq);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (conversation_id, sent_ts);
CREATE TABLE IF NOT EXISTS participants (
    conversation_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
"""

_FROM_VERSION_1: Final = "INSERT OR IGNORE INTO participants SELECT DISTINCT conversation_id, sender FROM messages"

_COLUMNS: Final = "seq, message_id, conversation_id, sender, text, sent_at, sent_ts"


class UnknownMessage(InvalidRequest):
    """``since`` names a message this conversation does not have."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serialized(method: Callable[Concatenate[MessageStore, _P], _R]) -> Callable[Concatenate[MessageStore, _P], _R]:
    """Run the method under the store's lock."""

    def locked(self: MessageStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    locked.__name__ = method.__name__
    locked.__doc__ = method.__doc__
    return locked


class MessageStore:
    """Messages in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", busy_timeout_s: float = 5.0):
        # One call at a time, whatever thread makes it: a worker thread may still be inside add() when a
        # cancelled caller has already moved on and another thread closes the connection.
        self._lock = threading.Lock()
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        self.path = Path(path)
        self._synchronous = mode
        self._busy_timeout_s = busy_timeout_s
        self._db: sqlite3.Connection | None = None

    @_serialized
    def open(self) -> None:
        """Create the directory and the schema when missing; open the connection."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode (isolation_level=None): each insert commits; reads that must agree run in BEGIN.
        db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this plugin's ({SCHEMA_VERSION})"
                )
            db.executescript(_SCHEMA)
            if version == 1:
                db.execute(_FROM_VERSION_1)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        self._db = db

    @_serialized
    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the message store is not open")
        return self._db

    @_serialized
    def add(self, message: Message) -> int:
        """Store ``message`` unless its id is already stored; returns its ``seq`` either way."""
        db = self.db
        db.execute(
            f"INSERT OR IGNORE INTO messages ({_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?)",
            (
                message.message_id,
                message.conversation_id,
                message.sender,
                message.text,
                message.sent_at,
                message.sent_ts,
            ),
        )
        row = db.execute("SELECT seq FROM messages WHERE message_id = ?", (message.message_id,)).fetchone()
        return int(row[0])

    @_serialized
    def participants(self, conversation_id: str) -> frozenset[str]:
        """Who takes part in the conversation (empty: nobody has written to it yet)."""
        rows = self.db.execute("SELECT user_id FROM participants WHERE conversation_id = ?", (conversation_id,))
        return frozenset(str(row[0]) for row in rows)

    @_serialized
    def add_participants(self, conversation_id: str, users: Iterable[str]) -> None:
        """Make ``users`` participants of the conversation (those already in it stay, once)."""
        self.db.executemany(
            "INSERT OR IGNORE INTO participants (conversation_id, user_id) VALUES (?, ?)",
            [(conversation_id, user) for user in users],
        )

    @_serialized
    def history(self, conversation_id: str, since: Cursor, limit: int) -> tuple[list[tuple[int, Message]], int]:
        """The conversation's messages after ``since`` (at most the ``limit`` most recent, oldest first), and the
        greatest ``seq`` the conversation had when they were read (0 for none).

        Raises :class:`UnknownMessage` when ``since`` names a message the conversation does not have.
        """
        db = self.db
        db.execute("BEGIN")
        try:
            head = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()[0]
            where = "conversation_id = ?"
            arguments: list[object] = [conversation_id]
            if isinstance(since, AfterMessage):
                found = db.execute(
                    "SELECT seq FROM messages WHERE message_id = ? AND conversation_id = ?",
                    (since.message_id, conversation_id),
                ).fetchone()
                if found is None:
                    raise UnknownMessage(f"since: conversation {conversation_id!r} has no message {since.message_id!r}")
                where += " AND seq > ?"
                arguments.append(found[0])
            elif isinstance(since, SinceTime):
                where += " AND sent_ts >= ?"
                arguments.append(since.seconds)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY seq DESC LIMIT ?", (*arguments, limit)
            ).fetchall()
        finally:
            db.execute("COMMIT")
        messages = [(int(row[0]), Message(*row[1:])) for row in reversed(rows)]
        return messages, int(head)

    @_serialized
    def count(self, conversation_id: str | None = None) -> int:
        """Messages stored (in one conversation, or in all)."""
        if conversation_id is None:
            return int(self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        return int(
            self.db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (conversation_id,)).fetchone()[0]
        )
