"""Nexus: a real-time event bus with streaming handlers.

The public API plugin authors import::

    from nexus import Event, EventHandler, HandlerContext, Stream, StreamingEventHandler
"""

from nexus.api import SERVER_DEFAULT, EventHandler, HandlerContext, Stream, StreamingEventHandler
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
from nexus.schema import EventSpec

__version__ = "0.1.0"

__all__ = [
    "SERVER_DEFAULT",
    "ErrorCode",
    "Event",
    "EventHandler",
    "EventSpec",
    "EventType",
    "HandlerContext",
    "InvalidEventType",
    "InvalidPattern",
    "InvalidPayload",
    "NexusError",
    "Stream",
    "StreamClosed",
    "StreamErrorType",
    "StreamingEventHandler",
    "__version__",
    "parse_time",
]
