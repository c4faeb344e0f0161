"""The key-value store in a NATS JetStream key-value bucket: with the NATS bus, every node sees the same state.

One bucket per deployment (``<stream>_KV`` unless ``kv_bucket`` names another), keeping the latest value of each
key, on the bus's own connection: while NATS is away an operation fails with
:class:`~nexus.errors.Unavailable`, and after the client reconnects (or the bus connects anew) the next one
works again. A key ``k`` of plugin ``p`` is the bucket key ``p.k``; revisions are the bucket stream's sequence
numbers.

The key limit is checked before a new key is written; two nodes writing new keys at the same moment may pass
it by a few.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Final, TypeVar

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from nexus.bus.nats import NatsBus
from nexus.errors import Unavailable
from nexus.kv.base import KeyValueStore, KVConflict, KVLimitExceeded, KVLimits

T = TypeVar("T")

API_TIMEOUT_S: Final = 5.0
_UNREACHABLE: Final = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    TimeoutError,
)


class NatsKeyValue(KeyValueStore):
    """Values in the JetStream key-value bucket ``bucket``, reached through ``bus``'s connection."""

    def __init__(self, bus: NatsBus, bucket: str, limits: KVLimits | None = None) -> None:
        super().__init__(limits or KVLimits())
        self.bus = bus
        self.bucket = bucket
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None

    async def start(self) -> None:
        await self._guard(self._bucket())

    async def close(self) -> None:
        self._kv = self._js = None

    async def _bucket(self) -> KeyValue:
        """The bucket on the bus's current connection (created when missing)."""
        _, js = self.bus.connection()
        if not self.bus.connected:
            raise Unavailable(f"the key-value bucket {self.bucket!r} cannot be reached: NATS is not connected")
        if self._kv is not None and self._js is js:
            return self._kv
        try:
            kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            settings = self.bus.settings
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    max_value_size=self.limits.max_value_bytes,
                    storage=api.StorageType.MEMORY if settings.storage == "memory" else api.StorageType.FILE,
                    replicas=settings.replicas,
                )
            )
        self._kv, self._js = kv, js
        return kv

    async def _guard(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except (Unavailable, KVConflict, KVLimitExceeded):
            raise
        except _UNREACHABLE as exc:
            raise Unavailable(f"the key-value bucket {self.bucket!r} cannot be reached: {type(exc).__name__}") from exc
        except nats.errors.Error as exc:  # JetStream refused (a value over the bucket's max_value_size, ...)
            raise Unavailable(f"the key-value bucket {self.bucket!r} refused the operation: {exc}") from exc

    async def _entry(self, kv: KeyValue, name: str) -> KeyValue.Entry | None:
        try:
            entry = await kv.get(name)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError too
            return None
        return entry if entry.operation is None else None

    async def get(self, scope: str, key: str) -> tuple[bytes, int] | None:
        async def get() -> tuple[bytes, int] | None:
            entry = await self._entry(await self._bucket(), f"{scope}.{key}")
            if entry is None or entry.value is None or entry.revision is None:
                return None
            return bytes(entry.value), entry.revision

        return await self._guard(get())

    async def put(self, scope: str, key: str, data: bytes, expect_revision: int | None) -> int:
        async def put() -> int:
            kv = await self._bucket()
            name = f"{scope}.{key}"
            # A new key must fit the limit; an update of a given revision is of an existing key (or a conflict).
            new = expect_revision == 0 or (expect_revision is None and await self._entry(kv, name) is None)
            if new:
                count = len(await self._keys(kv, scope, ""))
                if count >= self.limits.max_keys:
                    raise KVLimitExceeded(f"plugin {scope!r} already stores {count} keys, the limit")
            try:
                if expect_revision is None:
                    return int(await kv.put(name, data))
                if expect_revision == 0:
                    return int(await kv.create(name, data))
                return int(await kv.update(name, data, last=expect_revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                raise KVConflict(f"key {key!r} is not at the expected revision {expect_revision}") from None

        return await self._guard(put())

    async def delete(self, scope: str, key: str, expect_revision: int | None) -> bool:
        async def delete() -> bool:
            kv = await self._bucket()
            name = f"{scope}.{key}"
            current = await self._entry(kv, name)
            revision = None if current is None else current.revision
            if expect_revision is not None and expect_revision != (revision or 0):
                found = "does not exist" if revision is None else f"is at revision {revision}"
                raise KVConflict(f"key {key!r} {found}, not at the expected revision {expect_revision}")
            if revision is None:
                return False
            try:
                await kv.delete(name, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                if expect_revision is not None:
                    raise KVConflict(f"key {key!r} is not at the expected revision {expect_revision}") from None
                await kv.delete(name)
            return True

        return await self._guard(delete())

    async def keys(self, scope: str, prefix: str) -> list[str]:
        async def keys() -> list[str]:
            return await self._keys(await self._bucket(), scope, prefix)

        return await self._guard(keys())

    async def _keys(self, kv: KeyValue, scope: str, prefix: str) -> list[str]:
        watcher: Any = await kv.watch(f"{scope}.>", ignore_deletes=True, meta_only=True)
        found: list[str] = []
        try:
            while (entry := await watcher.updates(timeout=API_TIMEOUT_S)) is not None:
                key = entry.key[len(scope) + 1 :]
                if key.startswith(prefix):
                    found.append(key)
        finally:
            await watcher.stop()
        return sorted(found)
