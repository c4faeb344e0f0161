"""Durable plugin state (``ctx.kv``): one interface, a SQLite store and a NATS JetStream key-value store."""

from nexus.kv.base import (
    DEFAULT_KV_MAX_KEYS,
    DEFAULT_KV_MAX_VALUE_BYTES,
    KeyValueStore,
    KVConflict,
    KVEntry,
    KVLimitExceeded,
    KVLimits,
    PluginKV,
    ScopedKV,
)
from nexus.kv.sqlite import SqliteKeyValue

__all__ = [
    "DEFAULT_KV_MAX_KEYS",
    "DEFAULT_KV_MAX_VALUE_BYTES",
    "KVConflict",
    "KVEntry",
    "KVLimitExceeded",
    "KVLimits",
    "KeyValueStore",
    "PluginKV",
    "ScopedKV",
    "SqliteKeyValue",
]
