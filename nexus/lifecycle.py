"""The lifecycle of one request, as a pure state machine. No I/O, no asyncio, no clock of its own.

::

    streaming:  REQUESTED --start()--> STARTED --chunk()*/heartbeat()*--> terminal
    plain:      REQUESTED ------------------------------------------------> terminal
    terminal:   succeed() | fail() | time_out() | cancel()   (exactly one)

Every transition returns the :class:`~nexus.events.Event` to publish; a transition the state does not allow
raises :class:`~nexus.errors.InvalidState` (``StreamClosed`` for a chunk after the end), so no event of a
stream can follow its terminal event and ``success`` can never follow a failure or a timeout.

Lifecycle events get a fresh ``event_id``, inherit the request's metadata and carry
``metadata.correlation_id`` = the request's ``event_id``.
"""

from __future__ import annotations

import enum
from typing import Any

from nexus.errors import InvalidState, StreamClosed, StreamErrorType
from nexus.events import (
    CANCELLED,
    FAILED,
    HEARTBEAT,
    REQUESTED,
    STARTED,
    STREAM,
    SUCCESS,
    TIMEOUT,
    Event,
    JSONObject,
    new_event_id,
    now_timestamp,
)


class State(enum.Enum):
    """Where a request's lifecycle stands."""

    REQUESTED = "requested"
    STARTED = "started"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether this is one of the four terminal states."""
        return self not in (State.REQUESTED, State.STARTED)


def _round(seconds: float) -> float:
    return round(max(seconds, 0.0), 6)


class Lifecycle:
    """The state machine of one request.

    ``now`` arguments are monotonic seconds supplied by the caller, so the machine is deterministic in tests.
    """

    def __init__(self, request: Event, *, streaming: bool, now: float) -> None:
        parsed = request.type
        if parsed.state != REQUESTED:
            raise InvalidState(f"a lifecycle starts from a 'requested' event, not {request.event_type!r}")
        self.request = request
        self.streaming = streaming
        self.base = parsed.base
        self.state = State.REQUESTED
        self.stream_count = 0
        self.requested_at = now
        self.started_at: float | None = None
        self.ended_at: float | None = None

    @property
    def correlation_id(self) -> str:
        """The request's ``event_id``."""
        return self.request.event_id

    @property
    def terminal(self) -> bool:
        """Whether the terminal event was produced."""
        return self.state.terminal

    def duration(self, now: float) -> float:
        """Seconds since the stream started (or was requested, for plain handlers), up to its end."""
        start = self.started_at if self.started_at is not None else self.requested_at
        end = self.ended_at if self.ended_at is not None else now
        return _round(end - start)

    def _event(self, state: str, payload: JSONObject) -> Event:
        metadata = dict(self.request.metadata)
        metadata["correlation_id"] = self.request.event_id
        return Event(
            event_type=f"{self.base}:{state}",
            payload=payload,
            event_id=new_event_id(),
            metadata=metadata,
            timestamp=now_timestamp(),
        )

    def _check_live(self, action: str) -> None:
        if self.state.terminal:
            raise StreamClosed(
                f"cannot {action}: the stream {self.correlation_id} already ended with {self.state.value}"
            )

    def start(self, now: float) -> Event:
        """REQUESTED -> STARTED: the ``started`` event (streaming handlers only)."""
        self._check_live("start")
        if not self.streaming:
            raise InvalidState("a plain handler's request has no 'started' event")
        if self.state is not State.REQUESTED:
            raise InvalidState(f"the stream {self.correlation_id} already started")
        self.state = State.STARTED
        self.started_at = now
        return self._event(STARTED, {})

    def chunk(self, payload: JSONObject) -> Event:
        """One ``stream`` event carrying ``payload``; counts it."""
        self._check_live("send a chunk")
        if self.state is not State.STARTED:
            raise InvalidState("a chunk needs a started stream")
        self.stream_count += 1
        return self._event(STREAM, payload)

    def heartbeat(self, now: float) -> Event:
        """A ``heartbeat`` event with ``stream_count`` and ``elapsed_s``."""
        self._check_live("send a heartbeat")
        if self.state is not State.STARTED:
            raise InvalidState("a heartbeat needs a started stream")
        return self._event(HEARTBEAT, {"stream_count": self.stream_count, "elapsed_s": self.duration(now)})

    def _end(self, state: State, now: float) -> None:
        self._check_live(f"end with {state.value}")
        self.state = state
        self.ended_at = now

    def succeed(self, now: float, result: JSONObject | None = None) -> Event:
        """The ``success`` event: the handler's result for plain handlers, statistics for streams."""
        self._end(State.SUCCESS, now)
        if self.streaming:
            return self._event(SUCCESS, {"stream_count": self.stream_count, "duration_s": self.duration(now)})
        return self._event(SUCCESS, dict(result or {}))

    def fail(self, now: float, error_type: StreamErrorType | str, message: str) -> Event:
        """The ``failed`` event with ``error: {type, message}``."""
        self._end(State.FAILED, now)
        payload: dict[str, Any] = {"error": {"type": str(error_type), "message": message}}
        if self.streaming:
            payload["stream_count"] = self.stream_count
            payload["duration_s"] = self.duration(now)
        return self._event(FAILED, payload)

    def time_out(self, now: float, timeout_s: float) -> Event:
        """The ``timeout`` event: the stream outlived ``timeout_s``."""
        self._end(State.TIMEOUT, now)
        return self._event(
            TIMEOUT,
            {"stream_count": self.stream_count, "duration_s": self.duration(now), "timeout_s": timeout_s},
        )

    def cancel(self, now: float, reason: str) -> Event:
        """The ``cancelled`` event with the reason."""
        self._end(State.CANCELLED, now)
        return self._event(
            CANCELLED, {"stream_count": self.stream_count, "duration_s": self.duration(now), "reason": reason}
        )

    def stats(self, now: float) -> JSONObject:
        """Statistics for logs and listings."""
        return {
            "correlation_id": self.correlation_id,
            "event_type": self.request.event_type,
            "state": self.state.value,
            "stream_count": self.stream_count,
            "duration_s": self.duration(now),
        }
