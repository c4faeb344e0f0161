"""Request queues: who handles each ``requested`` event. The interface, the in-process default, and NATS
(``nexus.queue.nats``, which needs the NATS bus)."""

from nexus.queue.base import AbandonRequest, CancelRequest, ControlMessage, RequestQueue, RequestRoute
from nexus.queue.memory import MemoryRequestQueue

__all__ = ["AbandonRequest", "CancelRequest", "ControlMessage", "MemoryRequestQueue", "RequestQueue", "RequestRoute"]
