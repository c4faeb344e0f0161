"""Handlers in other processes: connected workers, their requests, and the pools that share requests among them.

A worker (any process speaking ``nexus.v1.WorkerService/HandleEvents``) declares the handlers it serves
(:class:`Declaration`); the provider puts it in one :class:`WorkerPool` per handler and drives each request it
gives a worker exactly as an in-process handler's. This module holds the state of that exchange, free of any
transport: the gRPC adapter turns frames into the messages below and writes :attr:`Worker.outbox` back.

- A :class:`Worker` is one connection: the requests it was given (:class:`Assignment`), its free slots per
  handler (``max_in_flight``), the credit of each stream (chunks it may still send), and when it was last heard.
  :meth:`Worker.receive` checks every message against what the worker was given, so a worker cannot speak for a
  request that is not its own, end one twice, or send more chunks than its credit.
- A :class:`WorkerPool` is one handler's members (workers, and in a configured pool the in-process handler):
  :meth:`WorkerPool.acquire` hands out the member with the most free slots (ties in turn), to waiting requests
  in the order they asked, which is offset order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import deque
from typing import Final

from nexus.errors import InvalidArgument, NexusError, StreamErrorType, Unavailable
from nexus.events import Event, JSONObject

DEFAULT_WORKER_PING_INTERVAL: Final = 1.0
DEFAULT_WORKER_TIMEOUT: Final = 3.0
DEFAULT_WORKER_GRACE: Final = 10.0
DEFAULT_LOCAL_IN_FLIGHT: Final = 16
DEFAULT_MAX_WORKERS: Final = 1_000
MAX_HANDLERS_PER_WORKER: Final = 256
MAX_IN_FLIGHT: Final = 10_000
"""The most requests one worker may take at once for one handler."""
MAX_NAME_LENGTH: Final = 200
MAX_OUTBOX: Final = 10_000
"""Frames waiting to be written to one worker: past it the worker does not read its stream and is dropped."""

_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True, slots=True)
class Declaration:
    """One handler a worker serves, as it declared it (checked by the provider against its rules)."""

    event_type: str
    """``service:action`` or ``service:action:vN``."""
    streaming: bool
    ordering_key: str | None = None
    stream_timeout: float | str | None = "default"
    """Seconds; None for no limit; ``"default"`` for the server's."""
    buffer_size: int | None = None
    """None: the server's default."""
    max_in_flight: int = 1
    name: str = ""

    def differs(self, other: Declaration) -> str | None:
        """How ``other`` (another worker's declaration of the same type) disagrees with this one, or None."""
        for field in ("streaming", "ordering_key", "stream_timeout", "buffer_size"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field} {theirs!r} (the pool's workers declare {mine!r})"
        return None


# --- messages from a worker ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    correlation_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Chunks:
    correlation_id: str
    payloads: tuple[JSONObject, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    correlation_id: str
    payload: JSONObject


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    correlation_id: str
    type: StreamErrorType
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class CancelAck:
    correlation_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    """The worker is stopping: no more requests for it."""


FromWorker = Started | Chunks | Result | Failure | CancelAck | Pong | Drain

FAILURE_TYPES: Final = {
    "": StreamErrorType.HANDLER_ERROR,
    StreamErrorType.HANDLER_ERROR.value: StreamErrorType.HANDLER_ERROR,
    StreamErrorType.INVALID_PAYLOAD.value: StreamErrorType.INVALID_PAYLOAD,
}
"""The ``error.type`` a worker may report (anything else is the server's to say)."""


def failure_type(text: str) -> StreamErrorType:
    """The :class:`StreamErrorType` of a worker's ``error.type``; raises InvalidArgument for another."""
    try:
        return FAILURE_TYPES[text]
    except KeyError:
        raise InvalidArgument(
            f"error type {text[:40]!r}: a worker reports 'handler_error' or 'invalid_payload'"
        ) from None


# --- messages to a worker ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Assign:
    request: Event
    credit: int
    timeout_s: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    correlation_id: str
    reason: str


@dataclasses.dataclass(slots=True)
class Credit:
    correlation_id: str
    chunks: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    correlation_id: str
    code: str
    message: str


ToWorker = Assign | Cancel | Credit | Ping | Refusal


class Lost:
    """What an assignment's reader gets when its worker is gone."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class WorkerLost(Unavailable):
    """A request's worker disconnected or stopped answering after the request started (``worker_lost``)."""


class WorkerUnavailable(Unavailable):
    """No worker of a handler came (back) within the grace period (``worker_lost``)."""


class RemoteFailure(NexusError):
    """A worker's handler failed: its ``error`` message, reported as the request's ``failed`` event."""

    def __init__(self, error_type: StreamErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


# --- members of a pool ---------------------------------------------------------------------------------------


class Member:
    """Something a pool gives requests to: a worker, or the in-process handler of a configured pool."""

    label: str
    last_assigned: int = 0

    def free(self, service_action: str) -> int:
        raise NotImplementedError

    def capacity(self, service_action: str) -> int:
        """Requests of ``service_action`` it runs at once."""
        raise NotImplementedError

    def take(self, service_action: str) -> None:
        raise NotImplementedError

    def release(self, service_action: str) -> None:
        raise NotImplementedError


class LocalMember(Member):
    """The in-process handler as one member of a pool shared with workers, with ``slots`` requests at once."""

    def __init__(self, slots: int) -> None:
        self.label = "in-process"
        self.slots = slots
        self.in_flight = 0

    def free(self, service_action: str) -> int:
        return self.slots - self.in_flight

    def capacity(self, service_action: str) -> int:
        return self.slots

    def take(self, service_action: str) -> None:
        self.in_flight += 1

    def release(self, service_action: str) -> None:
        self.in_flight -= 1


class Assignment:
    """One request a worker was given: what it may still send, and the messages it sent, for the provider."""

    def __init__(self, worker: Worker, service_action: str, correlation_id: str, credit: int) -> None:
        self.worker = worker
        self.service_action = service_action
        self.correlation_id = correlation_id
        self.credit = credit
        self.started = False
        self.ended = False
        """The worker sent its result or error, acknowledged a cancel, or was lost: its slot is free."""
        self.cancelled = False
        """The server sent a cancel: the worker's late messages are dropped quietly."""
        self._inbox: deque[Started | Chunks | Result | Failure | Lost] = deque()
        self._wake = asyncio.Event()

    async def next(self) -> Started | Chunks | Result | Failure | Lost:
        """The next message about this request (a :class:`Lost` when its worker is gone)."""
        while not self._inbox:
            self._wake.clear()
            await self._wake.wait()
        return self._inbox.popleft()

    def put(self, message: Started | Chunks | Result | Failure | Lost) -> None:
        self._inbox.append(message)
        self._wake.set()

    def grant(self, chunks: int) -> None:
        """Chunks left the stream's buffer: the worker may send as many more."""
        if self.ended or self.cancelled or chunks <= 0:
            return
        self.credit += chunks
        self.worker.grant(self.correlation_id, chunks)

    def cancel(self, reason: str) -> None:
        """The request ended on the server's side (cancel, timeout, shutdown): tell the worker to stop."""
        if self.ended or self.cancelled:
            return
        self.cancelled = True
        self.worker.send(Cancel(self.correlation_id, reason))


class Worker(Member):
    """One connected worker (see the module docstring)."""

    def __init__(self, name: str, declarations: tuple[Declaration, ...], *, owner: str = "") -> None:
        self.worker_id = f"w{next(_ids)}-{time.monotonic_ns() % 1_000_000:06d}"
        self.name = name or self.worker_id
        self.label = self.name
        self.owner = owner
        self.declarations = declarations
        self.slots = {declaration.event_type: declaration.max_in_flight for declaration in declarations}
        self.in_flight = dict.fromkeys(self.slots, 0)
        self.assignments: dict[str, Assignment] = {}
        self.last_heard = time.monotonic()
        self.lost: str | None = None
        self.draining = False
        """It asked for no more requests (it is stopping)."""
        self.closed = asyncio.Event()
        """Set when the worker is lost: its transport ends the connection."""
        self._outbox: deque[ToWorker] = deque()
        self._credits: dict[str, Credit] = {}
        self._ready = asyncio.Event()
        self._nonce = 0
        self.requests = 0
        """Requests given to it so far."""
        self.pools: dict[str, WorkerPool] = {}
        """The pool of each handler it serves: a freed slot goes to a request waiting there."""

    # --- slots (Member) ----------------------------------------------------------------------------------

    def free(self, service_action: str) -> int:
        if self.lost is not None or self.draining:
            return 0
        return self.slots.get(service_action, 0) - self.in_flight.get(service_action, 0)

    def capacity(self, service_action: str) -> int:
        return 0 if self.lost is not None else self.slots.get(service_action, 0)

    def take(self, service_action: str) -> None:
        self.in_flight[service_action] += 1

    def release(self, service_action: str) -> None:
        self.in_flight[service_action] -= 1
        pool = self.pools.get(service_action)
        if pool is not None and self.lost is None:
            pool.hand_out()

    # --- the server's side ------------------------------------------------------------------------------

    def assign(self, service_action: str, request: Event, *, credit: int, timeout_s: float | None) -> Assignment:
        """Give the worker a request (its slot taken by :meth:`WorkerPool.acquire`)."""
        assignment = Assignment(self, service_action, request.event_id, credit)
        self.assignments[request.event_id] = assignment
        self.requests += 1
        if self.lost is not None:
            assignment.put(Lost(self.lost))
        else:
            self.send(Assign(request, credit, timeout_s))
        return assignment

    def send(self, message: ToWorker) -> None:
        if self.lost is not None:
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self.lose(f"it does not read its stream ({MAX_OUTBOX} frames waiting)")
            return
        self._outbox.append(message)
        self._ready.set()

    def grant(self, correlation_id: str, chunks: int) -> None:
        """Credit for a stream, merged with credit not yet sent."""
        pending = self._credits.get(correlation_id)
        if pending is not None:
            pending.chunks += chunks
            return
        credit = Credit(correlation_id, chunks)
        self._credits[correlation_id] = credit
        self.send(credit)

    def ping(self) -> None:
        self._nonce += 1
        self.send(Ping(self._nonce))

    async def outgoing(self) -> list[ToWorker]:
        """What to send next, in order (waits while there is nothing); empty once the worker is lost."""
        while not self._outbox and self.lost is None:
            self._ready.clear()
            await self._ready.wait()
        messages = list(self._outbox)
        self._outbox.clear()
        for message in messages:
            if isinstance(message, Credit):
                self._credits.pop(message.correlation_id, None)
        return messages

    def lose(self, reason: str) -> None:
        """The worker is gone: every request it holds learns it (started ones fail, the others go elsewhere)."""
        if self.lost is not None:
            return
        self.lost = reason
        for assignment in self.assignments.values():
            if not assignment.ended:
                assignment.ended = True
                assignment.put(Lost(reason))
        self.assignments.clear()
        self._outbox.clear()
        self._ready.set()
        self.closed.set()

    # --- the worker's side ------------------------------------------------------------------------------

    def receive(self, message: FromWorker) -> Refusal | None:
        """Take one message from the worker; returns the refusal to send back when it is not acceptable."""
        self.last_heard = time.monotonic()
        if isinstance(message, Pong):
            return None
        if isinstance(message, Drain):
            self.draining = True
            return None
        correlation_id = message.correlation_id
        assignment = self.assignments.get(correlation_id)
        if assignment is None:
            return Refusal(
                correlation_id, "unknown_request", "no request with this correlation_id is given to this worker now"
            )
        if assignment.cancelled:
            # The server ended it first: whatever the worker sends until it acknowledges is dropped.
            if isinstance(message, (CancelAck, Result, Failure)):
                self._end(assignment)
            return None
        if isinstance(message, CancelAck):
            return Refusal(correlation_id, "protocol", "'cancelled' answers a cancel; this request was not cancelled")
        if isinstance(message, Started):
            if assignment.started:
                return Refusal(correlation_id, "protocol", "'started' was already sent for this request")
            assignment.started = True
            assignment.put(message)
            return None
        assignment.started = True
        if isinstance(message, Chunks):
            if len(message.payloads) > assignment.credit:
                refusal = Refusal(
                    correlation_id,
                    "over_credit",
                    f"{len(message.payloads)} chunks sent with credit for {assignment.credit}",
                )
                assignment.put(Failure(correlation_id, StreamErrorType.HANDLER_ERROR, f"the worker {refusal.message}"))
                self._end(assignment)
                return refusal
            assignment.credit -= len(message.payloads)
            assignment.put(message)
            return None
        assignment.put(message)
        self._end(assignment)
        return None

    def _end(self, assignment: Assignment) -> None:
        del self.assignments[assignment.correlation_id]
        self._credits.pop(assignment.correlation_id, None)
        if not assignment.ended:
            assignment.ended = True
            self.release(assignment.service_action)

    def describe(self) -> JSONObject:
        return {
            "worker_id": self.worker_id,
            "name": self.name,
            "handlers": [declaration.event_type for declaration in self.declarations],
            "in_flight": sum(self.in_flight.values()),
            "requests": self.requests,
        }


# --- pools ---------------------------------------------------------------------------------------------------


class WorkerPool:
    """The members serving one handler (``service_action``), and the requests waiting for a free slot."""

    def __init__(self, service_action: str, declaration: Declaration, local: LocalMember | None = None) -> None:
        self.service_action = service_action
        self.declaration = declaration
        self.local = local
        self.workers: list[Worker] = []
        self.closed: str | None = None
        """Why the pool no longer takes requests (no worker came back in time)."""
        self.empty_since: float | None = None if local is not None else time.monotonic()
        self._waiters: deque[asyncio.Future[Member]] = deque()
        self._turn = itertools.count(1)

    @property
    def members(self) -> list[Member]:
        members: list[Member] = list(self.workers)
        if self.local is not None:
            members.append(self.local)
        return members

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def join(self, worker: Worker) -> None:
        self.workers.append(worker)
        worker.pools[self.service_action] = self
        self.empty_since = None
        self.hand_out()

    def leave(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if not self.workers and self.local is None:
            self.empty_since = time.monotonic()

    def close(self, reason: str) -> None:
        """Take no more requests; every waiting request learns why."""
        self.closed = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(WorkerUnavailable(reason))

    async def acquire(self) -> Member:
        """The member to run the next request, its slot taken: the one with the most free slots, ties in turn.

        Requests that find no free slot wait in the order they asked. Raises :class:`WorkerUnavailable` once the
        pool is closed.
        """
        if self.closed is not None:
            raise WorkerUnavailable(self.closed)
        if not self._waiters:
            member = self._pick()
            if member is not None:
                return member
        waiter: asyncio.Future[Member] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            raise

    def release(self, member: Member) -> None:
        """Free a slot :meth:`acquire` took that no worker message frees: the in-process member's after its run,
        or any member's when the request never used it."""
        member.release(self.service_action)
        if isinstance(member, LocalMember):
            self.hand_out()

    def _pick(self) -> Member | None:
        best: Member | None = None
        for member in self.members:
            free = member.free(self.service_action)
            if free <= 0:
                continue
            if best is None:
                best = member
                continue
            best_free = best.free(self.service_action)
            if free > best_free or (free == best_free and member.last_assigned < best.last_assigned):
                best = member
        if best is None:
            return None
        best.take(self.service_action)
        best.last_assigned = next(self._turn)
        return best

    def hand_out(self) -> None:
        """Give free slots to waiting requests, first come first served."""
        while self._waiters:
            if self._waiters[0].done():
                self._waiters.popleft()
                continue
            member = self._pick()
            if member is None:
                return
            self._waiters.popleft().set_result(member)

    def describe(self) -> JSONObject:
        return {
            "workers": len(self.workers),
            "waiting": self.waiting,
            "free": sum(max(member.free(self.service_action), 0) for member in self.members),
        }
