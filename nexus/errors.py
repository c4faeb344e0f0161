"""Errors as data, with stable codes.

Every error Nexus reports to a client is a :class:`NexusError` carrying an :class:`ErrorCode`. The adapters map
the code once: ``nexus.grpc`` to a gRPC status, the gateway to a WebSocket error frame or close code.

::

    NexusError
    ├── InvalidEventType      INVALID_ARGUMENT   a type that is not <service>:<action>:v<N>:<state>
    ├── InvalidPattern        INVALID_ARGUMENT   a subscription pattern with a bad token
    ├── InvalidPayload        INVALID_ARGUMENT   a payload that is not a JSON object, or holds NaN/Infinity
    ├── InvalidArgument       INVALID_ARGUMENT   any other bad argument
    ├── ResourceExhausted     RESOURCE_EXHAUSTED a limit was reached
    │   ├── PayloadTooLarge                      a payload over the configured limit
    │   ├── SlowConsumer                         a subscriber whose bounded queue overflowed
    │   └── RateLimited                          a client publishing faster than its connection may
    ├── Unavailable           UNAVAILABLE        the server or bus cannot be reached now
    │   └── BusUnavailable                       the bus cannot store events now
    ├── NotFound              NOT_FOUND          e.g. no live stream with that correlation id
    ├── AlreadyExists         ALREADY_EXISTS     an event_id another client already used
    ├── Unauthenticated       UNAUTHENTICATED
    ├── PermissionDenied      PERMISSION_DENIED
    │   └── ReservedState                        a lifecycle event of a handled type, sent by a client
    ├── InvalidState          FAILED_PRECONDITION an operation on a stream or bus in the wrong state
    │   └── StreamClosed                          Stream.send() after the stream ended
    └── ConfigurationError    INVALID_ARGUMENT   at start-up: something that cannot be used as configured
        ├── HandlerConfigError                    a handler that cannot be registered
        ├── ConfigError (nexus.config)            a setting, naming where it came from
        ├── NatsSetupError (nexus.bus.nats)       a NATS server or stream that cannot be used as configured
        └── CliError (nexus.cli)                  a command line that cannot be used

``ConfigurationError`` is also a ``ValueError``: a value that cannot be used.

Stream failures reported inside ``failed`` events use :class:`StreamErrorType` instead: they are part of an
event's payload, not of a call's status.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Stable error codes, shared by every adapter."""

    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    INTERNAL = "internal"


class StreamErrorType(enum.StrEnum):
    """``error.type`` of a ``failed`` event (contract)."""

    HANDLER_ERROR = "handler_error"
    NO_HANDLER = "no_handler"
    INVALID_PAYLOAD = "invalid_payload"
    NODE_LOST = "node_lost"
    WORKER_LOST = "worker_lost"


class NexusError(Exception):
    """Base of every error Nexus reports; ``code`` says how adapters present it."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidEventType(NexusError):
    """An event type that does not follow ``<service>:<action>:v<N>:<state>``."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidPattern(NexusError):
    """A subscription pattern with a bad token."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidPayload(NexusError):
    """A payload that is not a JSON object, or holds NaN or Infinity."""

    code = ErrorCode.INVALID_ARGUMENT


class InvalidArgument(NexusError):
    """Any other argument a caller got wrong."""

    code = ErrorCode.INVALID_ARGUMENT


class ResourceExhausted(NexusError):
    """A limit was reached."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class PayloadTooLarge(ResourceExhausted):
    """A payload over the configured size limit."""


class SlowConsumer(ResourceExhausted):
    """A subscriber whose bounded queue overflowed; it may resume from ``last_offset``."""

    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, last_offset: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.last_offset = last_offset
        self.limit = limit


class RateLimited(ResourceExhausted):
    """A client publishing faster than its connection's rate (a token bucket); slowing down is enough."""


class Unavailable(NexusError):
    """The server or the bus cannot be reached right now; retrying later may work."""

    code = ErrorCode.UNAVAILABLE


class BusUnavailable(Unavailable):
    """The bus cannot store or deliver events right now."""


class NotFound(NexusError):
    """The thing named does not exist (a live stream, a handler)."""

    code = ErrorCode.NOT_FOUND


class Unauthenticated(NexusError):
    """No valid credentials."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(NexusError):
    """Credentials that do not allow this."""

    code = ErrorCode.PERMISSION_DENIED


class ReservedState(PermissionDenied):
    """A client publishing a lifecycle state (``started``, ``stream``, terminal ...) of a type a handler serves."""


class AlreadyExists(NexusError):
    """An ``event_id`` another client already used inside the dedupe window."""

    code = ErrorCode.ALREADY_EXISTS


class InvalidState(NexusError):
    """An operation on an object in a state that does not allow it."""

    code = ErrorCode.FAILED_PRECONDITION


class StreamClosed(InvalidState):
    """``Stream.send()`` after the stream reached its terminal event."""


class ConfigurationError(NexusError, ValueError):
    """Something that cannot be used as configured; raised at start-up, never while serving."""

    code = ErrorCode.INVALID_ARGUMENT


class HandlerConfigError(ConfigurationError):
    """A handler that cannot be registered (bad event_type, kind disagreeing with the streaming rules, ...)."""


_BY_CODE: dict[ErrorCode, type[NexusError]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidArgument,
    ErrorCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.UNAUTHENTICATED: Unauthenticated,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.ALREADY_EXISTS: AlreadyExists,
    ErrorCode.FAILED_PRECONDITION: InvalidState,
}


def error_for_code(code: ErrorCode, message: str) -> NexusError:
    """The exception a client raises for an error the server reported with ``code``."""
    cls = _BY_CODE.get(code, NexusError)
    error = cls(message)
    if cls is NexusError:
        error.code = code
    return error
