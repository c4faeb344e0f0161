"""A node that relays a remote Nexus over gRPC: what ``nexus gateway --nexus HOST:PORT`` serves.

:class:`RemoteNode` presents a remote Nexus as a :class:`~nexus.node.Node`, so a gateway process serves many
browsers with one upstream stream:

- one ``SubscribeEventBatches(">")`` call mirrors every event (heartbeats included) into a local
  :class:`~nexus.history.History` of ``history_size`` events and hands it to a local fan-out (the bus's own
  :class:`~nexus.bus.base.Fanout`: pattern trie, correlation ids, bounded queues). On start it first fills the
  history from the upstream's, so clients that move between gateways resume from their offset. After a cut it
  resumes from the last offset it mirrored, with ``since_offset`` + ``epoch``: no gap, no duplicate. If the
  upstream lost that history (it restarted on a memory bus: a new epoch), every subscription is ended with
  :attr:`~nexus.node.LostReason.HISTORY_RESET`, so that clients resume and are told ``recovered: false``.
- publishing uses ``EmitEvent``; a request uses ``RequestEvent``, whose call is the requester's lease: ending it
  before the terminal event (the requester left) makes the server cancel the stream, even if this process dies.
  ``cancel`` uses ``CancelStream``. The lifecycle itself reaches subscribers through the mirror, in offset order
  with everything else they follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final

import grpc
import structlog

from nexus.backoff import Backoff, BackoffPolicy
from nexus.bus.base import Fanout, Published, Subscription, Visible
from nexus.client import NexusClient, error_from_rpc
from nexus.errors import Unavailable
from nexus.events import Event, JSONObject
from nexus.grpc.convert import event_from_response, event_to_request
from nexus.history import History
from nexus.node import DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION, LostReason, Node
from nexus.resume import Answer
from nexus.session import Lease
from nexus.v1 import nexus_pb2

DEFAULT_HISTORY_SIZE: Final = 10_000
FEED_BATCH: Final = 1_000
LEASE_LINGER_S: Final = 5.0
MIRROR_WAIT_S: Final = 5.0
OWNERS_KEPT: Final = 100_000
"""Events whose sender (among this node's clients) is remembered, for ownership checks."""

log = structlog.get_logger("nexus.remote")


class _CallLease(Lease):
    """A ``RequestEvent`` call kept open, read to its end; cancelling it before the end cancels the stream."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(self._drain(), name="nexus-remote-request")

    async def _drain(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for _ in self._call:
                pass

    async def release(self, *, cancel: bool) -> None:
        if not cancel:
            # The lifecycle ended: the server ends the call after the terminal event.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), LEASE_LINGER_S)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class RemoteNode(Node):
    """Relays the Nexus at ``target`` (``host:port``; over TLS with ``tls`` / ``ca_file``, with ``token`` when the
    Nexus requires one, as :class:`NexusClient`)."""

    def __init__(
        self,
        target: str,
        *,
        history_size: int = DEFAULT_HISTORY_SIZE,
        metadata: Iterable[tuple[str, str]] = (),
        connect_timeout: float = 10.0,
        max_retry_delay: float = 5.0,
        max_patterns_per_subscription: int = DEFAULT_MAX_PATTERNS_PER_SUBSCRIPTION,
        tls: bool = False,
        ca_file: str | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(max_patterns_per_subscription=max_patterns_per_subscription)
        self.target = target
        self.client = NexusClient(target, metadata=metadata, tls=tls, ca_file=ca_file, token=token)
        self.history = History(history_size)
        self.connect_timeout = connect_timeout
        self.max_retry_delay = max_retry_delay
        self.backoff = Backoff(
            BackoffPolicy(initial_delay=min(0.05, max_retry_delay), max_delay=max_retry_delay, healthy_after=10.0)
        )
        """Waits between reconnections to the upstream: they start over only after a call delivered or stayed up."""
        self._fanout = Fanout()
        self._connected = False
        self._ready = asyncio.Event()
        self._advanced = asyncio.Event()
        self._feed_task: asyncio.Task[None] | None = None
        self._closed = False
        self._reset_subs: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._owners: OrderedDict[str, str] = OrderedDict()
        self.resets = 0

    @property
    def epoch(self) -> str:
        return self.history.epoch

    @property
    def healthy(self) -> bool:
        return self._connected and not self._closed

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            self._health_changed(self.healthy)

    def subscription_lost(self, sub: Subscription) -> LostReason | None:
        return LostReason.HISTORY_RESET if sub in self._reset_subs else None

    def describe(self) -> dict[str, Any]:
        return {"node": "RemoteNode", "nexus": self.target, "epoch": self.epoch}

    # --- the mirror -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and fill the history; raises :class:`Unavailable` if the upstream cannot be reached in time."""
        self._feed_task = asyncio.get_running_loop().create_task(self._feed(), name="nexus-remote-feed")
        ready = asyncio.ensure_future(self._ready.wait())
        done, _ = await asyncio.wait(
            {ready, self._feed_task}, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            failure = self._feed_task.exception() if self._feed_task in done else None
            await self.close()
            if failure is not None:
                raise failure
            raise Unavailable(f"could not reach the Nexus at {self.target} within {self.connect_timeout:g}s")

    async def _open(self, since_offset: int, epoch: str) -> tuple[Any, Answer]:
        request = nexus_pb2.SubscribeEventBatchesRequest(
            event_types=[">"], since_offset=since_offset, epoch=epoch, max_batch_size=FEED_BATCH
        )
        call = self.client.stub.SubscribeEventBatches(request, metadata=self.client.metadata)
        try:
            answer = Answer.read(await call.initial_metadata())
            if answer is None:
                # The call failed before a Nexus answered (a closed port also "returns" empty metadata): its
                # status is the error, never an epoch of "" that would reset the mirror.
                code = await call.code()
                details = await call.details()
                raise grpc.aio.AioRpcError(
                    code if code != grpc.StatusCode.OK else grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details or "the call ended before the server's initial metadata",
                )
        except BaseException:
            call.cancel()
            raise
        return call, answer

    async def _connect(self) -> Any:
        """Open the mirror stream, resuming from the head when there is one; returns the call."""
        history = self.history
        if not history.epoch:
            # First connection: learn the head, then ask for the history before it.
            probe, first = await self._open(0, "")
            probe.cancel()
            since = max(1, first.head_offset - history.max_events)
            call, answer = await self._open(since, first.epoch)
            history.reset(answer.epoch, since if answer.recovered else answer.head_offset)
            return call
        call, answer = await self._open(history.head, history.epoch)
        if not answer.recovered or answer.epoch != history.epoch:
            self._reset(answer.epoch, answer.head_offset)
        return call

    def _reset(self, epoch: str, head: int) -> None:
        """The upstream no longer holds what follows our head: end every subscription (their clients resume),
        and start a new history."""
        log.warning("remote_history_lost", old_epoch=self.history.epoch, epoch=epoch, head=self.history.head)
        self.resets += 1
        self._reset_subs.update(self._fanout.subscriptions)
        self._fanout.close_all()
        self.history.reset(epoch, head)

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.backoff
        while not self._closed:
            call: Any = None
            backoff.call_opened(loop.time())
            try:
                call = await self._connect()
                backoff.connected(loop.time())
                self._set_connected(True)
                self._ready.set()
                log.info("remote_connected", nexus=self.target, epoch=self.epoch, head=self.history.head)
                async for message in call:
                    if message.events:
                        backoff.delivered()
                    self._ingest([event_from_response(item) for item in message.events])
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "the stream ended"
                )
            except grpc.aio.AioRpcError as error:
                if self._closed:
                    return
                self._set_connected(False)
                log.warning("remote_lost", nexus=self.target, code=error.code().name, head=self.history.head)
            finally:
                if call is not None:
                    call.cancel()
            await asyncio.sleep(backoff.call_failed(loop.time()))

    def _ingest(self, events: list[Event]) -> None:
        """Keep and hand out a batch of mirrored events (synchronous, in offset order)."""
        history = self.history
        fresh = [event for event in events if not event.offset or history.append(event)]
        if fresh:
            self._fanout.deliver(fresh)
            self._advanced.set()

    async def _mirrored(self, offset: int) -> None:
        """Wait (a short while) until the mirror has reached ``offset``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MIRROR_WAIT_S):
                while self.history.head < offset and not self._closed:
                    self._advanced.clear()
                    await self._advanced.wait()

    # --- Node -------------------------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed or not self.history.epoch:
            raise Unavailable(f"not connected to the Nexus at {self.target}")

    async def _subscribe(
        self,
        patterns: list[str],
        *,
        since_offset: int,
        epoch: str | None,
        correlation_ids: Iterable[str],
        max_pending: int,
        visible: Visible | None,
    ) -> Subscription:
        self._check()
        return self._fanout.open(
            self.history,
            patterns,
            since_offset=since_offset,
            epoch=epoch,
            correlation_ids=correlation_ids,
            max_pending=max_pending,
            visible=visible,
        )

    async def head_offset(self) -> int:
        return self.history.head

    async def _publish(self, event: Event) -> Published:
        self._check()
        self._remember_owner(event)
        try:
            response = await self.client.stub.EmitEvent(event_to_request(event), metadata=self.client.metadata)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        published = Published(event_from_response(response), response.message == "duplicate")
        # Read your writes: once publish returns, the mirror's head includes the event, as on a local node.
        await self._mirrored(published.event.offset)
        return published

    async def submit(self, event: Event) -> tuple[Published, Lease]:
        self._check()
        self._remember_owner(event)
        call = self.client.stub.RequestEvent(
            nexus_pb2.RequestEventRequest(event=event_to_request(event)), metadata=self.client.metadata
        )
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            call.cancel()
            raise error_from_rpc(error) from None
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            call.cancel()
            raise Unavailable("the request call ended before the request was stored")
        published = Published(event_from_response(first.event), first.event.message == "duplicate")
        lease = _CallLease(call)
        # The lifecycle comes through the mirror: let it reach the request's own offset first, as publish does.
        await self._mirrored(published.event.offset)
        return published, lease

    async def _cancel(self, correlation_id: str, reason: str, *, owner: str | None) -> bool:
        # The core checks who may cancel: this node's own connection. Owners of remote clients are checked here
        # against the request's owner, which the mirror holds.
        if owner is not None and self._owners.get(correlation_id) != owner:
            return False  # not one this node's clients sent: left alone, as if it did not exist
        return await self.client.cancel(correlation_id, reason)

    def owner_of(self, stored: Event) -> str | None:
        # The core knows this node's connection as the owner of everything its clients send; which client sent
        # it is known here.
        return self._owners.get(stored.event_id)

    def _remember_owner(self, event: Event) -> None:
        owner = event.metadata.get("owner")
        if owner is None:
            return
        self._owners[event.event_id] = owner
        self._owners.move_to_end(event.event_id)
        while len(self._owners) > OWNERS_KEPT:
            self._owners.popitem(last=False)

    async def _streams(self) -> list[JSONObject]:
        streams = await self.client.streams()
        for info in streams:
            info["owner"] = self._owners.get(str(info.get("correlation_id", "")), "")
        return streams

    async def handlers(self) -> list[JSONObject]:
        return await self.client.handlers()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = False
        if self._feed_task is not None:
            self._feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed_task
        self._fanout.close_all()
        await self._drain_background()
        await self.client.close()
