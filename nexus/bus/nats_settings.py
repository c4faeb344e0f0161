"""What the NATS JetStream bus is told: its servers, its stream and the limits it keeps. Pure: no nats-py.

The application's :class:`~nexus.config.Settings` builds one (``Settings.nats_bus_settings()``); the bus reads
nothing else, so it can be embedded without the application's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from nexus.bus.memory import DEFAULT_DEDUPE_WINDOW_S, DEFAULT_HISTORY_MAX_BYTES, DEFAULT_HISTORY_SIZE
from nexus.bus.nats_codec import DEFAULT_STREAM, DEFAULT_SUBJECT_PREFIX
from nexus.events import DEFAULT_LIMITS, DEFAULT_MAX_PAYLOAD_BYTES, EventLimits

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_ACK_TIMEOUT_S: Final = 2.0
DEFAULT_PUBLISH_WINDOW: Final = 256
DEFAULT_PUBLISH_WINDOW_BYTES: Final = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class NatsBusSettings:
    """How one node uses NATS JetStream; every node of an installation shares ``stream`` and ``subject_prefix``."""

    servers: tuple[str, ...] = (DEFAULT_NATS_URL,)
    """The NATS servers to connect to (any of them; the client also learns a cluster's other servers)."""
    stream: str = DEFAULT_STREAM
    """The JetStream stream every node shares (created or updated at start-up)."""
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    """Events are stored on ``<prefix>.<service>.<action>.v<N>.<state>``."""
    retention: str = "limits"
    """``limits`` or ``interest``; never ``workqueue`` (it forbids the overlapping consumers replay needs)."""
    storage: str = "file"
    """``file`` or ``memory``."""
    replicas: int = 1
    """Copies of the stream in a NATS cluster."""
    max_age_s: float = 0.0
    """Seconds the stream keeps an event; ``0`` keeps it until ``history_size`` newer ones push it out."""
    history_size: int = DEFAULT_HISTORY_SIZE
    """Events the stream keeps (its ``max_msgs``)."""
    history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES
    """Bytes the stream keeps (its ``max_bytes``): the oldest events go first past either bound."""
    dedupe_window_s: float = DEFAULT_DEDUPE_WINDOW_S
    """Seconds a repeated ``event_id`` is recognised (the stream's duplicate window); ``0`` turns it off."""
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    """Seconds a publish waits for JetStream's acknowledgement before it fails with UNAVAILABLE."""
    publish_window: int = DEFAULT_PUBLISH_WINDOW
    """Publishes sent to JetStream and not acknowledged yet, at most; more wait their turn, in call order."""
    publish_window_bytes: int = DEFAULT_PUBLISH_WINDOW_BYTES
    """Message bytes sent and not acknowledged yet, at most (a larger message still goes, alone)."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    """The largest payload an event may carry; the NATS server must accept it plus the envelope."""
    limits: EventLimits = DEFAULT_LIMITS
    """What an event read from the stream may hold: anything may write there, so the tail checks every message."""
