"""Durable plugin state: the key-value store behind ``ctx.kv``.

A :class:`KeyValueStore` keeps JSON values by ``(scope, key)``; each plugin sees one scope (its name) through a
:class:`ScopedKV`, the :class:`PluginKV` its handlers get as ``ctx.kv``. Two stores implement it: SQLite in the
data directory (:mod:`nexus.kv.sqlite`, with the memory bus) and a NATS JetStream key-value bucket
(:mod:`nexus.kv.nats`, with the NATS bus, shared by every node).

Every value is checked here, once for both stores, as an event payload is: JSON (no NaN, no Infinity, no other
types, string keys only), nested at most ``max_depth`` levels, at most ``max_value_bytes`` as compact UTF-8 JSON.
A key is 1 to 256 characters of ``A-Z a-z 0-9 _ - = /`` in dot-separated tokens (``baseline.machine-7``); each
scope holds at most ``max_keys``. Every write carries a revision: ``put(..., expect_revision=r)`` succeeds only
while the key is still at ``r`` (``0``: only while it does not exist), else it raises :class:`KVConflict`.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import hashlib
import json
import re
from typing import Any, Final

from nexus.errors import InvalidArgument, InvalidPayload, InvalidState, PayloadTooLarge, ResourceExhausted
from nexus.events import DEFAULT_MAX_PAYLOAD_DEPTH, encode_json, quote, validate_payload

DEFAULT_KV_MAX_VALUE_BYTES: Final = 256 * 1024
DEFAULT_KV_MAX_KEYS: Final = 10_000
MAX_KEY_CHARS: Final = 256

_KEY: Final = re.compile(r"[A-Za-z0-9_\-=/]+(?:\.[A-Za-z0-9_\-=/]+)*\Z")
_SCOPE: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}\Z")
_PREFIX: Final = re.compile(r"[A-Za-z0-9_\-=/.]*\Z")


class KVConflict(InvalidState):
    """A write whose ``expect_revision`` is no longer the key's revision (another handler or node wrote it)."""


class KVLimitExceeded(ResourceExhausted):
    """A new key in a scope that already holds ``max_keys``."""


@dataclasses.dataclass(frozen=True, slots=True)
class KVEntry:
    """One stored value: its key (without the scope), its JSON value and its revision."""

    key: str
    value: Any
    revision: int


@dataclasses.dataclass(frozen=True, slots=True)
class KVLimits:
    """What one scope may store."""

    max_value_bytes: int = DEFAULT_KV_MAX_VALUE_BYTES
    max_keys: int = DEFAULT_KV_MAX_KEYS
    max_depth: int = DEFAULT_MAX_PAYLOAD_DEPTH


def check_key(key: Any) -> str:
    """``key`` if it is a valid key, else :class:`~nexus.errors.InvalidArgument` naming the problem."""
    if not isinstance(key, str):
        raise InvalidArgument(f"a key must be a string, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise InvalidArgument(f"a key must be 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
    if _KEY.match(key) is None:
        raise InvalidArgument(
            f"key {quote(key)} is invalid: use dot-separated tokens of letters, digits, '_', '-', '=' and '/'"
        )
    return key


def key_for(prefix: str, name: str) -> str:
    """A valid key for any ``name`` under ``prefix`` (``"baseline"``): ``prefix.<name's UTF-8 in URL-safe
    base64>``, so ids a client chose (any text) name keys the store accepts, one key per id (the empty name is
    ``prefix.=``, which no other name encodes to)."""
    return check_key(f"{prefix}.{base64.urlsafe_b64encode(name.encode()).decode() or '='}")


def scope_of(plugin: str) -> str:
    """The scope of a plugin's keys: its name when that is 1 to 64 letters, digits, ``_`` or ``-`` (``analytics``),
    else those characters of it and a hash of the whole name (``demo_Echo-3f2a9c1e0b7d``: ``demo:Echo``, a
    handler registered as ``module:Class``), so two plugin names never share a scope."""
    if _SCOPE.match(plugin) is not None:
        return plugin
    readable = re.sub(r"[^A-Za-z0-9_\-]", "_", plugin)[:40]
    return f"{readable}-{hashlib.sha256(plugin.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def check_revision(revision: Any) -> int | None:
    if revision is None:
        return None
    if type(revision) is not int or revision < 0:
        raise InvalidArgument(f"expect_revision must be a non-negative integer or None, got {revision!r}")
    return revision


class KeyValueStore(abc.ABC):
    """Encoded JSON values by ``(scope, key)``; scope and key are valid and values checked before they get here."""

    def __init__(self, limits: KVLimits) -> None:
        self.limits = limits

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the store (create the file or bucket when missing)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what the store holds; what was written stays."""

    @abc.abstractmethod
    async def get(self, scope: str, key: str) -> tuple[bytes, int] | None:
        """The value's JSON and revision, or None when the key does not exist."""

    @abc.abstractmethod
    async def put(self, scope: str, key: str, data: bytes, expect_revision: int | None) -> int:
        """Store ``data``; returns the new revision. Raises :class:`KVConflict` when ``expect_revision`` is not
        the key's (0: the key exists), :class:`KVLimitExceeded` for a new key beyond ``limits.max_keys``."""

    @abc.abstractmethod
    async def delete(self, scope: str, key: str, expect_revision: int | None) -> bool:
        """Remove the key; False when it did not exist. :class:`KVConflict` as for :meth:`put`."""

    @abc.abstractmethod
    async def keys(self, scope: str, prefix: str) -> list[str]:
        """The scope's keys starting with ``prefix``, sorted."""

    def scoped(self, plugin: str) -> ScopedKV:
        """The view of one plugin: its keys only (under :func:`scope_of` ``plugin``)."""
        return ScopedKV(self, scope_of(plugin))


class PluginKV(abc.ABC):
    """``ctx.kv``: the plugin's durable key-value state (see :attr:`nexus.api.HandlerContext.kv`)."""

    @abc.abstractmethod
    async def get(self, key: str) -> KVEntry | None:
        """The entry stored under ``key`` (its value and revision), or None."""

    @abc.abstractmethod
    async def put(self, key: str, value: Any, *, expect_revision: int | None = None) -> int:
        """Store the JSON ``value`` under ``key``; returns its new revision.

        With ``expect_revision``, only while the key is at that revision (``0``: only while it does not exist);
        else :class:`KVConflict`. Raises :class:`~nexus.errors.InvalidArgument` for a bad key,
        :class:`~nexus.errors.InvalidPayload` for a value that is not JSON (or nests too deep),
        :class:`~nexus.errors.PayloadTooLarge` over the size limit, :class:`KVLimitExceeded` for a new key
        beyond the plugin's key limit, :class:`~nexus.errors.Unavailable` when the store cannot be reached.
        """

    @abc.abstractmethod
    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        """Remove ``key``; False when it did not exist. ``expect_revision`` as for :meth:`put`."""

    @abc.abstractmethod
    async def keys(self, prefix: str = "") -> list[str]:
        """The plugin's keys that start with ``prefix``, sorted."""


class ScopedKV(PluginKV):
    """One plugin's keys of a :class:`KeyValueStore`, with every key and value checked."""

    def __init__(self, store: KeyValueStore, scope: str) -> None:
        self.store = store
        self.scope = scope

    async def get(self, key: str) -> KVEntry | None:
        found = await self.store.get(self.scope, check_key(key))
        if found is None:
            return None
        data, revision = found
        return KVEntry(key, json.loads(data), revision)

    def encode(self, key: str, value: Any) -> bytes:
        limits = self.store.limits
        try:  # the checks of an event payload: JSON types, string keys, integers a double holds, depth
            validate_payload({"value": value}, max_depth=limits.max_depth + 1)
        except InvalidPayload as exc:
            raise InvalidPayload(f"the value of {quote(key)} is refused: {exc}") from None
        data = encode_json(value, f"the value of {quote(key)}")
        if len(data) > limits.max_value_bytes:
            raise PayloadTooLarge(
                f"the value of {quote(key)} is {len(data)} bytes as JSON, over the limit of {limits.max_value_bytes}"
            )
        return data

    async def put(self, key: str, value: Any, *, expect_revision: int | None = None) -> int:
        check_key(key)
        expected = check_revision(expect_revision)
        return await self.store.put(self.scope, key, self.encode(key, value), expected)

    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        return await self.store.delete(self.scope, check_key(key), check_revision(expect_revision))

    async def keys(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str) or len(prefix) > MAX_KEY_CHARS or _PREFIX.match(prefix) is None:
            raise InvalidArgument(f"prefix {quote(str(prefix))} is invalid: it must be the start of a valid key")
        return await self.store.keys(self.scope, prefix)
