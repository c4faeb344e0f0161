"""The request queue of a NATS bus shared by several nodes: each ``requested`` event is handled by exactly one.

:class:`NatsRequestQueue` uses the node's :class:`~nexus.bus.nats.NatsBus` (its connection, its stream, its
tail), which knows nothing of requests.

Consumers (durable pull consumers on the Limits stream; a work-queue stream would forbid the overlapping
consumers that replay needs):

- ``<stream>_req_<service>_<action>`` per handled ``service:action`` (filter
  ``<prefix>.<service>.<action>.*.requested``), created by the first node that serves it, starting after the
  stream's head. Every node serving it pulls from it; an *ordered* handler (one with an ``ordering_key``) is
  pulled by its one active node only (see :mod:`nexus.queue.nats_members`), so per-key order holds across nodes.
- ``<stream>_requests`` (filter ``<prefix>.*.*.*.requested``): every node pulls it to find the requests no live
  node serves. A request that a handler's consumer holds is left to it; one that no consumer holds is taken by
  the node that pulled it, whose provider runs it if it can and otherwise answers ``no_handler``. A request
  waiting in the consumer of a handler whose nodes are all gone is drained and answered ``no_handler`` too.

A node *claims* a request by acknowledging it (synchronously, before its provider sees it), so the ack wait
never hands a long stream to a second node. It announces its claims at once and in every node heartbeat; when
a node is lost (or leaves with requests unfinished), every survivor publishes ``failed``/``node_lost`` for each
of its claims. Every terminal event of a claimed request carries the deterministic ``Nats-Msg-Id``
``t:<correlation_id>``, so JetStream stores the first one per request, however many nodes try (the survivors,
or the node itself if it was only cut off), and drops the others as duplicates.

The queue follows every lifecycle event the node's tail delivers (which requests have ended, how many chunks a
stream has sent), so a survivor's ``node_lost`` event carries the stream's count, and a node that was only cut
off learns that another node ended a request it holds: it tells its provider to let it go
(:class:`~nexus.queue.base.AbandonRequest`). Cancels travel to every node on ``<prefix>_ctl.msg`` as JSON,
decoded here into :class:`~nexus.queue.base.CancelRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import api

from nexus.bus.base import DEFAULT_MAX_PENDING, Fanout, Published, Subscription
from nexus.bus.nats import NatsBus
from nexus.bus.nats_codec import control_body, parse_ack_reply, read_control, request_consumer_name, terminal_msg_id
from nexus.detect import DEFAULT_RULES, StreamingDetector
from nexus.errors import BusUnavailable, NexusError, StreamErrorType
from nexus.events import STARTED, STREAM, TERMINAL_STATES, Event, EventType, JSONObject, parse_time
from nexus.lifecycle import Lifecycle
from nexus.queue.base import (
    DEFAULT_CANCEL_REASON,
    AbandonRequest,
    CancelRequest,
    ControlCallback,
    ControlMessage,
    RequestQueue,
    RequestRoute,
)
from nexus.queue.nats_members import Claim, Member, Membership, presence_message

PULL_BATCH: Final = 64
PULL_EXPIRES_S: Final = 2.0
"""How long one pull request waits on the server: a node that dies leaves one behind for at most this long."""
PULL_HEARTBEAT_S: Final = 0.5
ACK_WAIT_S: Final = 5.0
"""A request delivered to a pull request nobody reads any more (its node died) is delivered again after this."""
CLAIM_TIMEOUT_S: Final = 2.0
DRAIN_RECHECK_S: Final = 0.5
CAPACITY_RECHECK_S: Final = 0.05
"""How often a puller looks again for room when the workers of its handler are all busy."""
DEFAULT_NODE_HEARTBEAT_S: Final = 1.0
RECENT_TERMINALS: Final = 100_000
TRACKED_STREAMS: Final = 100_000

log = structlog.get_logger("nexus.queue.nats")

Handle = Callable[["Puller", list[Msg]], Awaitable[None]]


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _service_action(event_type: str) -> str:
    parsed = EventType.parse(event_type)
    return f"{parsed.service}:{parsed.action}"


@dataclasses.dataclass(slots=True)
class _LocalClaim:
    claim: Claim
    service_action: str
    terminal_id: str | None = None
    """The event id of the terminal event this node is publishing for it."""


class Puller:
    """Pulls one durable consumer: keeps a pull request open, hands the messages over in batches.

    With ``drain`` it takes what is there (``no_wait``) and stops. After :meth:`stop` it hands back (NAKs) what
    still arrives for its last pull request, so another node gets it at once.
    """

    def __init__(self, queue: NatsRequestQueue, service_action: str | None, handle: Handle, *, drain: bool) -> None:
        self.queue = queue
        self.bus = queue.bus
        self.service_action = service_action
        self.consumer = request_consumer_name(self.bus.stream, service_action)
        self.drain = drain
        self.stopped = False
        self._handle = handle
        self._buffer: list[Msg] = []
        self._handling = False
        """Its worker task is claiming the messages of a pull."""
        self._wake = asyncio.Event()
        self._request_done = asyncio.Event()
        self._remaining = 0
        self._empty = False
        self._last_activity = time.monotonic()
        self._sub: NatsSubscription | None = None
        self._inbox = ""
        self.finished = asyncio.Event()
        self._worker = self.bus.spawn(self._work(), f"nexus-nats-pull-work-{self.consumer}")
        self._runner = self.bus.spawn(self._run(), f"nexus-nats-pull-{self.consumer}")

    async def _on_message(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        if (msg.reply or "").startswith("$JS.ACK."):
            self._remaining -= 1
            if self._remaining <= 0:
                self._request_done.set()
            if self.stopped:
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            self._buffer.append(msg)
            self._wake.set()
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status == "100":
            return  # the pull request is alive
        if status in ("404", "408"):
            self._empty = True
        elif status == "409" and "deleted" in str(headers.get("Description", "")).lower():
            self.queue.forget_consumer(self.consumer)
        self._request_done.set()

    async def _run(self) -> None:
        delay = 0.1
        try:
            while not self.stopped:
                try:
                    await self.bus.wait_connected()
                    await self.queue.ensure_consumer(self.service_action)
                    nc, _ = self.bus.connection()
                    if self._sub is None:
                        self._inbox = nc.new_inbox()
                        self._sub = await nc.subscribe(
                            self._inbox, cb=self._on_message, pending_msgs_limit=0, pending_bytes_limit=0
                        )
                    batch = await self._room()
                    if batch == 0:
                        continue
                    self._request_done.clear()
                    self._empty = False
                    self._remaining = batch
                    self._last_activity = time.monotonic()
                    body: JSONObject = {"batch": batch}
                    if self.drain:
                        body["no_wait"] = True
                    else:
                        body["expires"] = _ns(PULL_EXPIRES_S)
                        body["idle_heartbeat"] = _ns(PULL_HEARTBEAT_S)
                    await nc.publish(
                        f"$JS.API.CONSUMER.MSG.NEXT.{self.bus.stream}.{self.consumer}",
                        control_body(body),
                        reply=self._inbox,
                    )
                    while not self._request_done.is_set() and not self.stopped:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._request_done.wait(), PULL_HEARTBEAT_S)
                        if not self.bus.connected:
                            break  # the pull request went with the connection: ask again
                        if time.monotonic() - self._last_activity > 3 * PULL_HEARTBEAT_S:
                            # No heartbeat: the server lost the request, or the consumer is gone. Check it.
                            self.queue.forget_consumer(self.consumer)
                            break
                    delay = 0.1
                    if self.drain and self._empty and await self._drained():
                        return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self.stopped or self.bus.closing:
                        return
                    log.warning("request_pull_failed", consumer=self.consumer, error=str(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        finally:
            self.finished.set()

    async def _room(self) -> int:
        """How many requests to pull: up to :data:`PULL_BATCH`, and no more than this node can run beside the ones
        it holds (a handler served by workers: their slots). Waits while there is no room (0 when stopped)."""
        if self.service_action is None or self.drain:
            return PULL_BATCH
        while not self.stopped:
            slots = self.queue.capacity(self.service_action)
            if slots is None:
                return PULL_BATCH
            if not self._buffer and not self._handling:
                room = slots - self.queue.holding(self.service_action)
                if room > 0:
                    return min(room, PULL_BATCH)
            await asyncio.sleep(CAPACITY_RECHECK_S)
        return 0

    async def _drained(self) -> bool:
        """Whether nothing is left for a drain, not even a request out with a dead node's pull (ack pending).

        Such a request comes back after the ack wait; until then the drain waits for it.
        """
        await asyncio.sleep(0)  # let the worker take what arrived
        _, js = self.bus.connection()
        info = await js.consumer_info(self.bus.stream, self.consumer)
        if not info.num_pending and not info.num_ack_pending and not self._buffer:
            return True
        await asyncio.sleep(DRAIN_RECHECK_S)
        return False

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            messages, self._buffer = self._buffer, []
            if not messages:
                continue
            if self.stopped:
                for msg in messages:
                    with contextlib.suppress(Exception):
                        await msg.nak()
                continue
            self._handling = True
            try:
                await self._handle(self, messages)
            except Exception as exc:
                log.error("request_handling_failed", consumer=self.consumer, error=str(exc))
            finally:
                self._handling = False

    def stop(self) -> None:
        """Stop pulling; what still arrives is handed back; the subscription ends when the last pull expires."""
        if self.stopped:
            return
        self.stopped = True
        self._request_done.set()
        self._wake.set()
        self.bus.spawn(self._linger(), f"nexus-nats-pull-linger-{self.consumer}")

    async def _linger(self) -> None:
        try:
            await asyncio.sleep(0 if self.drain else PULL_EXPIRES_S)
        finally:
            self._runner.cancel()
            self._worker.cancel()
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()


class NatsRequestQueue(RequestQueue):
    """This node's part in sharing out requests: its consumers, its claims and the cluster's membership.

    ``node_heartbeat_s`` is the interval of node heartbeats (a node silent for three is lost);
    ``streaming_rules`` tell which requests are streams (a lost stream's ``failed`` event counts its chunks).
    """

    def __init__(
        self,
        bus: NatsBus,
        *,
        node_heartbeat_s: float = DEFAULT_NODE_HEARTBEAT_S,
        streaming_rules: Sequence[str] = DEFAULT_RULES,
    ) -> None:
        self.bus = bus
        self.interval = node_heartbeat_s
        self.membership = Membership(bus.node_id, since=time.time(), interval=self.interval)
        self.detector = StreamingDetector(tuple(streaming_rules))
        self.group: Subscription | None = None
        """This node's consumer (its provider's): the requests the node takes go there."""
        self.routes: tuple[RequestRoute, ...] = ()
        self.claims: dict[str, _LocalClaim] = {}
        self.outbox: dict[str, Event] = {}
        self._pullers: dict[str | None, Puller] = {}
        self._drains: dict[str, Puller] = {}
        self._consumer_starts: dict[str, int] = {}
        self._failures: list[tuple[Claim, str, str]] = []
        self._listening_since = time.monotonic()
        self._quiet_until = 0.0
        self._last_announced = 0.0
        self._task: asyncio.Task[None] | None = None
        self._consumers = Fanout()
        """The consumers' own fan-out: nothing is matched there, the queue pushes claimed requests itself."""
        self._control: list[ControlCallback] = []
        self._control_sub: NatsSubscription | None = None
        self._terminals: OrderedDict[str, str] = OrderedDict()
        self._streams: OrderedDict[str, list[float]] = OrderedDict()
        self.closing = False
        bus.on_delivery(self._observe)
        bus.on_health(self._on_health)
        bus.on_epoch(self._on_epoch)

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening to the other nodes and announce this one."""
        nc, _ = self.bus.connection()
        self._control_sub = await nc.subscribe(self.bus.subjects.control + ".>", cb=self._on_control)
        self._listening_since = time.monotonic()
        self._quiet_until = self._listening_since + self.membership.timeout
        await self._announce(hello=True)
        self._task = self.bus.spawn(self._beat(), "nexus-nats-node-heartbeat")

    async def consume(
        self, routes: Sequence[RequestRoute] = (), *, max_pending: int = DEFAULT_MAX_PENDING
    ) -> Subscription:
        """This node's consumer of the requests shared by all nodes (one per node: its provider's).

        It receives the requests for ``routes`` this node takes, and those no live node serves (to answer them
        ``no_handler``); a later call replaces the consumer.
        """
        if self.closing:
            raise BusUnavailable("the request queue is closed")
        if not self.bus.healthy:
            raise BusUnavailable("the connection to NATS is down; reconnecting")
        sub = Subscription(
            self._consumers, max_pending=max_pending, start_after=self.bus.received, epoch=self.bus.epoch
        )
        self._consumers.register(sub)
        self.group = sub
        self.routes = tuple(routes)
        self.membership.own.routes = self.routes
        for service_action in sorted({route.service_action for route in self.routes}):
            await self.ensure_consumer(service_action)
        await self.ensure_consumer(None)
        await self._announce()
        self._update_pullers()
        return sub

    async def update_routes(self, routes: Sequence[RequestRoute]) -> None:
        """Take the requests of ``routes`` from now on (workers came or went): consumers for new handlers, the
        others told at once, pullers matched to the routes."""
        self.routes = tuple(routes)
        self.membership.own.routes = self.routes
        if self.closing or self.group is None:
            return
        for service_action in sorted({route.service_action for route in self.routes}):
            await self.ensure_consumer(service_action)
        await self._announce()
        self._update_pullers()

    async def close(self) -> None:
        """Stop taking requests and tell the others this node leaves (they end what it still holds)."""
        if self.closing:
            return
        # The terminal events this node stored (a shutdown's ``cancelled``) end its claims as the tail sees them.
        await self.bus.wait_delivered()
        self.closing = True
        for puller in [*self._pullers.values(), *self._drains.values()]:
            puller.stop()
        self._pullers.clear()
        self._drains.clear()
        self.membership.own.active = frozenset()
        if self._task is not None:
            self._task.cancel()
        await self._announce(leaving=True)
        if self._control_sub is not None:
            with contextlib.suppress(Exception):
                await self._control_sub.unsubscribe()
            self._control_sub = None
        self._consumers.close_all()

    def _on_health(self, healthy: bool) -> None:
        if healthy and not self.closing:
            self._on_reconnected()

    def _on_epoch(self, epoch: str) -> None:
        """The stream was re-created: every consumer is gone, and so are the requests this node held."""
        self._consumer_starts.clear()
        self.claims.clear()
        self.outbox.clear()

    def _on_reconnected(self) -> None:
        """The connection is back: the others may have been silent for us, and consumers may have changed."""
        now = time.monotonic()
        self.membership.forget_silence(now)
        self._quiet_until = now + self.membership.timeout
        self._consumer_starts.clear()
        self.bus.spawn(self._after_reconnection(), "nexus-nats-rejoin")

    async def _after_reconnection(self) -> None:
        await self._announce(hello=True)
        await self._flush_outbox()

    # --- node heartbeats ------------------------------------------------------------------------------------

    async def _announce(self, *, leaving: bool = False, hello: bool = False) -> None:
        if not self.bus.connected:
            return
        claims = [local.claim for local in self.claims.values()]
        message, extra = presence_message(self.membership.own, claims, leaving=leaving, hello=hello)
        await self._send(self.bus.subjects.presence, message)
        for item in extra:
            await self._send(self.bus.subjects.claims, item)
        self._last_announced = time.monotonic()

    async def _send(self, subject: str, message: JSONObject) -> None:
        """Send a node-to-node message on a subject under ``<prefix>_ctl`` (nothing when disconnected)."""
        if not self.bus.connected:
            return
        nc, _ = self.bus.connection()
        with contextlib.suppress(Exception):
            await nc.publish(subject, control_body(message))

    async def _beat(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            stalled = now - last_tick > self.interval * (self.membership.misses - 1)
            last_tick = now
            try:
                await self._tick(now, stalled=stalled)
            except Exception as exc:
                # The heartbeat must go on: without it the other nodes would count this one lost.
                log.error("node_heartbeat_failed", error=str(exc) or type(exc).__name__)

    async def _tick(self, now: float, *, stalled: bool) -> None:
        membership = self.membership
        if stalled:
            # This node's loop stalled: the others' heartbeats were not read, so they cannot count as missed.
            membership.forget_silence(now)
            self._quiet_until = now + membership.timeout
        if not self.bus.connected:
            return
        if self._last_announced and now - self._last_announced > membership.timeout:
            self._rejoin(now)
        await self._announce()
        if now >= self._quiet_until:
            for member in membership.expire(now):
                log.warning("node_lost", node=member.node, requests=len(member.claims), node_heartbeat_s=self.interval)
                self.bus.spawn(self._fail_claims(member, "lost"), "nexus-nats-node-lost")
        await self._retry()
        self._update_pullers()

    def _rejoin(self, now: float) -> None:
        """This node was silent as long as the others wait: they counted it lost and failed what it held.

        It comes back as a newcomer: no longer the active node of its ordered handlers (another one may have
        taken over), and not counting the others lost for the silence it could not hear through either.
        """
        membership = self.membership
        log.warning("node_rejoined", node=membership.node, silent_s=round(now - self._last_announced, 3))
        membership.own.since = time.time()
        membership.own.active = frozenset()
        membership.forget_silence(now)
        self._quiet_until = now + membership.timeout
        for service_action in list(self._pullers):
            if service_action is not None and membership.exclusive(service_action):
                self._pullers.pop(service_action).stop()

    async def _on_control(self, msg: Msg) -> None:
        """A message from a node (this one included): a heartbeat, a claim announcement or a cancel."""
        message = read_control(msg.data)
        if message is None or self.closing:
            return
        now = time.monotonic()
        subject = msg.subject
        subjects = self.bus.subjects
        if subject == subjects.messages:
            cancel = read_cancel(message)
            if cancel is not None:
                self._hand_out(cancel)
        elif subject == subjects.presence:
            known = {member.node for member in self.membership.others}
            left = self.membership.observe(message, now)
            node = message.get("node")
            if node == self.membership.node:
                return
            if left is not None:
                log.info("node_left", node=left.node, requests=len(left.claims))
                self.bus.spawn(self._fail_claims(left, "left"), "nexus-nats-node-left")
            if message.get("hello") is True or (isinstance(node, str) and node not in known and left is None):
                self.bus.spawn(self._announce(), "nexus-nats-announce")
            self._update_pullers()
        elif subject == subjects.claims:
            self.membership.add_claims(message, now)

    # --- consumers ------------------------------------------------------------------------------------------

    async def ensure_consumer(self, service_action: str | None) -> None:
        """Create the durable consumer for ``service_action``'s requests (None: all requests) if missing."""
        name = request_consumer_name(self.bus.stream, service_action)
        if name in self._consumer_starts:
            return
        _, js = self.bus.connection()
        try:
            info = await js.consumer_info(self.bus.stream, name)
        except nats.js.errors.NotFoundError:
            subject = (
                self.bus.subjects.requests if service_action is None else self.bus.subjects.requests_for(service_action)
            )
            _, head = await self.bus.stream_bounds()
            config = api.ConsumerConfig(
                name=name,
                durable_name=name,
                description="nexus: requests shared by the nodes",
                filter_subject=subject,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=head + 1,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S,
                max_deliver=-1,
                max_ack_pending=10_000,
            )
            try:
                info = await js.add_consumer(self.bus.stream, config)
                log.info("request_consumer_created", consumer=name, filter=subject, start_offset=head + 1)
            except nats.js.errors.APIError:
                info = await js.consumer_info(self.bus.stream, name)  # another node created it meanwhile
        self._consumer_starts[name] = _first_covered(info)

    def forget_consumer(self, name: str) -> None:
        """Check again, before the next pull, that a consumer exists (it was deleted, or may have been)."""
        self._consumer_starts.pop(name, None)

    async def _covers(self, service_action: str, offset: int) -> bool:
        """Whether a handler's consumer holds the request at ``offset`` (it existed when it was stored)."""
        name = request_consumer_name(self.bus.stream, service_action)
        start = self._consumer_starts.get(name)
        if start is None:
            _, js = self.bus.connection()
            try:
                info = await js.consumer_info(self.bus.stream, name)
            except nats.js.errors.NotFoundError:
                return False
            start = _first_covered(info)
            self._consumer_starts[name] = start
        return offset >= start

    def _update_pullers(self) -> None:
        if self.bus.closing or self.closing:
            return
        group = self.group
        if group is None or group.closed:
            for puller in self._pullers.values():
                puller.stop()
            self._pullers.clear()
            return
        membership = self.membership
        # Until the others had a chance to answer this node's hello, it does not know who serves what.
        ready = time.monotonic() - self._listening_since >= self.interval
        wanted: set[str | None] = {None} if ready else set()
        active: set[str] = set()
        for service_action in {route.service_action for route in self.routes}:
            if membership.exclusive(service_action):
                if not ready or membership.active(service_action) != membership.node:
                    continue
                active.add(service_action)
            wanted.add(service_action)
        membership.own.active = frozenset(active)
        for key in list(self._pullers):
            if key not in wanted:
                self._pullers.pop(key).stop()
        for key in wanted:
            if key not in self._pullers:
                handle = self._on_requests if key is None else self._on_handler_requests
                self._pullers[key] = Puller(self, key, handle, drain=False)
        for key, drain in list(self._drains.items()):
            if drain.finished.is_set():
                del self._drains[key]

    def _drain(self, service_action: str) -> None:
        """Answer what waits in the consumer of a handler no live node serves (its nodes are gone)."""
        if service_action in self._drains or service_action in self._pullers:
            return
        log.info("draining_unserved_requests", event_type=service_action)
        self._drains[service_action] = Puller(self, service_action, self._on_unserved_requests, drain=True)

    # --- requests -------------------------------------------------------------------------------------------

    def _read(self, msg: Msg) -> tuple[Event, int] | None:
        """The request in a message and how often it was delivered; None when it needs no one (any more)."""
        ack = parse_ack_reply(msg.reply or "")
        if ack is None:
            return None
        event = self.bus.decode(msg, ack.stream_seq)
        if event is None or self._taken(event.event_id, ack.delivered):
            return None
        return event, ack.delivered

    def _taken(self, correlation_id: str, delivered: int) -> bool:
        """Whether a request already ended, or (delivered again) a live node holds it."""
        if self.terminal_seen(correlation_id) or correlation_id in self.claims:
            return True
        return delivered > 1 and self.membership.holder(correlation_id) is not None

    async def _on_handler_requests(self, puller: Puller, messages: list[Msg]) -> None:
        """Requests from a handler's consumer: take those this node can route (or that nobody can)."""
        take: list[tuple[Msg, Event]] = []
        for msg in messages:
            read = self._read(msg)
            if read is None:
                await _settle(msg.ack())
                continue
            event = read[0]
            if self._routes(event.event_type) or not self.membership.serves(event.event_type):
                take.append((msg, event))
            else:
                await _settle(msg.nak(delay=self.interval))  # another node serves this version
        await self._claim(take)

    async def _on_requests(self, puller: Puller, messages: list[Msg]) -> None:
        """Every request passes here once (on one node): take it when no handler's consumer holds it."""
        take: list[tuple[Msg, Event]] = []
        for msg in messages:
            read = self._read(msg)
            if read is None:
                await _settle(msg.ack())
                continue
            event, delivered = read
            service_action = _service_action(event.event_type)
            covered = await self._covers(service_action, event.offset)
            if covered and self.membership.serves_action(service_action):
                await _settle(msg.ack())  # its handler's consumer has it
            elif covered:
                if delivered <= 1:
                    # Its nodes may be starting or silent: look again after a node-loss timeout.
                    await _settle(msg.nak(delay=self.membership.timeout))
                else:
                    await _settle(msg.ack())
                    self._drain(service_action)
            else:
                take.append((msg, event))
        await self._claim(take)

    async def _on_unserved_requests(self, puller: Puller, messages: list[Msg]) -> None:
        """Requests drained from the consumer of a handler no live node serves: this node answers them."""
        take: list[tuple[Msg, Event]] = []
        for msg in messages:
            read = self._read(msg)
            if read is None:
                await _settle(msg.ack())
                continue
            if puller.service_action is not None and self.membership.serves_action(puller.service_action):
                await _settle(msg.nak())  # a node serving it is back
                puller.stop()
                continue
            take.append((msg, read[0]))
        await self._claim(take)

    def _routes(self, event_type: str) -> bool:
        return any(route.matches(event_type) for route in self.routes)

    async def _claim(self, items: list[tuple[Msg, Event]]) -> None:
        """Acknowledge requests (each one on the server before the provider sees it), then hand them over."""
        if not items:
            return
        group = self.group
        if group is None or group.closed or self.bus.closing or self.closing:
            for msg, _ in items:
                await _settle(msg.nak())
            return
        results = await asyncio.gather(*(self._acknowledge(msg) for msg, _ in items))
        claimed: list[Event] = []
        for (_, event), acknowledged in zip(items, results, strict=True):
            if not acknowledged:
                continue  # redelivered after the ack wait, to this node or another
            claim = Claim(event.event_id, event.offset, self.detector.is_streaming(event.event_type))
            self.claims[event.event_id] = _LocalClaim(claim, _service_action(event.event_type))
            claimed.append(event)
        if not claimed:
            return
        await self._send(
            self.bus.subjects.claims,
            {"node": self.membership.node, "claims": [self.claims[e.event_id].claim.as_list() for e in claimed]},
        )
        group.push(claimed)

    async def _acknowledge(self, msg: Msg) -> bool:
        """Acknowledge a request on the server; False when it stays with the server (redelivered later).

        Unanswered while connected, the ack may well have been applied: the request is taken then, as nobody
        else would get it (its claim, announced at once, keeps a redelivery from running it twice).
        """
        if not self.bus.connected:
            return False
        try:
            await msg.ack_sync(timeout=CLAIM_TIMEOUT_S)
        except nats.errors.TimeoutError:
            log.warning("request_claim_unconfirmed", timeout_s=CLAIM_TIMEOUT_S)
            return self.bus.connected
        except Exception as exc:
            log.warning("request_claim_failed", error=str(exc) or type(exc).__name__)
            return False
        return True

    # --- terminal events ------------------------------------------------------------------------------------

    async def publish_terminal(self, event: Event) -> Published:
        """Store a request's terminal event; for a request this node holds, under ``Nats-Msg-Id: t:<id>``.

        The first terminal event per request is stored, whichever node sends it; a later one is answered with
        that original (``duplicate``). One that cannot be stored now is kept, and stored once NATS is back.
        """
        correlation_id = event.metadata.get("correlation_id", "")
        local = self.claims.get(correlation_id) if event.state in TERMINAL_STATES else None
        if local is None:
            return await self.bus.publish(event)
        local.terminal_id = event.event_id
        try:
            published = await self.bus.publish_once(event, terminal_msg_id(correlation_id))
        except BusUnavailable:
            if correlation_id in self.claims:
                self.outbox[correlation_id] = event
                log.warning("terminal_kept_for_retry", correlation_id=correlation_id, event_type=event.event_type)
            raise
        # Stored, or the request's terminal id was already taken: either way this node holds it no more.
        if self.claims.get(correlation_id) is local and local.terminal_id == event.event_id:
            del self.claims[correlation_id]
            self.outbox.pop(correlation_id, None)
        return published

    def holding(self, service_action: str) -> int:
        """Requests of ``service_action`` this node claimed and has not seen end yet."""
        return sum(1 for local in self.claims.values() if local.service_action == service_action)

    def terminal_seen(self, correlation_id: str) -> bool:
        """Whether this node saw the terminal event of the request ``correlation_id`` (recently)."""
        return correlation_id in self._terminals

    def stream_progress(self, correlation_id: str) -> tuple[float, int] | None:
        """``(started_at, chunks)`` of a stream this node saw start and not end (epoch seconds, count)."""
        tracked = self._streams.get(correlation_id)
        return None if tracked is None else (tracked[0], int(tracked[1]))

    def _observe(self, events: Sequence[Event]) -> None:
        """Follow requests' lifecycles on the tail: streams' chunk counts, and which requests have ended."""
        streams = self._streams
        for event in events:
            correlation_id = event.metadata.get("correlation_id")
            if not correlation_id or not event.offset:
                continue
            state = event.state
            if state == STARTED:
                streams[correlation_id] = [_seconds(event.timestamp), 0.0]
                if len(streams) > TRACKED_STREAMS:
                    streams.popitem(last=False)
            elif state == STREAM:
                tracked = streams.get(correlation_id)
                if tracked is not None:
                    tracked[1] += 1
            elif state in TERMINAL_STATES:
                streams.pop(correlation_id, None)
                self._terminals[correlation_id] = event.event_id
                if len(self._terminals) > RECENT_TERMINALS:
                    self._terminals.popitem(last=False)
                self._ended(correlation_id, event.event_id)

    def _ended(self, correlation_id: str, terminal_id: str) -> None:
        """The stream holds a request's terminal event (seen by this node's tail)."""
        self.membership.ended(correlation_id)
        local = self.claims.pop(correlation_id, None)
        self.outbox.pop(correlation_id, None)
        if local is not None and local.terminal_id != terminal_id:
            # Another node ended a request this node still holds: it counted this node lost. Let it go.
            self._hand_out(
                AbandonRequest(correlation_id, "another node ended this request (it counted this node lost)")
            )

    async def _flush_outbox(self) -> None:
        for correlation_id, event in list(self.outbox.items()):
            if correlation_id not in self.claims:
                self.outbox.pop(correlation_id, None)
                continue
            try:
                await self.publish_terminal(event)
            except NexusError:
                return
            log.info("terminal_stored_after_retry", correlation_id=correlation_id, event_type=event.event_type)

    async def _fail_claims(self, member: Member, why: str) -> None:
        """End every request a lost (or departed) node held with ``failed``/``node_lost``."""
        for claim in list(member.claims.values()):
            if self.terminal_seen(claim.correlation_id):
                continue
            try:
                await self._fail(claim, member.node, why)
            except NexusError as exc:
                log.warning("node_lost_publish_failed", correlation_id=claim.correlation_id, error=exc.message)
                self._failures.append((claim, member.node, why))

    async def _retry(self) -> None:
        if not self.bus.connected:
            return
        failures, self._failures = self._failures, []
        for claim, node, why in failures:
            if self.terminal_seen(claim.correlation_id):
                continue
            try:
                await self._fail(claim, node, why)
            except NexusError:
                self._failures.append((claim, node, why))
        await self._flush_outbox()

    async def _fail(self, claim: Claim, node: str, why: str) -> None:
        request = await self.bus.fetch(claim.offset)
        if request is None or request.event_id != claim.correlation_id:
            log.warning("node_lost_request_missing", correlation_id=claim.correlation_id, offset=claim.offset)
            return
        if why == "left":
            message = f"the node driving this request ({node}) shut down before it ended"
        else:
            message = (
                f"the node driving this request ({node}) was lost: no node heartbeat for {self.membership.timeout:g}s"
            )
        event = node_lost_event(
            request,
            streaming=claim.streaming,
            progress=self.stream_progress(claim.correlation_id),
            message=message,
        )
        published = await self.bus.publish_once(event, terminal_msg_id(claim.correlation_id))
        if not published.duplicate:
            log.warning(
                "request_failed_node_lost",
                correlation_id=claim.correlation_id,
                event_type=request.event_type,
                node=node,
                offset=published.event.offset,
            )

    # --- control --------------------------------------------------------------------------------------------

    def serves(self, request_type: str) -> bool:
        return self.membership.serves(request_type)

    async def cancel(self, message: CancelRequest) -> None:
        if self.closing or not self.bus.healthy:
            raise BusUnavailable("the connection to NATS is down; the cancel was not sent")
        nc, _ = self.bus.connection()
        await nc.publish(self.bus.subjects.messages, control_body(cancel_message(message)))

    def on_control(self, callback: ControlCallback) -> None:
        self._control.append(callback)

    def _hand_out(self, message: ControlMessage) -> None:
        """Hand a control message to this node's callbacks (soon: never inside the caller)."""
        loop = asyncio.get_running_loop()
        for callback in list(self._control):
            loop.call_soon(callback, message)


def cancel_message(cancel: CancelRequest) -> JSONObject:
    """A cancel as the JSON object sent to every node."""
    message: JSONObject = {"type": "cancel", "correlation_id": cancel.correlation_id, "reason": cancel.reason}
    if cancel.owner is not None:
        message["owner"] = cancel.owner
    return message


def read_cancel(message: JSONObject) -> CancelRequest | None:
    """The cancel in a message from another node, or None when it is none."""
    correlation_id = message.get("correlation_id")
    if message.get("type") != "cancel" or not isinstance(correlation_id, str) or not correlation_id:
        return None
    reason = message.get("reason")
    owner = message.get("owner")
    return CancelRequest(
        correlation_id,
        str(reason) if reason else DEFAULT_CANCEL_REASON,
        owner=owner if isinstance(owner, str) else None,
    )


def _seconds(timestamp: str) -> float:
    try:
        return parse_time(timestamp)
    except NexusError:
        return time.time()


def node_lost_event(request: Event, *, streaming: bool, progress: tuple[float, int] | None, message: str) -> Event:
    """The ``failed``/``node_lost`` event of ``request``, with the stream's chunk count and age when known."""
    now = time.time()
    if progress is not None:
        since = progress[0]
    else:
        try:
            since = parse_time(request.timestamp)
        except NexusError:
            since = now
    lifecycle = Lifecycle(request, streaming=streaming, now=0.0)
    if streaming and progress is not None:
        lifecycle.start(0.0)
        lifecycle.stream_count = progress[1]
    return lifecycle.fail(max(now - since, 0.0), StreamErrorType.NODE_LOST, message)


def _first_covered(info: api.ConsumerInfo) -> int:
    config = info.config
    if config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE and config.opt_start_seq:
        return int(config.opt_start_seq)
    return 1


async def _settle(action: Awaitable[None]) -> None:
    """Send an ack, nak or term, ignoring a connection that just went away (the ack wait covers it)."""
    with contextlib.suppress(nats.errors.Error, OSError):
        await action
