"""A Nexus event seen as a CloudEvent 1.0, in the JSON event format (docs/cloudevents.md). Pure: no I/O.

::

    from nexus.client import CloudEventsView

    view = CloudEventsView(ordering_keys={"places:track_location": "agent_id"})
    async for event in client.subscribe("places:>"):
        print(json.dumps(view.convert(event)))      # {"specversion": "1.0", "type": ..., "data": {...}}

The mapping:

==================  =====================================================================================
``specversion``     ``"1.0"``
``id``              ``event_id``
``source``          ``/nexus/<epoch>``: the bus history the event's offset belongs to (``/nexus`` without one)
``type``            ``event_type`` (``places:track_location:v1:requested``)
``time``            ``timestamp`` (RFC 3339, UTC)
``subject``         the request the event belongs to: its own ``event_id`` for a ``requested`` event, else
                    ``metadata.correlation_id`` (lifecycle events); left out for other events
``datacontenttype`` ``"application/json"``
``data``            ``payload``
``sequence``        ``offset`` zero-padded to 20 digits, so text order is offset order; left out for offset 0
                    (heartbeats: never stored)
``partitionkey``    the value of the handler's ``ordering_key`` field in the request's payload, on the request
                    and on every lifecycle event of it the view saw the request of
``traceparent``,    ``metadata.traceparent`` / ``metadata.tracestate`` (the distributed-tracing extension)
``tracestate``
==================  =====================================================================================
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from nexus.events import REQUESTED, TERMINAL_STATES, Event, JSONObject

SPECVERSION: Final = "1.0"
DATACONTENTTYPE: Final = "application/json"
SEQUENCE_DIGITS: Final = 20
"""Digits of ``sequence``: every uint64 offset fits, so comparing the strings compares the offsets."""
EXTENSION_NAME: Final = re.compile(r"[a-z0-9]{1,20}\Z")
"""What CloudEvents allows as an extension attribute's name: lowercase letters and digits, at most 20."""
DEFAULT_REMEMBERED_REQUESTS: Final = 10_000


def source_of(event: Event) -> str:
    """``/nexus/<epoch>``: the bus history the event's offset counts in (``/nexus`` when it has no epoch)."""
    return f"/nexus/{event.epoch}" if event.epoch else "/nexus"


def subject_of(event: Event) -> str | None:
    """The request the event belongs to: a ``requested`` event's own id, else its ``correlation_id``, or None."""
    if event.state == REQUESTED:
        return event.event_id
    return event.metadata.get("correlation_id") or None


def sequence_of(offset: int) -> str | None:
    """``offset`` as a ``sequence`` value (zero-padded decimal), None for 0 (an event that was not stored)."""
    return f"{offset:0{SEQUENCE_DIGITS}d}" if offset > 0 else None


def to_cloudevent(event: Event, *, partition_key: str | None = None, source: str | None = None) -> JSONObject:
    """``event`` as a CloudEvent 1.0 in the JSON event format (a dict ready for ``json.dumps``).

    ``partition_key`` becomes the ``partitionkey`` extension; ``source`` replaces the default (``/nexus/<epoch>``).
    """
    attributes: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event.event_id,
        "source": source or source_of(event),
        "type": event.event_type,
        "time": event.timestamp,
        "datacontenttype": DATACONTENTTYPE,
    }
    optional = {
        "subject": subject_of(event),
        "sequence": sequence_of(event.offset),
        "partitionkey": partition_key,
        "traceparent": event.metadata.get("traceparent"),
        "tracestate": event.metadata.get("tracestate"),
    }
    attributes.update({name: value for name, value in optional.items() if value})
    attributes["data"] = event.payload
    return attributes


class CloudEventsView:
    """Converts a flow of events (a subscription's) to CloudEvents, with ``partitionkey`` where it is known.

    ``ordering_keys`` maps a handler's ``service:action`` (or ``service:action:vN``) to its ``ordering_key`` field
    (``nexus handlers --server`` and :meth:`NexusClient.handlers` list them). A request carrying that field gets
    its value as ``partitionkey``; the view remembers it (for the latest ``remember`` requests) and gives the
    same ``partitionkey`` to the request's lifecycle events, which it recognises by their ``correlation_id``.
    """

    def __init__(
        self,
        ordering_keys: Mapping[str, str] | None = None,
        *,
        source: str | None = None,
        remember: int = DEFAULT_REMEMBERED_REQUESTS,
    ) -> None:
        if remember < 0:
            raise ValueError(f"remember must be 0 or more, got {remember}")
        self.ordering_keys = dict(ordering_keys or {})
        self.source = source
        self._remember = remember
        self._keys: OrderedDict[str, str] = OrderedDict()

    def partition_key(self, event: Event) -> str | None:
        """The ``partitionkey`` of ``event``: its request's ordering-key value, when known."""
        if event.state != REQUESTED:
            correlation_id = event.metadata.get("correlation_id")
            if not correlation_id:
                return None
            if event.state in TERMINAL_STATES:  # nothing of the request follows its terminal event
                return self._keys.pop(correlation_id, None)
            return self._keys.get(correlation_id)
        base = event.event_type.rsplit(":", 1)[0]
        field = self.ordering_keys.get(base) or self.ordering_keys.get(base.rsplit(":", 1)[0])
        value = event.payload.get(field) if field else None
        if value is None or isinstance(value, (dict, list)):
            return None
        key = str(value).lower() if isinstance(value, bool) else str(value)
        if self._remember:
            self._keys[event.event_id] = key
            self._keys.move_to_end(event.event_id)
            while len(self._keys) > self._remember:
                self._keys.popitem(last=False)
        return key

    def convert(self, event: Event) -> JSONObject:
        """``event`` as a CloudEvent (see :func:`to_cloudevent`)."""
        return to_cloudevent(event, partition_key=self.partition_key(event), source=self.source)
