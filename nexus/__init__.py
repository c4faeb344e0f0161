"""Nexus: a real-time event bus with streaming handlers.

The public API plugin authors import::

    from nexus import Event, EventHandler, HandlerContext, Stream, StreamingEventHandler

and what a plugin needs from the server: ``ctx.follow`` (a :class:`Follower`), ``ctx.shared``,
``ctx.start_soon``, ``ctx.kv`` (a :class:`PluginKV` of :class:`KVEntry`, raising :class:`KVConflict` /
:class:`KVLimitExceeded`), the base of the data directories :func:`default_data_dir` (a node's own is
``ctx.config["data_dir"]``), the settings a plugin declares (:class:`ConfigKey`) and the readers
:func:`read_number` / :func:`read_int`. A plugin imports nothing else from ``nexus``.
"""

from nexus.api import (
    DEFAULT_FOLLOW_MAX_PENDING,
    SERVER_DEFAULT,
    EventHandler,
    Follower,
    HandlerContext,
    Stream,
    StreamingEventHandler,
)
from nexus.datadir import default_data_dir
from nexus.errors import (
    ErrorCode,
    InvalidEventType,
    InvalidPattern,
    InvalidPayload,
    NexusError,
    StreamClosed,
    StreamErrorType,
)
from nexus.events import Event, EventType, parse_time
from nexus.kv.base import KVConflict, KVEntry, KVLimitExceeded, PluginKV, key_for
from nexus.schema import ConfigKey, EventSpec
from nexus.settings import read_int, read_number, setting_name

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FOLLOW_MAX_PENDING",
    "SERVER_DEFAULT",
    "ConfigKey",
    "ErrorCode",
    "Event",
    "EventHandler",
    "EventSpec",
    "EventType",
    "Follower",
    "HandlerContext",
    "InvalidEventType",
    "InvalidPattern",
    "InvalidPayload",
    "KVConflict",
    "KVEntry",
    "KVLimitExceeded",
    "NexusError",
    "PluginKV",
    "Stream",
    "StreamClosed",
    "StreamErrorType",
    "StreamingEventHandler",
    "__version__",
    "default_data_dir",
    "key_for",
    "parse_time",
    "read_int",
    "read_number",
    "setting_name",
]
