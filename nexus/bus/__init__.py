"""Bus backends: the :class:`Bus` interface, the in-memory default, and NATS JetStream (``nexus.bus.nats``)."""

from nexus.bus.base import Bus, BusStats, Published, Subscription
from nexus.bus.memory import MemoryBus

__all__ = ["Bus", "BusStats", "MemoryBus", "Published", "Subscription"]
