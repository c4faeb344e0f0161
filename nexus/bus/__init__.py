"""Bus backends: the :class:`Bus` interface, the in-memory default, and (with ``nexus-bus[nats]``) NATS."""

from nexus.bus.base import Bus, BusStats, Published, Subscription
from nexus.bus.memory import MemoryBus

__all__ = ["Bus", "BusStats", "MemoryBus", "Published", "Subscription"]
