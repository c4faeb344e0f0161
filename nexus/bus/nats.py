"""The NATS JetStream bus: several Nexus nodes share one stream.

Every event is stored in one JetStream stream (a Limits stream: history is kept, so any node can replay it) on
the subject ``<prefix>.<service>.<action>.v<N>.<state>``; its offset is the stream sequence, the same on every
node, and the epoch names the stream instance (its name and creation time). Client ``event_id``s are
deduplicated by JetStream through ``Nats-Msg-Id``.

Each node follows the whole stream through ONE ordered push consumer on ``<prefix>.>`` (:class:`_Tail`; the
Debian nats-server 2.9 has no multi-filter consumers), matches events locally with the shared
:class:`~nexus.bus.base.Fanout` and hands them to its subscribers in batches: no task and no await per event per
subscriber. A subscriber resuming from an offset gets a replay read from the stream by a short-lived consumer,
then the live tail from exactly where the replay stopped (the subscription's ``start_after`` mark).

Heartbeats (:meth:`NatsBus.publish_live`) travel on plain NATS subjects outside the stream (``<prefix>_live.…``):
never stored, delivered by every node to its own subscribers.

The bus knows nothing of requests: :class:`~nexus.queue.nats.NatsRequestQueue` shares ``requested`` events out
among the nodes on top of it, through its connection (:meth:`NatsBus.connection`), :meth:`NatsBus.publish_once`
(one terminal event per request) and the batches the tail delivers (:meth:`NatsBus.on_delivery`).

The connection reconnects by itself. While it is down, publishes fail at once with
:class:`~nexus.errors.BusUnavailable` (nats-py would otherwise buffer them), :attr:`NatsBus.healthy` is False and
health callbacks hear it; once back, the node checks the stream, and the tail resumes after the last event it
delivered, so subscribers see no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, cast

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext, api

from nexus.bus.base import (
    DEFAULT_MAX_PENDING,
    Bus,
    BusStats,
    Fanout,
    HealthCallback,
    Published,
    Subscription,
    Visible,
)
from nexus.bus.memory import DEFAULT_DEDUPE_WINDOW_S
from nexus.bus.nats_codec import (
    ENVELOPE_RESERVE,
    EXPECTED_STREAM_HEADER,
    MSG_ID_HEADER,
    Subjects,
    SubjectTypes,
    ack_sequences,
    control_body,
    encode_event,
    event_msg_id,
    filter_for_patterns,
    parse_ack_reply,
    read_event,
    stream_epoch,
)
from nexus.bus.nats_settings import NatsBusSettings
from nexus.errors import BusUnavailable, ConfigurationError, InvalidEventType, NexusError, PayloadTooLarge
from nexus.events import Event, check_event, shorten
from nexus.logs import LogLimiter
from nexus.metrics import Metrics
from nexus.patterns import parse_pattern

TAIL_HEARTBEAT_S: Final = 0.5
"""Idle heartbeat of the tail consumer; three missed ones make the node re-create it."""
TAIL_INACTIVE_S: Final = 30.0
"""A tail or replay consumer nobody reads is removed by the server after this long (a node that died)."""
REPLAY_BATCH: Final = 500
REPLAY_STEP_TIMEOUT_S: Final = 5.0
RECONNECT_WAIT_S: Final = 0.5
CONNECT_TIMEOUT_S: Final = 5.0
API_TIMEOUT_S: Final = 5.0
RECOVERY_TIMEOUT_S: Final = 1.0
PENDING_MSGS_LIMIT: Final = 1_000_000
PENDING_BYTES_LIMIT: Final = 1024 * 1024 * 1024

log = structlog.get_logger("nexus.bus.nats")

DeliveryCallback = Callable[[Sequence[Event]], None]
EpochCallback = Callable[[str], None]


class NatsSetupError(ConfigurationError):
    """The NATS server or the stream cannot be used as configured (raised at start-up, with what to change)."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (its caller gave up on it)."""
    if not future.cancelled():
        future.exception()


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class _Tail:
    """The node's one ordered push consumer on every Nexus subject: how a node sees every stored event.

    Ack-less, flow-controlled and heart-beating, like nats-py's ordered consumer, but explicit about what a
    node needs: every message is checked against the consumer sequence, and on a gap, a missed heartbeat or a
    reconnection the consumer is re-created from the stream sequence after the last event delivered.
    """

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self.generation = 0
        self.consumer = ""
        self.consumer_seq = 0
        self.last_activity = time.monotonic()
        self._sub: NatsSubscription | None = None
        self._lock = asyncio.Lock()
        self._reset: asyncio.Task[None] | None = None
        self._wanted: str | None = None

    async def start(self, start_seq: int) -> None:
        await self._create(start_seq)

    def request_reset(self, reason: str) -> None:
        """Re-create the consumer after the last delivered event (in the background, retrying; one at a time)."""
        if self.bus.closing:
            return
        self._wanted = reason
        if self._reset is None or self._reset.done():
            self._reset = self.bus.spawn(self._reset_loop(), "nexus-nats-tail-reset")

    async def _reset_loop(self) -> None:
        delay = 0.1
        while self._wanted is not None and not self.bus.closing:
            reason, self._wanted = self._wanted, None
            await self.bus.wait_connected()
            try:
                # The stream may have been re-created meanwhile: then offsets start again (a new epoch).
                await self.bus.ensure_stream(timeout=RECOVERY_TIMEOUT_S)
                await self._create(self.bus.received + 1, timeout=RECOVERY_TIMEOUT_S)
            except Exception as exc:
                log.warning("tail_reset_failed", reason=reason, error=_describe(exc), retry_in_s=delay)
                self._wanted = self._wanted or reason
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            log.info("tail_resumed", reason=reason, after_offset=self.bus.received, consumer=self.consumer)

    async def _create(self, start_seq: int, timeout: float = API_TIMEOUT_S) -> None:
        bus = self.bus
        nc, js = bus.connection()
        async with self._lock:
            old_sub, old_consumer = self._sub, self.consumer
            self.generation += 1
            generation = self.generation
            inbox = nc.new_inbox()

            async def on_message(msg: Msg) -> None:
                await self._on_message(generation, msg)

            sub = await nc.subscribe(
                inbox, cb=on_message, pending_msgs_limit=PENDING_MSGS_LIMIT, pending_bytes_limit=PENDING_BYTES_LIMIT
            )
            config = api.ConsumerConfig(
                deliver_subject=inbox,
                filter_subject=bus.subjects.events,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(start_seq, 1),
                ack_policy=api.AckPolicy.NONE,
                max_deliver=1,
                flow_control=True,
                idle_heartbeat=TAIL_HEARTBEAT_S,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=TAIL_INACTIVE_S,
                description=f"nexus node {bus.node_id}: tail",
            )
            try:
                info = await js.add_consumer(bus.stream, config, timeout=timeout)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                raise
            self._sub, self.consumer, self.consumer_seq = sub, info.name, 0
            self.last_activity = time.monotonic()
        if old_sub is not None:
            with contextlib.suppress(Exception):
                await old_sub.unsubscribe()
        if old_consumer:
            bus.spawn(bus.delete_consumer(old_consumer), "nexus-nats-delete-consumer")

    async def _on_message(self, generation: int, msg: Msg) -> None:
        if generation != self.generation:
            return  # from a consumer that was replaced
        self.last_activity = time.monotonic()
        reply = msg.reply or ""
        if not reply.startswith("$JS.ACK."):
            await self._on_status(msg)
            return
        sequences = ack_sequences(reply)
        if sequences is None:
            return
        stream_seq, consumer_seq = sequences
        if consumer_seq <= self.consumer_seq:
            return  # delivered again (a consumer leader changed): already handled
        if consumer_seq != self.consumer_seq + 1:
            self.request_reset(f"consumer sequence {consumer_seq} after {self.consumer_seq}")
            return
        self.consumer_seq = consumer_seq
        self.bus.on_stored(msg, stream_seq)

    async def _on_status(self, msg: Msg) -> None:
        nc, _ = self.bus.connection()
        headers = msg.headers or {}
        if msg.reply:  # a flow-control request: everything before it was handled
            await nc.publish(msg.reply)
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            await nc.publish(stalled)
        last = headers.get("Nats-Last-Consumer")
        if last is not None and last.isdigit() and int(last) != self.consumer_seq:
            self.request_reset(f"heartbeat says consumer sequence {last}, this node has {self.consumer_seq}")

    async def stop(self) -> None:
        if self._reset is not None:
            self._reset.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self.consumer:
            # Best effort: an unread ephemeral consumer also goes away by itself after TAIL_INACTIVE_S.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.delete_consumer(self.consumer), 1.0)
            self.consumer = ""


class _Publisher:
    """Windowed asynchronous JetStream publishing: messages go out without waiting for each ack in turn.

    Every message is sent at once with its own reply subject under one wildcard inbox, and its ack is matched to
    its caller, who alone waits for it; so concurrent publishes (many EmitEvents in flight, handlers publishing,
    :meth:`NatsBus.publish_many`) share the round trips. At most ``window`` messages (and ``window_bytes``) are
    unacked at a time; beyond, callers wait their turn in call order, so the stream stores events in the order
    :meth:`send` was called. An ack not received within the timeout, or lost with the connection, fails that
    publish only (:meth:`fail_all` on a disconnection: nothing sent before it will be acknowledged).
    """

    def __init__(self, bus: NatsBus, window: int, window_bytes: int) -> None:
        self.bus = bus
        self.window = max(window, 1)
        self.window_bytes = max(window_bytes, 1)
        self._prefix = ""
        self._sub: NatsSubscription | None = None
        self._next = 0
        self._acks: dict[str, tuple[asyncio.Future[tuple[int, bool]], float, int]] = {}
        self._bytes = 0
        self._turns: collections.deque[tuple[asyncio.Future[str | None], int]] = collections.deque()
        self._granted = 0
        self._granted_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        nc, _ = self.bus.connection()
        self._prefix = nc.new_inbox() + "."
        self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_ack, pending_msgs_limit=0, pending_bytes_limit=0)

    @property
    def in_flight(self) -> int:
        """Messages sent and not acknowledged (nor failed) yet."""
        return len(self._acks)

    def _has_room(self, size: int) -> bool:
        flying = len(self._acks) + self._granted
        return flying == 0 or (flying < self.window and self._bytes + self._granted_bytes + size <= self.window_bytes)

    async def send(self, subject: str, data: bytes, headers: dict[str, str]) -> asyncio.Future[tuple[int, bool]]:
        """Send one message (after the publishes called before it); the future gives ``(sequence, duplicate)``."""
        size = len(data)
        if self._turns or self._granted or not self._has_room(size):
            await self._wait_turn(size)
            self._granted -= 1
            self._granted_bytes -= size
        try:
            self.bus._check_ready()
            nc, _ = self.bus.connection()
        except BaseException:
            self._grant()
            raise
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, bool]] = loop.create_future()
        deadline = loop.time() + self.bus.ack_timeout
        self._acks[token] = (future, deadline, size)
        self._bytes += size
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        if self._turns:
            self._grant()
        try:
            await nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._settle(token)
            raise
        return future

    async def _wait_turn(self, size: int) -> None:
        """Wait until the publishes called before this one were sent and the window has room for it; when it
        returns, the turn is granted (counted in ``_granted`` until the caller sends)."""
        turn: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._turns.append((turn, size))
        self._grant()
        try:
            failed = await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # granted, then cancelled before it could send
                self._granted -= 1
                self._granted_bytes -= size
                self._grant()
            else:
                with contextlib.suppress(ValueError):
                    self._turns.remove((turn, size))
            raise
        if failed is not None:
            self._granted -= 1
            self._granted_bytes -= size
            raise BusUnavailable(failed)

    def _grant(self) -> None:
        """Let waiting publishes go, oldest first, while the window has room for each."""
        while self._turns:
            turn, size = self._turns[0]
            if turn.done():
                self._turns.popleft()
                continue
            if not self._has_room(size):
                return
            self._turns.popleft()
            self._granted += 1
            self._granted_bytes += size
            turn.set_result(None)

    def _settle(self, token: str) -> tuple[asyncio.Future[tuple[int, bool]], float, int] | None:
        entry = self._acks.pop(token, None)
        if entry is not None:
            self._bytes -= entry[2]
            if self._turns:
                self._grant()
        return entry

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._settle(msg.subject[len(self._prefix) :])
        if entry is None or entry[0].done():
            return  # failed already (timed out, or the connection was lost)
        future = entry[0]
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            reply = json.loads(msg.data)
            error = reply.get("error")
            if error is not None:
                future.set_exception(nats.js.errors.APIError.from_error(error))
                return
            future.set_result((int(reply["seq"]), bool(reply.get("duplicate", False))))
        except (ValueError, TypeError, KeyError, AttributeError):
            future.set_exception(BusUnavailable(f"JetStream answered a publish with {shorten(repr(msg.data))}"))

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._acks:
            token, (future, deadline, _) = next(iter(self._acks.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire)
                return
            self._settle(token)
            if not future.done():
                future.set_exception(TimeoutError())

    def fail_all(self, reason: str) -> None:
        """Fail every publish waiting for its ack, and every one waiting for its turn, with BusUnavailable."""
        acks, self._acks, self._bytes = self._acks, {}, 0
        for future, _, _ in acks.values():
            if not future.done():
                future.set_exception(BusUnavailable(reason))
        while self._turns:
            turn, size = self._turns.popleft()
            if not turn.done():
                self._granted += 1
                self._granted_bytes += size
                turn.set_result(reason)  # the waiting publish raises it

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fail_all("the bus is closed; the event may or may not be stored")
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


class _RangeReader:
    """Reads stored messages from ``start`` up to ``end`` (inclusive) through an ephemeral pull consumer."""

    def __init__(self, bus: NatsBus, filter_subject: str, start: int, end: int) -> None:
        self.bus = bus
        self.filter_subject = filter_subject
        self.start = start
        self.end = end

    async def read(self, deliver: Callable[[list[Event]], Awaitable[None]]) -> None:
        """Hand every event in the range to ``deliver``, in order, a batch at a time."""
        bus = self.bus
        nc, js = bus.connection()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.start,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=self.filter_subject,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=TAIL_INACTIVE_S,
            description=f"nexus node {bus.node_id}: replay",
        )
        info = await js.add_consumer(bus.stream, config, timeout=API_TIMEOUT_S)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{bus.stream}.{info.name}"
        request = control_body({"batch": REPLAY_BATCH, "no_wait": True})
        try:
            while True:
                messages = await self._pull(nc, next_subject, request)
                events: list[Event] = []
                finished = True
                for msg in messages:
                    ack = parse_ack_reply(msg.reply or "")
                    if ack is None or ack.stream_seq > self.end:
                        break  # this pull is over: nothing more is stored now, or the range is done
                    event = bus.decode(msg, ack.stream_seq, path="replay")
                    if event is not None:
                        events.append(event)
                    finished = ack.stream_seq >= self.end or ack.pending == 0
                if events:
                    await deliver(events)
                if finished:
                    return
        finally:
            bus.spawn(bus.delete_consumer(info.name), "nexus-nats-delete-consumer")

    @staticmethod
    async def _pull(nc: NatsClient, next_subject: str, request: bytes) -> list[Msg]:
        """One ``no_wait`` pull on its own inbox (so a late status of an earlier pull cannot end it)."""
        messages: list[Msg] = []
        done = asyncio.Event()

        async def on_message(msg: Msg) -> None:
            messages.append(msg)
            if not (msg.reply or "").startswith("$JS.ACK.") or len(messages) >= REPLAY_BATCH:
                done.set()

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=0, pending_bytes_limit=0)
        try:
            await nc.publish(next_subject, request, reply=inbox)
            await asyncio.wait_for(done.wait(), REPLAY_STEP_TIMEOUT_S)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return messages


class NatsBus(Bus):
    """A bus shared by every Nexus node connected to one NATS JetStream stream."""

    def __init__(
        self,
        settings: NatsBusSettings | None = None,
        *,
        node_id: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        settings = settings or NatsBusSettings()
        self.settings = settings
        self.connect_timeout_s = connect_timeout_s
        self.servers = [server.strip() for server in settings.servers if server.strip()]
        self.stream = settings.stream
        self.subjects = Subjects(settings.subject_prefix)
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.epoch = ""
        self.ack_timeout = settings.ack_timeout_s
        self.dedupe = settings.dedupe_window_s > 0
        duplicate_window = settings.dedupe_window_s if self.dedupe else DEFAULT_DEDUPE_WINDOW_S
        if settings.max_age_s > 0:
            duplicate_window = min(duplicate_window, settings.max_age_s)
        self.duplicate_window = duplicate_window
        self.closing = False
        self.received = 0
        """The stream sequence of the last event this node's tail handed to local delivery."""
        self._fanout = Fanout()
        self._types = SubjectTypes(self.subjects)
        self._warnings = LogLimiter()
        self.reconnects = 0
        """Reconnections to NATS since start (metrics)."""
        self.quarantined = 0
        """Messages this node's tail (or live subscription) refused as no valid event: skipped, each counted once."""
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._started = False
        self._closed = False
        self._ready = False
        self._connected = asyncio.Event()
        self._max_message = 0
        self._stream_header = {EXPECTED_STREAM_HEADER: self.stream}
        self._head = 0
        self._first_offset = 1
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._progress = asyncio.Event()
        self._health: list[HealthCallback] = []
        self._delivery: list[DeliveryCallback] = []
        self._epoch_callbacks: list[EpochCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._core_subs: list[NatsSubscription] = []
        self._published = 0
        self._duplicates = 0
        self._last_error = ""
        self._recovery: asyncio.Task[None] | None = None
        self._tail = _Tail(self)
        self._publisher = _Publisher(self, settings.publish_window, settings.publish_window_bytes)
        self._sent: dict[bytes, tuple[str, Event]] = {}
        """What this node sent and its tail has not read yet, by body: see :meth:`_remember`."""
        self._sent_limit = max(4 * settings.publish_window, 1024)

    # --- plumbing -------------------------------------------------------------------------------------------

    def connection(self) -> tuple[NatsClient, JetStreamContext]:
        """The NATS connection and its JetStream context (raises BusUnavailable before start or after close)."""
        if self._nc is None or self._js is None or self._closed:
            raise BusUnavailable("the bus is closed" if self._closed else "the bus is not started")
        return self._nc, self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected and not self._closed

    async def wait_connected(self) -> None:
        """Wait until the NATS connection is up (returns at once when it is)."""
        while not self.connected:
            if self.closing:
                raise asyncio.CancelledError
            self._connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 1.0)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coroutine`` in a task the bus cancels when it closes."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.closing:
            log.error("nats_task_failed", task=task.get_name(), error=_describe(task.exception() or Exception()))

    async def delete_consumer(self, name: str) -> None:
        """Remove a consumer, ignoring errors (it may be gone, or the server unreachable)."""
        if not self.connected:
            return
        with contextlib.suppress(Exception):
            _, js = self.connection()
            await js.delete_consumer(self.stream, name)

    def _set_health(self, healthy: bool) -> None:
        for callback in list(self._health):
            try:
                callback(healthy)
            except Exception as exc:
                log.error("health_callback_failed", error=_describe(exc))

    # --- start and stop -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        nc = NatsClient()
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=self.servers,
                    name=f"nexus {self.node_id}",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=cast(int, RECONNECT_WAIT_S),  # annotated int; seconds as float work
                    ping_interval=5,
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                self.connect_timeout_s,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self.closing = True  # quiet: no disconnection to report for a connection that never was
            with contextlib.suppress(Exception):
                await nc.close()
            self.closing = False
            detail = self._last_error or _describe(exc)
            raise BusUnavailable(
                f"cannot connect to NATS at {', '.join(self.servers)} within {self.connect_timeout_s:g}s ({detail})"
            ) from None
        self._nc = nc
        self._js = nc.jetstream(timeout=API_TIMEOUT_S)
        self._connected.set()
        try:
            await self._check_server()
            info = await self.ensure_stream()
            self.received = info.state.last_seq
            self._head = info.state.last_seq
            self._core_subs.append(await nc.subscribe(self.subjects.live, cb=self._on_live))
            await self._publisher.start()
            await self._tail.start(self.received + 1)
            self._started = True
            self._ready = True
        except BaseException:
            self.closing = True
            with contextlib.suppress(Exception):
                await nc.close()
            self._nc = self._js = None
            raise
        self.spawn(self._watch_tail(), "nexus-nats-tail-watch")
        log.info(
            "nats_bus_started",
            servers=self.servers,
            stream=self.stream,
            subjects=self.subjects.events,
            epoch=self.epoch,
            head_offset=self._head,
            node=self.node_id,
        )

    async def _check_server(self) -> None:
        nc, js = self.connection()
        url = self._url()
        try:
            await js.account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise NatsSetupError(
                f"JetStream is not enabled on the NATS server at {url}: start nats-server with -js "
                "(or 'jetstream: enabled' in its configuration)"
            ) from None
        limit = self.settings.max_payload_bytes + ENVELOPE_RESERVE
        self._max_message = nc.max_payload
        if nc.max_payload < limit:
            raise NatsSetupError(
                f"the NATS server at {url} accepts messages up to {nc.max_payload} bytes (its max_payload), but an "
                f"event needs max_payload_bytes ({self.settings.max_payload_bytes}) plus {ENVELOPE_RESERVE} bytes "
                f"for its id, timestamp and metadata: set 'max_payload: {limit}' in the nats-server configuration, "
                f"or lower max_payload_bytes to {nc.max_payload - ENVELOPE_RESERVE} "
                "(--max-payload-bytes, NEXUS_MAX_PAYLOAD_BYTES)"
            )

    def _url(self) -> str:
        if self._nc is not None and self._nc.connected_url is not None:
            return self._nc.connected_url.geturl()
        return ", ".join(self.servers)

    def _stream_config(self) -> api.StreamConfig:
        settings = self.settings
        return api.StreamConfig(
            name=self.stream,
            description="Nexus events",
            subjects=[self.subjects.events],
            retention=api.RetentionPolicy(settings.retention),
            storage=api.StorageType(settings.storage),
            num_replicas=settings.replicas,
            max_msgs=settings.history_size,
            max_bytes=settings.history_max_bytes,
            max_age=settings.max_age_s or None,
            duplicate_window=self.duplicate_window,
            discard=api.DiscardPolicy.OLD,
        )

    async def ensure_stream(self, timeout: float = API_TIMEOUT_S) -> api.StreamInfo:
        """Create the stream, or bring its settings in line; set the epoch from its creation time.

        A stream re-created since (another creation time) is another history: see :meth:`_replace_history`.
        """
        nc, _ = self.connection()
        js = nc.jetstream(timeout=timeout)
        wanted = self._stream_config()
        try:
            try:
                info = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    info = await js.add_stream(wanted)
                    log.info(
                        "stream_created", stream=self.stream, subjects=wanted.subjects, replicas=wanted.num_replicas
                    )
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != 10058:  # created by another node meanwhile
                        raise
                    info = await js.stream_info(self.stream)
            changes = self._stream_changes(info.config, wanted)
            if changes:
                info = await js.update_stream(wanted)
                log.info("stream_updated", stream=self.stream, changes=changes)
        except nats.js.errors.APIError as exc:
            raise NatsSetupError(
                f"cannot use the JetStream stream {self.stream!r} on {self._url()}: {exc.description} "
                f"(error {exc.err_code}); check --nats-stream, --nats-subject-prefix and --nats-replicas "
                "(a cluster needs at least as many JetStream servers as replicas)"
            ) from None
        created = info.created or datetime.fromtimestamp(0, UTC)
        epoch = stream_epoch(self.stream, created)
        if self.epoch and epoch != self.epoch:
            self._replace_history(epoch)
        self.epoch = epoch
        self._first_offset = info.state.first_seq or info.state.last_seq + 1
        self._head = max(self._head, info.state.last_seq)
        return info

    @staticmethod
    def _stream_changes(current: api.StreamConfig, wanted: api.StreamConfig) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for field in (
            "subjects",
            "num_replicas",
            "max_msgs",
            "max_bytes",
            "max_age",
            "duplicate_window",
            "retention",
            "storage",
        ):
            have, want = getattr(current, field), getattr(wanted, field)
            if field == "max_age":
                have, want = have or 0, want or 0
            if field in ("retention", "storage"):
                have, want = str(getattr(have, "value", have)), str(getattr(want, "value", want))
            if field in ("max_age", "duplicate_window"):
                if abs(float(have or 0) - float(want or 0)) < 1e-6:
                    continue
            elif have == want:
                continue
            changes[field] = {"from": have, "to": want}
        return changes

    def _replace_history(self, epoch: str) -> None:
        """The stream was re-created: offsets restart, so every subscriber must resume and be told."""
        log.warning("stream_replaced", stream=self.stream, old_epoch=self.epoch, new_epoch=epoch)
        self.received = 0
        self._head = 0
        self._sent.clear()
        self._fanout.close_all()
        for callback in list(self._epoch_callbacks):
            callback(epoch)

    async def close(self) -> None:
        if self._closed:
            return
        self.closing = True
        if self._started:
            await self.wait_delivered()
            await self._tail.stop()
        await self._publisher.stop()
        self._flush()
        self._fanout.close_all()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._closed = True
        self._ready = False
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        log.info("nats_bus_closed", node=self.node_id, stream=self.stream)

    async def wait_delivered(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout`` seconds) until the tail has delivered what this node stored.

        Before closing, so that local subscribers receive a shutdown's ``cancelled`` events first.
        """
        deadline = time.monotonic() + timeout
        while self.received < self._head and self.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        self._flush()

    # --- connection events ----------------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = _describe(exc)
        if isinstance(exc, (OSError, nats.errors.StaleConnectionError, nats.errors.UnexpectedEOF)):
            log.debug("nats_connection_error", error=self._last_error)
        else:
            log.warning("nats_error", error=self._last_error)

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if self.closing:
            return
        self._ready = False
        log.warning("nats_disconnected", servers=self.servers, node=self.node_id)
        self._publisher.fail_all(
            "the connection to NATS was lost before JetStream acknowledged the event; it may or may not be "
            "stored: publish it again with the same event_id to be sure"
        )
        self._set_health(False)

    async def _on_reconnected(self) -> None:
        self._connected.set()
        if self.closing:
            return
        self.reconnects += 1
        log.info("nats_reconnected", server=self._url(), node=self.node_id)
        self._start_recovery()

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = self.spawn(self._recover(), "nexus-nats-recover")

    async def _on_closed(self) -> None:
        if not self.closing:
            log.error("nats_connection_closed", servers=self.servers, node=self.node_id)
            self._ready = False
            self._set_health(False)

    async def _recover(self) -> None:
        """After a reconnection: make sure the stream is there, resume the tail, then report healthy."""
        delay = 0.1
        while not self.closing:
            await self.wait_connected()
            try:
                # A short timeout: during a cluster's leader election an attempt may go unanswered; try again.
                await self.ensure_stream(timeout=RECOVERY_TIMEOUT_S)
                break
            except Exception as exc:
                log.warning("nats_recovery_failed", error=_describe(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        else:
            return
        self._tail.request_reset("reconnected")
        self._ready = True
        self._set_health(True)
        log.info("nats_recovered", epoch=self.epoch, after_offset=self.received, node=self.node_id)

    async def _watch_tail(self) -> None:
        while not self.closing:
            await asyncio.sleep(TAIL_HEARTBEAT_S)
            if self.connected and time.monotonic() - self._tail.last_activity > 3 * TAIL_HEARTBEAT_S:
                self._tail.request_reset("no heartbeat from the tail consumer")
                self._tail.last_activity = time.monotonic()

    # --- Bus ------------------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._started and self._ready and self.connected

    def on_health(self, callback: HealthCallback) -> None:
        self._health.append(callback)

    def on_delivery(self, callback: DeliveryCallback) -> None:
        """Call ``callback`` with each batch the node delivers, before its subscribers get it; synchronously.

        A batch holds stored events in offset order (and live ones, offset 0): what the tail read.
        """
        self._delivery.append(callback)

    def on_epoch(self, callback: EpochCallback) -> None:
        """Call ``callback(epoch)`` when the stream was found re-created: offsets restart, in a new epoch."""
        self._epoch_callbacks.append(callback)

    def _check_ready(self) -> None:
        if self._closed or self.closing:
            raise BusUnavailable("the bus is closed")
        if not self._started:
            raise BusUnavailable("the bus is not started")
        if not self.healthy:
            raise BusUnavailable(
                f"the connection to NATS ({', '.join(self.servers)}) is down; reconnecting. Nothing was stored"
            )

    def _message(self, event: Event, msg_id: str | None = None) -> tuple[str, bytes, dict[str, str]]:
        data = encode_event(event)
        if msg_id is None and self.dedupe:
            msg_id = event_msg_id(event.event_id)
        # Headers count against max_payload too: "NATS/1.0", Nats-Msg-Id and Nats-Expected-Stream, CRLFs.
        headers_size = 12 + len("Nats-Expected-Stream: \r\n") + len(self.stream)
        if msg_id:
            headers_size += len(f"{MSG_ID_HEADER}: \r\n".encode()) + len(msg_id.encode())
        size = len(data) + headers_size
        if size > self._max_message:
            raise PayloadTooLarge(
                f"the event is {size} bytes with its id, timestamp and metadata, over the "
                f"{self._max_message} bytes the NATS server accepts (max_payload)"
            )
        headers = {MSG_ID_HEADER: msg_id, EXPECTED_STREAM_HEADER: self.stream} if msg_id else self._stream_header
        return self.subjects.for_type(event.event_type), data, headers

    def _remember(self, subject: str, data: bytes, event: Event) -> None:
        """Keep the event this node just sent as ``data`` on ``subject``: its tail need not decode it again.

        Reading a message is a pure function of its subject and body when the body holds the envelope with an id
        and a timestamp, as every body this node writes does: the tail's event is then this one, stored. It is
        checked here as the tail would check it (an event the tail would quarantine is not kept). Bounded: past
        :attr:`_sent_limit` bodies waiting for the tail, they are forgotten (the tail decodes them).
        """
        if not event.event_id or not event.timestamp:
            return
        try:
            check_event(event, self.settings.limits, size_at_most=event.size())
        except NexusError:
            return
        if len(self._sent) >= self._sent_limit:
            self._sent.clear()
        self._sent[data] = (subject, event)

    async def publish(self, event: Event) -> Published:
        return await self._store(event)

    async def publish_once(self, event: Event, msg_id: str) -> Published:
        """Store ``event`` deduplicated by ``msg_id`` (its ``Nats-Msg-Id``) rather than by its ``event_id``.

        The first event stored with ``msg_id`` inside the duplicate window wins, whichever node sends it; a
        later one is answered with that original (``duplicate``).
        """
        return await self._store(event, msg_id)

    async def _store(self, event: Event, msg_id: str | None = None) -> Published:
        if self._closed or self.closing or not self._started:
            self._check_ready()
        subject, data, headers = self._message(event, msg_id)
        try:
            self._check_ready()
            future = await self._publisher.send(subject, data, headers)
            self._remember(subject, data, event)
            offset, duplicate = await future
        except Exception as exc:
            raise self._publish_error(exc) from None
        return await self._published_as(event, offset, duplicate, data)

    async def publish_many(self, events: Sequence[Event]) -> list[Published]:
        """Store ``events`` in order, all sent before any ack is awaited; the first that fails raises its error
        (those before it are stored; those after it may be)."""
        if len(events) <= 1:
            return [await self.publish(event) for event in events]
        self._check_ready()
        messages = [self._message(event) for event in events]
        futures: list[asyncio.Future[tuple[int, bool]]] = []
        try:
            try:
                for event, (subject, data, headers) in zip(events, messages, strict=True):
                    futures.append(await self._publisher.send(subject, data, headers))
                    self._remember(subject, data, event)
            except Exception as exc:
                raise self._publish_error(exc) from None
            results: list[Published] = []
            for event, future in zip(events, futures, strict=False):
                try:
                    offset, duplicate = await future
                except Exception as exc:
                    raise self._publish_error(exc) from None
                results.append(await self._published_as(event, offset, duplicate, messages[len(results)][1]))
            return results
        finally:
            for future in futures:
                if not future.done():
                    future.add_done_callback(_retrieve)
                elif not future.cancelled():
                    future.exception()  # retrieved: a later failure raised already, or none

    def _publish_error(self, exc: BaseException) -> NexusError:
        if isinstance(exc, NexusError):
            return exc
        if isinstance(exc, (TimeoutError, nats.errors.TimeoutError)):
            return BusUnavailable(
                f"JetStream did not acknowledge the event within {self.ack_timeout:g}s; it may or may not be "
                "stored: publish it again with the same event_id to be sure"
            )
        if isinstance(exc, (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
            self._start_recovery()
            return BusUnavailable(f"no JetStream stream answers for {self.subjects.events} on NATS; nothing was stored")
        if isinstance(exc, nats.js.errors.APIError):
            description = exc.description or ""
            if "maximum" in description.lower() and "payload" in description.lower():
                return PayloadTooLarge(f"the NATS server refused the event: {description}")
            return BusUnavailable(f"JetStream refused the event: {description} (error {exc.err_code})")
        return BusUnavailable(f"could not store the event on NATS: {_describe(exc)}")

    async def _published_as(self, event: Event, offset: int, duplicate: bool, data: bytes) -> Published:
        if offset > self._head:
            self._head = offset
        if duplicate:
            self._duplicates += 1
            original = await self.fetch(offset)
            if original is None:
                log.warning("duplicate_original_missing", event_id=event.event_id, offset=offset)
                original = event.stored(offset, self.epoch)
            return Published(original, duplicate=True)
        self._published += 1
        stored = event.stored(offset, self.epoch)
        sent = self._sent.get(data)
        if sent is not None and sent[1] is event:
            self._sent[data] = (sent[0], stored)  # the tail delivers this very copy
        return Published(stored)

    async def fetch(self, offset: int) -> Event | None:
        """The stored event at ``offset``, or None when the stream no longer holds it."""
        _, js = self.connection()
        try:
            raw = await js.get_msg(self.stream, offset)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise self._publish_error(exc) from None
        headers = raw.headers or {}
        return self.read(
            raw.subject or "",
            raw.data or b"",
            offset,
            msg_id=headers.get(MSG_ID_HEADER),
            stored_at=raw.time,
            path="fetch",
        )

    async def publish_live(self, event: Event) -> None:
        self._check_ready()
        nc, _ = self.connection()
        try:
            await nc.publish(self.subjects.live_for_type(event.event_type), encode_event(event))
        except Exception as exc:
            raise BusUnavailable(f"could not send a live event over NATS: {_describe(exc)}") from None

    # --- local delivery -------------------------------------------------------------------------------------

    def decode(self, msg: Msg, offset: int, *, path: str = "read") -> Event | None:
        """The event a stream message holds, or None when it is no valid event (see :meth:`read`)."""
        headers = msg.headers or {}
        return self.read(msg.subject, msg.data, offset, msg_id=headers.get(MSG_ID_HEADER), path=path)

    def read(
        self,
        subject: str,
        data: bytes,
        offset: int,
        *,
        msg_id: str | None = None,
        stored_at: datetime | None = None,
        path: str,
    ) -> Event | None:
        """The validated event in a message, or None: anything may write on a Nexus subject, so a message that is
        no valid event (bad JSON, text that is not valid Unicode, too deep, too large, a subject that is no event
        type) is quarantined: skipped, never delivered nor retried, logged (rate-limited) and, when the tail
        meets it, counted in :attr:`quarantined`. ``path`` says who read it: ``tail``, ``replay``, ``fetch``,
        ``live`` or ``read`` (the request queue)."""
        event_type = self._types.event_type(subject)
        try:
            if event_type is None:
                raise InvalidEventType(f"subject {shorten(subject)} is not <prefix>.<service>.<action>.v<N>.<state>")
            return read_event(
                event_type,
                data,
                offset=offset,
                epoch=self.epoch,
                msg_id=msg_id,
                stored_at=stored_at,
                limits=self.settings.limits,
            )
        except NexusError as error:
            if path in ("tail", "live"):
                self.quarantined += 1
            self._warnings.warning(
                log,
                "nats_message_quarantined",
                kind=f"nats_message_quarantined:{path}",
                path=path,
                subject=shorten(subject),
                offset=offset,
                error=shorten(error.message),
            )
            return None

    def on_stored(self, msg: Msg, offset: int) -> None:
        """A stored event from the tail (in stream order): queue it for local delivery."""
        if offset <= self.received:
            return
        if self.received and offset > self.received + 1:
            log.warning("history_gap", missing_from=self.received + 1, missing_to=offset - 1, stream=self.stream)
            # Events this node never saw: subscribers here must resume from their last offset and be told.
            self._flush()
            self._fanout.close_all()
        self.received = offset
        self._head = max(self._head, offset)
        sent = self._sent.pop(msg.data, None) if self._sent else None
        if sent is not None and sent[0] == msg.subject:
            mine = sent[1]
            event: Event | None = (
                mine if mine.offset == offset and mine.epoch == self.epoch else mine.stored(offset, self.epoch)
            )
        else:
            event = self.decode(msg, offset, path="tail")
        if event is not None:
            self._pending.append(event)
            self._schedule_flush()

    async def _on_live(self, msg: Msg) -> None:
        event = self.read(msg.subject, msg.data, 0, path="live")
        if event is not None:
            self._pending.append(event)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._progress.set()
        for callback in list(self._delivery):
            callback(pending)
        self._fanout.deliver(pending)

    async def subscribe(
        self,
        patterns: Iterable[str] = (),
        *,
        since_offset: int = 0,
        epoch: str | None = None,
        correlation_ids: Iterable[str] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
        visible: Visible | None = None,
    ) -> Subscription:
        if self._closed or self.closing:
            raise BusUnavailable("the bus is closed")
        if not self._started:
            raise BusUnavailable("the bus is not started")
        patterns = list(patterns)
        for pattern in patterns:
            parse_pattern(pattern)
        since_offset = max(since_offset, 0)
        correlation_ids = list(correlation_ids)
        recovered: bool | None = None
        head = max(self._head, self.received)
        if since_offset > 0 or epoch:
            self._check_ready()
            first, head = await self.stream_bounds()
            recovered = (not epoch or epoch == self.epoch) and first - 1 <= since_offset <= head
        sub = Subscription(
            self._fanout,
            patterns=patterns,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
            start_after=self.received,
            epoch=self.epoch,
            recovered=recovered,
            visible=visible,
        )
        sub.head_offset = head
        if recovered and since_offset < self.received:
            filter_subject = filter_for_patterns(self.subjects, patterns, bool(correlation_ids))
            self.spawn(self._hand_over(sub, since_offset, filter_subject), "nexus-nats-replay")
        else:
            if recovered:
                sub.start_after = max(self.received, since_offset)
            self._fanout.register(sub)
        return sub

    async def stream_bounds(self) -> tuple[int, int]:
        """The first and last offsets the stream holds now."""
        _, js = self.connection()
        try:
            info = await js.stream_info(self.stream)
        except Exception as exc:
            raise BusUnavailable(f"could not read the stream's state from NATS: {_describe(exc)}") from None
        self._first_offset = info.state.first_seq or info.state.last_seq + 1
        self._head = max(self._head, info.state.last_seq)
        return self._first_offset, info.state.last_seq

    async def _hand_over(self, sub: Subscription, since_offset: int, filter_subject: str) -> None:
        """Replay from the stream up to what the tail delivered, then join the live delivery right there.

        The check and the registration happen in one synchronous step, so each event after ``since_offset``
        reaches the subscriber exactly once: from the replay up to ``start_after``, live after it.
        """
        cursor = since_offset

        async def deliver(events: list[Event]) -> None:
            wanted = [event for event in events if sub.wants(event)]
            sub.push(wanted, replay=True)
            # Read no further ahead of the subscriber than its queue bound (it has no event to wait on).
            while not sub.closed and sub.pending > max(sub.max_pending, REPLAY_BATCH):  # noqa: ASYNC110
                await asyncio.sleep(0.005)

        try:
            while not sub.closed:
                target = self.received
                if cursor >= target:
                    sub.start_after = cursor
                    self._fanout.register(sub)
                    return
                await _RangeReader(self, filter_subject, cursor + 1, target).read(deliver)
                cursor = target
        except asyncio.CancelledError:
            sub.close()
            raise
        except Exception as exc:
            log.warning("replay_failed", since_offset=since_offset, error=_describe(exc))
            sub.close()

    async def head_offset(self) -> int:
        self._check_ready()
        _, head = await self.stream_bounds()
        return head

    # --- stats ----------------------------------------------------------------------------------------------

    def stats(self) -> BusStats:
        return BusStats(
            head_offset=max(self._head, self.received),
            first_offset=self._first_offset,
            epoch=self.epoch,
            subscribers=len(self._fanout.subscriptions),
            published=self._published,
            duplicates=self._duplicates,
            slow_consumers=self._fanout.slow_consumers,
            quarantined=self.quarantined,
        )

    @property
    def metrics(self) -> Metrics:
        return self._fanout.metrics

    @property
    def consumer_lag(self) -> int:
        """Stream messages this node knows of that its tail has not handed to delivery yet (metrics)."""
        return max(0, self._head - self.received)

    def describe(self) -> dict[str, Any]:
        return {
            "bus": "nats",
            "epoch": self.epoch,
            "servers": self.servers,
            "stream": self.stream,
            "subjects": self.subjects.events,
            "node": self.node_id,
        }
