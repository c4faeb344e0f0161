"""What a plugin gets from the server besides requests: ctx.follow, ctx.shared, ctx.start_soon and the settings
readers, used as a third-party plugin would use them, through a real server (``nexus.testing.run_server``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog

from nexus import Event, EventHandler, Follower, HandlerContext, read_int
from nexus.bus.memory import MemoryBus
from nexus.plugins import HandlerSpec
from nexus.testing import run_server

GUARD = 10.0
NOTE = "demo:note:v1:written"


# --- ctx.follow -----------------------------------------------------------------------------------------------


class Tally(EventHandler):
    """Follows demo notes into a list; a tally request answers with every note published before it."""

    event_type = "demo:tally"

    def __init__(self, *, since_offset: int | None = None, max_pending: int = 10_000) -> None:
        self.since_offset = since_offset
        self.max_pending = max_pending
        self.notes: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def setup(self, ctx: HandlerContext) -> None:
        self.follower: Follower = await ctx.follow(
            NOTE,
            "demo:tally:v1:requested",  # marks the spot: reached(request offset) means "every earlier note"
            on_event=self.apply,
            since_offset=self.since_offset,
            max_pending=self.max_pending,
        )

    async def apply(self, event: Event) -> None:
        if event.event_type == NOTE:
            await self.gate.wait()
            self.notes.append(int(event.payload["n"]))

    async def handle(self, event: Event) -> dict[str, Any]:
        reached = await self.follower.reached(event.offset, timeout=5)
        return {"notes": list(self.notes), "reached": reached}


async def test_a_follower_applies_every_event_in_order_and_reached_waits_for_them() -> None:
    """Events published after follow() returned are applied in offset order; a request waits until they are."""
    tally = Tally()
    async with run_server(tally) as nexus:
        for n in range(1, 6):
            await nexus.client.emit(NOTE, {"n": n})
        done = await asyncio.wait_for(nexus.client.call("demo:tally:v1:requested", {}), GUARD)
        assert done.payload == {"notes": [1, 2, 3, 4, 5], "reached": True}
        assert tally.follower.offset >= done.offset - 1
        assert tally.follower.recovered is None  # started live: nothing was asked to be replayed
        assert tally.follower.restarts == 0


async def test_a_follower_from_offset_0_replays_the_history_first() -> None:
    """since_offset=0 applies what the bus holds from before the follower started, then follows live."""
    bus = MemoryBus()
    await bus.start()
    for n in (1, 2):
        await bus.publish(Event.create(NOTE, {"n": n}))
    tally = Tally(since_offset=0)
    async with run_server(tally, bus=bus) as nexus:
        await nexus.client.emit(NOTE, {"n": 3})
        done = await asyncio.wait_for(nexus.client.call("demo:tally:v1:requested", {}), GUARD)
        assert done.payload["notes"] == [1, 2, 3]
        assert tally.follower.recovered is True


async def test_a_follower_that_fell_behind_resumes_and_misses_nothing() -> None:
    """A follower too slow for its subscription resubscribes after the last event it applied: it still sees
    every event once, in order, and says the gap was recovered."""
    tally = Tally(max_pending=3)
    tally.gate.clear()  # the first note blocks the follower while 19 more pile up on its subscription
    async with run_server(tally) as nexus:
        for n in range(1, 21):
            await nexus.client.emit(NOTE, {"n": n})
        tally.gate.set()
        done = await asyncio.wait_for(nexus.client.call("demo:tally:v1:requested", {}), GUARD)
        assert done.payload == {"notes": list(range(1, 21)), "reached": True}
        assert tally.follower.restarts >= 1
        assert tally.follower.recovered is True


async def test_an_event_the_plugin_cannot_apply_is_logged_and_skipped() -> None:
    """An exception from on_event is logged with the event; the follower goes on with the next one."""

    class Picky(Tally):
        async def apply(self, event: Event) -> None:
            if event.event_type == NOTE and event.payload["n"] == 2:
                raise ValueError("two is not a note")
            await super().apply(event)

    picky = Picky()
    with structlog.testing.capture_logs() as logs:
        async with run_server(picky) as nexus:
            for n in (1, 2, 3):
                await nexus.client.emit(NOTE, {"n": n})
            done = await asyncio.wait_for(nexus.client.call("demo:tally:v1:requested", {}), GUARD)
    assert done.payload["notes"] == [1, 3]
    failed = [line for line in logs if line["event"] == "follower_event_failed"]
    assert len(failed) == 1
    assert failed[0]["error"] == "ValueError: two is not a note"
    assert failed[0]["event_type"] == NOTE


async def test_follow_refuses_a_bad_pattern_at_setup() -> None:
    """A pattern the bus refuses stops the server at start-up."""

    class Broken(EventHandler):
        event_type = "demo:broken"

        async def setup(self, ctx: HandlerContext) -> None:
            await ctx.follow("not a pattern", on_event=lambda event: None)

        async def handle(self, event: Event) -> dict[str, Any]:
            return {}

    with pytest.raises(Exception, match="not a pattern"):
        async with run_server(Broken()):
            pass


# --- ctx.shared -----------------------------------------------------------------------------------------------


class Counter:
    """A plugin's state: counts what its handlers add; records its own closing."""

    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class Add(EventHandler):
    event_type = "counter:add"

    async def setup(self, ctx: HandlerContext) -> None:
        self.counter = ctx.shared(Counter, lambda: Counter(int(ctx.config.get("start", 0))))

    async def handle(self, event: Event) -> dict[str, Any]:
        self.counter.value += int(event.payload["n"])
        return {"value": self.counter.value}


class Read(EventHandler):
    event_type = "counter:read"

    async def setup(self, ctx: HandlerContext) -> None:
        self.counter = ctx.shared(Counter)

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"value": self.counter.value}


def counter_plugin() -> list[HandlerSpec]:
    """The two handlers of the plugin "counter", named as its entry points would be."""
    return [HandlerSpec("counter.add", Add(), "test"), HandlerSpec("counter.read", Read(), "test")]


async def test_the_handlers_of_one_plugin_share_one_object() -> None:
    """Handlers of one plugin get the same object; the first call's factory made it."""
    add, read = counter_plugin()
    async with run_server(add, read, handler_config={"counter": {"start": 10}}) as nexus:
        assert isinstance(add.handler, Add)
        assert isinstance(read.handler, Read)
        assert add.handler.counter is read.handler.counter
        assert add.handler.ctx.plugin == read.handler.ctx.plugin == "counter"
        await nexus.client.call("counter:add:v1:requested", {"n": 5})
        done = await asyncio.wait_for(nexus.client.call("counter:read:v1:requested", {}), GUARD)
        assert done.payload == {"value": 15}


async def test_two_servers_in_one_process_never_share_and_stopping_closes_the_object() -> None:
    """Each server has its own shared objects, closed (aclose) when that server stops."""
    first, second = counter_plugin(), counter_plugin()
    async with run_server(*first) as one, run_server(*second) as other:
        await one.client.call("counter:add:v1:requested", {"n": 1})
        await other.client.call("counter:add:v1:requested", {"n": 2})
        assert isinstance(first[0].handler, Add)
        assert isinstance(second[0].handler, Add)
        mine, theirs = first[0].handler.counter, second[0].handler.counter
        assert mine is not theirs
        assert (mine.value, theirs.value) == (1, 2)
        assert not mine.closed
    assert mine.closed
    assert theirs.closed


async def test_another_plugin_gets_its_own_object_of_the_same_class() -> None:
    """The key is the plugin and the class: a plugin never sees another plugin's object."""
    add, read = Add(), Read()
    async with run_server(HandlerSpec("counter.add", add, "test"), HandlerSpec("tally.read", read, "test")):
        assert add.counter is not read.counter


# --- ctx.start_soon -------------------------------------------------------------------------------------------


class Ticker(EventHandler):
    """Ticks in the background; a second task fails at once."""

    event_type = "demo:ticks"

    def __init__(self) -> None:
        self.ticks = 0
        self.cancelled = False
        self.running_at_teardown: bool | None = None
        self._running = False

    async def setup(self, ctx: HandlerContext) -> None:
        ctx.start_soon(self._tick, 0.01, name="ticker")
        ctx.start_soon(self._fail, name="doomed")

    async def _tick(self, interval: float) -> None:
        self._running = True
        try:
            while True:
                await asyncio.sleep(interval)
                self.ticks += 1
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self._running = False

    async def _fail(self) -> None:
        raise RuntimeError("boom")

    async def teardown(self) -> None:
        self.running_at_teardown = self._running

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"ticks": self.ticks}


async def test_a_background_task_runs_until_stop_and_is_cancelled_before_teardown() -> None:
    """A task from start_soon runs while the server does and is cancelled when it stops, before teardown."""
    ticker = Ticker()
    async with run_server(ticker) as nexus:
        for _ in range(200):
            done = await nexus.client.call("demo:ticks:v1:requested", {})
            if done.payload["ticks"] >= 3:
                break
            await asyncio.sleep(0.01)
        assert done.payload["ticks"] >= 3
        assert not ticker.cancelled
    assert ticker.cancelled
    assert ticker.running_at_teardown is False


async def test_a_failing_background_task_is_logged_and_the_server_keeps_serving() -> None:
    """An exception in a background task is logged with the task's name; requests are still served."""
    with structlog.testing.capture_logs() as logs:
        async with run_server(Ticker()) as nexus:
            for _ in range(200):
                if any(line["event"] == "background_task_failed" for line in logs):
                    break
                await asyncio.sleep(0.01)
            done = await asyncio.wait_for(nexus.client.call("demo:ticks:v1:requested", {}), GUARD)
            assert done.state == "success"
    failed = [line for line in logs if line["event"] == "background_task_failed"]
    assert len(failed) == 1
    assert failed[0]["task"] == "doomed"
    assert failed[0]["error"] == "RuntimeError: boom"
    assert failed[0]["handler"].endswith("Ticker")


# --- settings readers -----------------------------------------------------------------------------------------


class Limited(EventHandler):
    """Reads its one setting with the public reader."""

    event_type = "demo:limited"

    async def setup(self, ctx: HandlerContext) -> None:
        self.limit = read_int(ctx.config, "limit", 3, plugin=ctx.plugin, minimum=1, table=True)

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"limit": self.limit}


async def test_a_plugin_reads_its_settings_with_the_public_readers() -> None:
    """read_int gives the configured value (10.0 from JSON reads as 10), or the default."""
    spec = HandlerSpec("demo.limited", Limited(), "test")
    async with run_server(spec, handler_config={"demo": {"limit": 10.0}}) as nexus:
        done = await asyncio.wait_for(nexus.client.call("demo:limited:v1:requested", {}), GUARD)
        assert done.payload == {"limit": 10}
    async with run_server(HandlerSpec("demo.limited", Limited(), "test")) as nexus:
        done = await asyncio.wait_for(nexus.client.call("demo:limited:v1:requested", {}), GUARD)
        assert done.payload == {"limit": 3}


async def test_a_bad_setting_stops_the_server_naming_it() -> None:
    """A value the reader refuses stops the start-up with the setting as it stands in the config file."""
    spec = HandlerSpec("demo.limited", Limited(), "test")
    with pytest.raises(ValueError, match=r"\[handlers.demo\] limit must be at least 1, got 0"):
        async with run_server(spec, handler_config={"demo": {"limit": 0}}):
            pass
