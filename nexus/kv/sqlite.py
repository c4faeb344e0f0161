"""The key-value store in one SQLite file (``kv.sqlite3`` in the data directory): the default with the memory bus.

Every statement runs in one worker thread of the store (the event loop never waits on the disk), on one
connection in WAL mode. Revisions come from one counter of the file, so a key deleted and written again never
gets a revision it had before.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from nexus.errors import InvalidState
from nexus.kv.base import KeyValueStore, KVConflict, KVLimitExceeded, KVLimits

T = TypeVar("T")

FILE_NAME: Final = "kv.sqlite3"
IN_MEMORY: Final = ":memory:"
BUSY_TIMEOUT_S: Final = 5.0

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS kv (scope TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, "
    "revision INTEGER NOT NULL, PRIMARY KEY (scope, key)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), last INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO revision (id, last) VALUES (0, 0)",
)


class SqliteKeyValue(KeyValueStore):
    """Values in ``directory / kv.sqlite3`` (the directory is created), or in memory for ``":memory:"``."""

    def __init__(self, directory: Path | str, limits: KVLimits | None = None) -> None:
        super().__init__(limits or KVLimits())
        self.path = IN_MEMORY if str(directory) == IN_MEMORY else str(Path(directory) / FILE_NAME)
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._closed = False

    async def _run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise InvalidState("the key-value store is closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-kv")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, function)

    def _call(self, function: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self._db = self._open()
        return function(self._db)

    def _open(self) -> sqlite3.Connection:
        if self.path != IN_MEMORY:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with _transaction(db):
                for statement in _SCHEMA:
                    db.execute(statement)
        except BaseException:
            db.close()
            raise
        return db

    async def start(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        if self._closed:
            return
        executor = self._executor
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_db)
            executor.shutdown(wait=False)
        self._closed = True

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def get(self, scope: str, key: str) -> tuple[bytes, int] | None:
        def get(db: sqlite3.Connection) -> tuple[bytes, int] | None:
            row = db.execute("SELECT value, revision FROM kv WHERE scope = ? AND key = ?", (scope, key)).fetchone()
            return None if row is None else (bytes(row[0]), int(row[1]))

        return await self._run(get)

    async def put(self, scope: str, key: str, data: bytes, expect_revision: int | None) -> int:
        max_keys = self.limits.max_keys

        def put(db: sqlite3.Connection) -> int:
            with _transaction(db):
                current = _revision(db, scope, key)
                _check_expected(key, current, expect_revision)
                if current is None:
                    (count,) = db.execute("SELECT COUNT(*) FROM kv WHERE scope = ?", (scope,)).fetchone()
                    if count >= max_keys:
                        raise KVLimitExceeded(f"plugin {scope!r} already stores {count} keys, the limit")
                (revision,) = db.execute("UPDATE revision SET last = last + 1 WHERE id = 0 RETURNING last").fetchone()
                db.execute(
                    "INSERT INTO kv (scope, key, value, revision) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, revision = excluded.revision",
                    (scope, key, data, revision),
                )
                return int(revision)

        return await self._run(put)

    async def delete(self, scope: str, key: str, expect_revision: int | None) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                current = _revision(db, scope, key)
                _check_expected(key, current, expect_revision)
                if current is None:
                    return False
                db.execute("DELETE FROM kv WHERE scope = ? AND key = ?", (scope, key))
                db.execute("UPDATE revision SET last = last + 1 WHERE id = 0")
                return True

        return await self._run(delete)

    async def keys(self, scope: str, prefix: str) -> list[str]:
        def keys(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT key FROM kv WHERE scope = ? AND substr(key, 1, ?) = ? ORDER BY key",
                (scope, len(prefix), prefix),
            ).fetchall()
            return [str(row[0]) for row in rows]

        return await self._run(keys)


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def _revision(db: sqlite3.Connection, scope: str, key: str) -> int | None:
    row = db.execute("SELECT revision FROM kv WHERE scope = ? AND key = ?", (scope, key)).fetchone()
    return None if row is None else int(row[0])


def _check_expected(key: str, current: int | None, expected: int | None) -> None:
    if expected is None or expected == (current or 0):
        return
    found = "does not exist" if current is None else f"is at revision {current}"
    raise KVConflict(f"key {key!r} {found}, not at the expected revision {expected}")
