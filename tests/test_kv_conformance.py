"""One conformance suite for the plugins' key-value store (``ctx.kv``): SQLite and NATS JetStream behave the same.

Each test gets a :class:`Harness` for one store's data. ``await harness.store()`` opens a store on that data: on
SQLite a new store on the same directory, on NATS a new node (its own bus) on the same bucket. So "write, close,
open again" and "write on one node, read on another" are the same test for both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names

from nexus.bus.base import Bus
from nexus.errors import InvalidArgument, InvalidPayload, PayloadTooLarge, Unavailable
from nexus.kv import KeyValueStore, KVConflict, KVEntry, KVLimitExceeded, KVLimits, PluginKV, SqliteKeyValue


@dataclasses.dataclass
class Harness:
    """The stores of one test, on one store's data."""

    kind: str
    directory: Path
    url: str = ""
    stream: str = ""
    prefix: str = ""
    stores: list[KeyValueStore] = dataclasses.field(default_factory=list)
    buses: list[Bus] = dataclasses.field(default_factory=list)

    @property
    def bucket(self) -> str:
        return f"{self.stream}_KV"

    async def store(self, limits: KVLimits | None = None) -> KeyValueStore:
        """A started store on this test's data."""
        made: KeyValueStore
        if self.kind == "sqlite":
            made = SqliteKeyValue(self.directory, limits)
        else:
            from nexus.bus.nats import NatsBus
            from nexus.kv.nats import NatsKeyValue

            bus = NatsBus(nats_settings(self.url, self.stream, self.prefix).nats_bus_settings())
            await bus.start()
            self.buses.append(bus)
            made = NatsKeyValue(bus, self.bucket, limits)
        await made.start()
        self.stores.append(made)
        return made

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        for bus in self.buses:
            await bus.close()
        if self.kind == "nats":
            await delete_stream(self.url, f"KV_{self.bucket}")
            await delete_stream(self.url, self.stream)


@pytest.fixture(params=["sqlite", "nats"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "sqlite":
        made = Harness("sqlite", tmp_path / "data")
    else:
        stream, prefix = unique_names("kv")
        made = Harness("nats", tmp_path, url=shared_nats_url(), stream=stream, prefix=prefix)
    try:
        yield made
    finally:
        await made.close()


async def stored(kv: PluginKV, key: str) -> KVEntry:
    """The entry under ``key``, which must exist."""
    entry = await kv.get(key)
    assert entry is not None, f"{key} is missing"
    return entry


VALUES: list[Any] = [
    {"mean": [0.5, -1.25], "n": 40, "name": "machine-7", "ok": True, "none": None},
    [1, "two", 3.5, [4], {"five": 5}],
    "just text, with ünïcode ✓",
    42,
    -0.125,
    False,
    None,
    {},
]


async def test_a_value_reads_back_as_written(harness: Harness) -> None:
    """Every kind of JSON value comes back equal, with the revision its put returned."""
    kv = (await harness.store()).scoped("anomalies")
    for index, value in enumerate(VALUES):
        revision = await kv.put(f"value.{index}", value)
        entry = await kv.get(f"value.{index}")
        assert entry is not None
        assert (entry.key, entry.value, entry.revision) == (f"value.{index}", value, revision)


async def test_missing_keys_and_delete(harness: Harness) -> None:
    """A key never written reads None; delete says whether there was something; a deleted key is gone."""
    kv = (await harness.store()).scoped("anomalies")
    assert await kv.get("baseline.nope") is None
    assert await kv.delete("baseline.nope") is False
    await kv.put("baseline.a", {"x": 1})
    await kv.put("baseline.b", {"x": 2})
    assert await kv.delete("baseline.a") is True
    assert await kv.get("baseline.a") is None
    assert await kv.keys() == ["baseline.b"]
    assert await kv.delete("baseline.a") is False


async def test_keys_lists_one_prefix_sorted(harness: Harness) -> None:
    """keys(prefix) lists the plugin's keys that start with it, sorted; keys() lists them all."""
    kv = (await harness.store()).scoped("analytics")
    for key in ("window.b", "window.a", "windows", "baseline.x", "window.a.sub"):
        await kv.put(key, 1)
    assert await kv.keys("window.") == ["window.a", "window.a.sub", "window.b"]
    assert await kv.keys("window") == ["window.a", "window.a.sub", "window.b", "windows"]
    assert await kv.keys() == ["baseline.x", "window.a", "window.a.sub", "window.b", "windows"]
    assert await kv.keys("zzz") == []


async def test_a_plugin_sees_only_its_own_keys(harness: Harness) -> None:
    """Two plugins may use the same key; neither reads, lists nor deletes the other's."""
    store = await harness.store()
    places, anomalies = store.scoped("places"), store.scoped("anomalies")
    await places.put("known.home", {"lat": 1.0})
    await anomalies.put("known.home", {"mean": [2.0]})
    assert (await stored(places, "known.home")).value == {"lat": 1.0}
    assert (await stored(anomalies, "known.home")).value == {"mean": [2.0]}
    assert await store.scoped("analytics").keys() == []
    assert await store.scoped("analytics").get("known.home") is None
    assert await store.scoped("analytics").delete("known.home") is False
    assert await anomalies.delete("known.home") is True
    assert (await stored(places, "known.home")).value == {"lat": 1.0}
    # A handler registered as module:Class is a plugin whose name no store takes as is: it gets a scope of its own.
    odd, similar = store.scoped("demo:Echo"), store.scoped("demo_Echo")
    await odd.put("count", 1)
    await similar.put("count", 2)
    assert ((await stored(odd, "count")).value, (await stored(similar, "count")).value) == (1, 2)


async def test_expect_revision_guards_a_read_modify_write(harness: Harness) -> None:
    """A write with an out-of-date expect_revision is refused (KVConflict) and changes nothing; 0 = create."""
    kv = (await harness.store()).scoped("anomalies")
    first = await kv.put("baseline.m", {"v": 1}, expect_revision=0)
    with pytest.raises(KVConflict):
        await kv.put("baseline.m", {"v": "again"}, expect_revision=0)
    second = await kv.put("baseline.m", {"v": 2}, expect_revision=first)
    assert second > first
    with pytest.raises(KVConflict):
        await kv.put("baseline.m", {"v": "stale"}, expect_revision=first)
    with pytest.raises(KVConflict):
        await kv.delete("baseline.m", expect_revision=first)
    with pytest.raises(KVConflict):
        await kv.put("baseline.other", {"v": 0}, expect_revision=first)  # does not exist
    entry = await stored(kv, "baseline.m")
    assert (entry.value, entry.revision) == ({"v": 2}, second)
    assert await kv.get("baseline.other") is None
    assert await kv.delete("baseline.m", expect_revision=second) is True
    third = await kv.put("baseline.m", {"v": 3}, expect_revision=0)
    assert third > second  # a key written again never gets an old revision back


async def test_bad_keys_values_and_revisions_get_clear_errors(harness: Harness) -> None:
    """Bad input is refused with the error a caller can act on; the store is unchanged."""
    kv = (await harness.store(KVLimits(max_value_bytes=100, max_keys=100, max_depth=4))).scoped("messaging")
    for key in ("", "a..b", ".a", "a.", "has space", "star*", "gt>", "x" * 257, 7, None):
        with pytest.raises(InvalidArgument):
            await kv.put(key, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await kv.get(key)  # type: ignore[arg-type]
    for value in (math.nan, math.inf, {1, 2}, object(), {"a": b"bytes"}, [[[[["too deep"]]]]], {1: "a"}, 2**1100):
        with pytest.raises(InvalidPayload):
            await kv.put("k", value)
    with pytest.raises(PayloadTooLarge, match="over the limit of 100"):
        await kv.put("k", "x" * 100)
    for revision in (-1, "1", 1.0):
        with pytest.raises(InvalidArgument):
            await kv.put("k", 1, expect_revision=revision)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await kv.keys("no spaces")
    assert await kv.keys() == []
    await kv.put("k", "x" * 90)  # at the limit (92 bytes as JSON) is fine
    assert (await stored(kv, "k")).value == "x" * 90


async def test_a_plugin_keeps_at_most_max_keys(harness: Harness) -> None:
    """A new key beyond the limit is refused; overwriting one is not; a deleted key frees its place; the limit
    is per plugin."""
    store = await harness.store(KVLimits(max_keys=3))
    kv = store.scoped("places")
    for n in range(3):
        await kv.put(f"place.{n}", n)
    with pytest.raises(KVLimitExceeded):
        await kv.put("place.3", 3)
    assert await kv.get("place.3") is None
    await kv.put("place.0", "overwritten")
    await store.scoped("analytics").put("window.a", 1)
    await kv.delete("place.1")
    await kv.put("place.3", 3)
    assert await kv.keys() == ["place.0", "place.2", "place.3"]


async def test_state_survives_closing_and_opening_the_store(harness: Harness) -> None:
    """What was written is there, with its revision, in a store opened again on the same data."""
    first = await harness.store()
    revision = await first.scoped("anomalies").put("baseline.machine-7", {"mean": [0.1, 2.3], "n": 40})
    await first.scoped("anomalies").put("baseline.gone", 1)
    await first.scoped("anomalies").delete("baseline.gone")
    await first.close()
    again = (await harness.store()).scoped("anomalies")
    entry = await stored(again, "baseline.machine-7")
    assert (entry.value, entry.revision) == ({"mean": [0.1, 2.3], "n": 40}, revision)
    assert await again.keys() == ["baseline.machine-7"]
    assert await again.put("baseline.machine-7", {"n": 41}, expect_revision=revision) > revision


async def test_two_stores_on_the_same_data_see_each_others_writes(harness: Harness) -> None:
    """Two nodes: a write on one is read on the other, and concurrent read-modify-writes cannot both win."""
    one, two = (await harness.store()).scoped("analytics"), (await harness.store()).scoped("analytics")
    revision = await one.put("window.cpu", {"size_s": 60})
    entry = await stored(two, "window.cpu")
    assert (entry.value, entry.revision) == ({"size_s": 60}, revision)
    assert await two.keys() == ["window.cpu"]
    newer = await two.put("window.cpu", {"size_s": 30}, expect_revision=revision)
    with pytest.raises(KVConflict):
        await one.put("window.cpu", {"size_s": 90}, expect_revision=revision)
    assert (await stored(one, "window.cpu")).revision == newer
    assert await two.delete("window.cpu") is True
    assert await one.get("window.cpu") is None


async def test_a_closed_store_refuses_work_with_a_clear_error(harness: Harness) -> None:
    """After close (SQLite) or with its bus gone (NATS), an operation raises, it does not hang or crash."""
    store = await harness.store()
    await store.scoped("places").put("k", 1)
    if harness.kind == "nats":
        await harness.buses[-1].close()
        with pytest.raises(Unavailable):
            await store.scoped("places").get("k")
    else:
        await store.close()
        with pytest.raises(Exception, match="closed"):
            await store.scoped("places").get("k")


async def test_the_nats_store_fails_fast_while_nats_is_away_and_works_again_after(tmp_path: Path) -> None:
    """NATS restarts (file storage): meanwhile an operation raises Unavailable at once; after the client
    reconnected by itself the same store reads what was written before and writes again."""
    from nats_support import NatsProcess, nats_server_binary, until, wait_for_jetstream

    from nexus.bus.nats import NatsBus
    from nexus.kv.nats import NatsKeyValue

    nats_server_binary()
    server = NatsProcess(tmp_path / "nats")
    server.start()
    await server.wait_listening()
    await wait_for_jetstream(server.url)
    stream, prefix = unique_names("kvrestart")
    bus = NatsBus(nats_settings(server.url, stream, prefix, nats_storage="file").nats_bus_settings())
    try:
        await bus.start()
        store = NatsKeyValue(bus, f"{stream}_KV")
        await store.start()
        kv = store.scoped("anomalies")
        revision = await kv.put("baseline.m7", {"n": 40})

        server.stop()
        await until("the bus notices", lambda: not bus.connected)
        with pytest.raises(Unavailable, match="not connected"):
            await kv.get("baseline.m7")

        server.start()
        await until("the bus reconnects", lambda: bus.connected)
        entry = await stored(kv, "baseline.m7")
        assert (entry.value, entry.revision) == ({"n": 40}, revision)
        assert await kv.put("baseline.m7", {"n": 41}, expect_revision=revision) > revision
        await store.close()
    finally:
        await bus.close()
        server.stop()


async def test_the_sqlite_store_never_blocks_the_event_loop_on_the_disk(tmp_path: Path) -> None:
    """While another process holds the database locked, a put waits for it in the store's thread: the event loop
    goes on running other tasks meanwhile, and the put completes once the lock is released."""
    import asyncio
    import sqlite3

    store = SqliteKeyValue(tmp_path)
    await store.start()
    kv = store.scoped("places")
    await kv.put("known.home", 1)
    other = sqlite3.connect(tmp_path / "kv.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        put = asyncio.create_task(kv.put("known.work", 2))
        await asyncio.sleep(0.5)
        assert not put.done()  # waiting for the lock...
        assert ticks >= 5  # ...and the loop kept running (a put on the loop would have frozen it: 0 ticks)
        other.execute("COMMIT")
        await asyncio.wait_for(put, 10)
        assert (await stored(kv, "known.work")).value == 2
    finally:
        ticker.cancel()
        other.close()
        await store.close()


async def test_a_value_the_nats_bucket_refuses_gets_a_clear_error() -> None:
    """A bucket made with a smaller value limit (kv_max_value_bytes raised since) refuses a larger value: the
    plugin gets Unavailable saying the bucket refused it, and the old value stays."""
    harness = Harness("nats", Path("."), url=shared_nats_url(), stream=unique_names("kvsize")[0])
    harness.prefix = harness.stream.lower()
    try:
        small = (await harness.store(KVLimits(max_value_bytes=64))).scoped("places")
        await small.put("k", "small")
        large = (await harness.store(KVLimits(max_value_bytes=1024))).scoped("places")
        with pytest.raises(Unavailable, match="refused"):
            await large.put("k", "x" * 200)
        assert (await stored(large, "k")).value == "small"
    finally:
        await harness.close()


def test_key_for_makes_a_valid_distinct_key_of_any_id() -> None:
    """Ids a client chose (any text: dots, spaces, unicode) become valid keys under a prefix, one key per id."""
    from nexus import key_for

    ids = ["machine-7", "a.b", "with space", "ünïcode/✓", "", "a" * 100]
    keys = [key_for("baseline", value) for value in ids]
    assert len(set(keys)) == len(ids)
    assert all(key.startswith("baseline.") for key in keys)
