"""ctx.kv through a real server: plugins' state survives a restart on the same data directory (memory bus) and is
shared by the nodes of one NATS deployment; each plugin sees its own keys; the settings' limits apply."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
from nats_support import delete_stream, free_port, nats_settings, shared_nats_url, unique_names

from nexus import Event, EventHandler, HandlerContext, InvalidPayload, KVConflict
from nexus.bus.memory import MemoryBus
from nexus.client import NexusClient
from nexus.plugin_runtime import PluginRuntime
from nexus.plugins import HandlerSpec
from nexus.testing import run_server

GUARD = 10.0


class Remember(EventHandler):
    """``put`` stores ``value`` under ``key`` (``expect`` as expect_revision); ``get`` reads; ``keys`` lists."""

    event_type = "demo:kv"
    at_setup: list[str]

    async def setup(self, ctx: HandlerContext) -> None:
        self.at_setup = await ctx.kv.keys()

    async def handle(self, event: Event) -> dict[str, Any]:
        kv, payload = self.ctx.kv, event.payload
        if payload["op"] == "put":
            try:
                return {
                    "revision": await kv.put(payload["key"], payload["value"], expect_revision=payload.get("expect"))
                }
            except KVConflict as exc:
                raise InvalidPayload(f"conflict: {exc}") from exc
        if payload["op"] == "get":
            entry = await kv.get(payload["key"])
            return {"entry": None if entry is None else {"value": entry.value, "revision": entry.revision}}
        return {"keys": await kv.keys(payload.get("prefix", ""))}


class RememberOne(Remember):
    event_type = "one:kv"


class RememberTwo(Remember):
    event_type = "two:kv"


SERVICES: dict[str, type[Remember]] = {"demo": Remember, "one": RememberOne, "two": RememberTwo}


def spec(plugin: str, service: str = "demo") -> HandlerSpec:
    return HandlerSpec(f"{plugin}.kv", SERVICES[service](), "--handler")


async def call(nexus: Any, payload: dict[str, Any], service: str = "demo") -> Event:
    done: Event = await asyncio.wait_for(nexus.client.call(f"{service}:kv:v1:requested", payload), GUARD)
    return done


async def test_state_survives_a_restart_on_the_same_data_directory(tmp_path: Path) -> None:
    """A value a plugin stored is there after the server stopped and started again (memory bus, same data_dir),
    already in setup; another data directory starts empty."""
    data = tmp_path / "data"
    async with run_server(spec("alpha"), data_dir=str(data)) as nexus:
        put = await call(nexus, {"op": "put", "key": "baseline.m7", "value": {"mean": [1.5, 2.0], "n": 40}})
        assert put.event_type == "demo:kv:v1:success"
    assert (data / "kv.sqlite3").exists()

    handler = spec("alpha")
    async with run_server(handler, data_dir=str(data)) as nexus:
        got = await call(nexus, {"op": "get", "key": "baseline.m7"})
        assert got.payload["entry"] == {"value": {"mean": [1.5, 2.0], "n": 40}, "revision": put.payload["revision"]}
        assert handler.handler.at_setup == ["baseline.m7"]  # type: ignore[union-attr]

    async with run_server(spec("alpha"), data_dir=str(tmp_path / "elsewhere")) as nexus:
        assert (await call(nexus, {"op": "get", "key": "baseline.m7"})).payload["entry"] is None


async def test_the_default_data_directory_is_one_per_node_under_xdg_data_home(tmp_path: Path) -> None:
    """Without data_dir, a node keeps everything in $XDG_DATA_HOME/nexus/node-<grpc port> (each test has its own
    XDG_DATA_HOME): two nodes on two ports keep two stores, the messaging database beside each one's kv.sqlite3,
    and a node restarted on its port finds its own state again."""
    from nexus.handlers.messaging.plugin import SendMessage

    base = Path(os.environ["XDG_DATA_HOME"]) / "nexus"
    ports = [free_port(), free_port()]
    for port, value in zip(ports, ("first", "second"), strict=True):
        messaging = HandlerSpec("messaging.send_message", SendMessage(), "test")
        async with run_server(spec("alpha"), messaging, grpc_port=port) as nexus:
            assert nexus.server.settings.data_path() == base / f"node-{port}"
            await call(nexus, {"op": "put", "key": "k", "value": value})
            hello = {"conversation_id": "c", "text": "hi"}
            sent = await nexus.client.call("messaging:send_message:v1:requested", hello)
            assert sent.state == "success", sent.payload
    for port in ports:
        assert {path.name for path in (base / f"node-{port}").iterdir()} >= {"kv.sqlite3", "messaging.sqlite3"}
    assert not (base / "kv.sqlite3").exists()
    async with run_server(spec("alpha"), grpc_port=ports[0]) as nexus:
        assert (await call(nexus, {"op": "get", "key": "k"})).payload["entry"]["value"] == "first"


async def test_files_of_the_shared_directory_an_earlier_version_used_are_pointed_out_at_start_up() -> None:
    """A node on its own default data directory that finds kv.sqlite3 or messaging.sqlite3 in the shared base
    directory (where every node kept them before) warns, naming the files and the --data-dir that keeps them."""
    base = Path(os.environ["XDG_DATA_HOME"]) / "nexus"
    base.mkdir(parents=True)
    (base / "messaging.sqlite3").write_bytes(b"")
    with structlog.testing.capture_logs() as logs:
        async with run_server(spec("alpha")):
            pass
    [moved] = [entry for entry in logs if entry["event"] == "data_dir_moved"]
    assert moved["earlier_files"] == [str(base / "messaging.sqlite3")]
    assert f"--data-dir {base}" in moved["hint"]
    with structlog.testing.capture_logs() as logs:
        async with run_server(spec("alpha"), data_dir=str(base)):
            pass
    assert not [entry for entry in logs if entry["event"] == "data_dir_moved"]


async def test_each_plugin_sees_only_its_own_keys(tmp_path: Path) -> None:
    """Two plugins on one server use the same key without seeing each other's."""
    async with run_server(spec("alpha", "one"), spec("beta", "two"), data_dir=str(tmp_path)) as nexus:
        await call(nexus, {"op": "put", "key": "shared.name", "value": "alpha's"}, "one")
        await call(nexus, {"op": "put", "key": "shared.name", "value": "beta's"}, "two")
        one = await call(nexus, {"op": "get", "key": "shared.name"}, "one")
        two = await call(nexus, {"op": "get", "key": "shared.name"}, "two")
        assert (one.payload["entry"]["value"], two.payload["entry"]["value"]) == ("alpha's", "beta's")
        await call(nexus, {"op": "put", "key": "only.alpha", "value": 1}, "one")
        assert (await call(nexus, {"op": "keys"}, "two")).payload["keys"] == ["shared.name"]


async def test_the_settings_limits_reach_ctx_kv(tmp_path: Path) -> None:
    """kv_max_keys and kv_max_value_bytes bound what a plugin stores: the request fails with the reason."""
    async with run_server(spec("alpha"), data_dir=str(tmp_path), kv_max_keys=1, kv_max_value_bytes=20) as nexus:
        assert (await call(nexus, {"op": "put", "key": "a", "value": 1})).event_type == "demo:kv:v1:success"
        second = await call(nexus, {"op": "put", "key": "b", "value": 1})
        assert second.event_type == "demo:kv:v1:failed"
        assert "already stores 1 keys" in second.payload["error"]["message"]
        big = await call(nexus, {"op": "put", "key": "a", "value": "x" * 30})
        assert big.event_type == "demo:kv:v1:failed"
        assert "over the limit of 20" in big.payload["error"]["message"]


async def test_an_embedded_provider_keeps_plugin_state_in_memory() -> None:
    """A provider made without a store (embedded, no server) still gives ctx.kv: in memory, closed with it."""
    runtime = PluginRuntime(MemoryBus())
    kv = runtime.kv("alpha")
    await kv.put("k", {"v": 1})
    assert (await kv.get("k")) is not None
    assert runtime.kv("alpha") is kv
    assert await runtime.kv("beta").get("k") is None
    await runtime.close(structlog.get_logger("test"))
    assert await runtime.kv("alpha").get("k") is None  # a new provider run starts with empty state


async def test_nodes_of_one_nats_deployment_share_state_across_a_restart(tmp_path: Path) -> None:
    """On the NATS bus what one node's plugin stores, the other node's reads; one node restarts while the other
    runs, and afterwards both still read it, through the store and through a request; a stale expect_revision
    from one node is refused after the other wrote."""
    url = shared_nats_url()
    stream, prefix = unique_names("pkv")
    settings = nats_settings(url, stream, prefix)
    try:
        async with run_server(spec("alpha"), settings=settings) as two:
            async with run_server(spec("alpha"), settings=settings) as one:
                first = await one.server.kv.scoped("alpha").put("baseline.m7", [1, 2, 3])
                entry = await two.server.kv.scoped("alpha").get("baseline.m7")
                assert entry is not None
                assert (entry.value, entry.revision) == ([1, 2, 3], first)
                newer = await two.server.kv.scoped("alpha").put("baseline.m7", [4], expect_revision=first)
                with pytest.raises(KVConflict):
                    await one.server.kv.scoped("alpha").put("baseline.m7", [5], expect_revision=first)
            async with run_server(spec("alpha"), settings=settings) as again:
                entry = await again.server.kv.scoped("alpha").get("baseline.m7")
                assert entry is not None
                assert (entry.value, entry.revision) == ([4], newer)
                got = await call(again, {"op": "get", "key": "baseline.m7"})  # run by either node
                assert got.payload["entry"] == {"value": [4], "revision": newer}
                stale = await call(again, {"op": "put", "key": "baseline.m7", "value": [6], "expect": first})
                assert stale.event_type == "demo:kv:v1:failed"
                assert "conflict" in stale.payload["error"]["message"]
    finally:
        await delete_stream(url, f"KV_{stream}_KV")
        await delete_stream(url, stream)


@pytest.mark.parametrize("bucket", ["custom_bucket"])
async def test_kv_bucket_names_the_nats_bucket(bucket: str) -> None:
    """kv_bucket puts the state in that bucket instead of <stream>_KV."""
    import nats

    url = shared_nats_url()
    stream, prefix = unique_names("pkv")
    name = f"{bucket}_{prefix}"
    try:
        async with run_server(spec("alpha"), settings=nats_settings(url, stream, prefix, kv_bucket=name)) as nexus:
            await call(nexus, {"op": "put", "key": "k", "value": 1})
        nc = await nats.connect(url)
        try:
            entry = await (await nc.jetstream().key_value(name)).get("alpha.k")
            assert entry.value == b"1"
        finally:
            await nc.close()
    finally:
        await delete_stream(url, f"KV_{name}")
        await delete_stream(url, stream)


KV_HANDLER_SOURCE = '''
from nexus import EventHandler


class Counter(EventHandler):
    """Counts its requests in ctx.kv."""

    event_type = "kvcli:count"

    async def handle(self, event):
        entry = await self.ctx.kv.get("count")
        count = 1 if entry is None else entry.value + 1
        await self.ctx.kv.put("count", count, expect_revision=0 if entry is None else entry.revision)
        return {"count": count}
'''


async def test_nexus_serve_restarted_on_the_same_data_dir_keeps_plugin_state(tmp_path: Path) -> None:
    """``nexus serve --data-dir DIR`` (memory bus) stopped with SIGTERM and started again: the plugin's count goes
    on from where it was; with another --data-dir it starts again from 1."""
    import os

    (tmp_path / "kv_cli_handlers.py").write_text(KV_HANDLER_SOURCE)
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH", "")) if p)

    async def count_twice(data_dir: Path) -> list[int]:
        port = free_port()
        command = [sys.executable, "-m", "nexus.cli", "serve", "--grpc-port", str(port), "--ws-port", "0"]
        command += ["--no-entry-points", "--handler", "kv_cli_handlers:Counter", "--data-dir", str(data_dir)]
        log = tmp_path / "serve.log"
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=tmp_path
            )
        try:
            deadline = time.monotonic() + 30
            while True:
                assert process.returncode is None, log.read_text()
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.05)
            client = NexusClient(f"127.0.0.1:{port}")
            try:
                done = [await asyncio.wait_for(client.call("kvcli:count:v1:requested", {}), 30) for _ in range(2)]
            finally:
                await client.close()
            return [event.payload["count"] for event in done]
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 30) == 0, log.read_text()

    data = tmp_path / "data"
    assert await count_twice(data) == [1, 2]
    assert await count_twice(data) == [3, 4]
    assert await count_twice(tmp_path / "other") == [1, 2]
