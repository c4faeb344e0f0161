"""Authentication on real servers: tokens over gRPC, WebSocket, SSE and the listings, on the memory and NATS buses;
`nexus token`; protected mode; RS256 keys from a PEM and a JWKS file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats_support import delete_stream, nats_settings, shared_nats_url, unique_names
from nexus.gateway.server import GatewayServer, GatewaySettings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from nexus import Event, EventHandler, Stream, StreamingEventHandler
from nexus.auth import mint_token
from nexus.client import NexusClient
from nexus.config import Settings
from nexus.errors import PermissionDenied, Unauthenticated
from nexus.node_remote import RemoteNode
from nexus.testing import Recorder, StreamFollower, TestServer, run_server
from nexus.v1 import nexus_pb2

GUARD = 10.0
SECRET = "test-secret-" + "x" * 32
AUDIENCE = "nexus-test"
NEXUS_V1 = [Subprotocol("nexus.v1")]


class Hold(StreamingEventHandler):
    """Streams one chunk, then waits until it is cancelled."""

    event_type = "auth:stream_hold"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        await stream.send({"held": True})
        await asyncio.Event().wait()


class Echo(EventHandler):
    event_type = "auth:echo"

    async def handle(self, event: Event) -> dict[str, Any]:
        return {"echo": event.payload, "user_id": event.metadata.get("user_id")}


def token(sub: str, *, publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = (), **extra: Any) -> str:
    """A token for ``sub`` that the test server accepts (``extra`` overrides claims: exp, aud, ...)."""
    admin = bool(extra.pop("admin", False))
    secret = extra.pop("secret", SECRET)
    claims = jwt.decode(
        mint_token(SECRET, sub, publish=publish, subscribe=subscribe, admin=admin, audience=AUDIENCE),
        SECRET,
        algorithms=["HS256"],
        audience=AUDIENCE,
    )
    claims.update(extra)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256")


ALICE: dict[str, Any] = {"publish": ("demo:>",), "subscribe": ("demo:>",)}


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
async def nexus(request: pytest.FixtureRequest) -> AsyncIterator[TestServer]:
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Any] = {
            "gateway": True,
            "heartbeat_interval": 0.05,
            "jwt_secret": SECRET,
            "jwt_audience": AUDIENCE,
        }
        if request.param == "nats":
            url = shared_nats_url()
            stream, prefix = unique_names("auth")
            stack.push_async_callback(delete_stream, url, stream)
            overrides["settings"] = nats_settings(url, stream, prefix)
        yield await stack.enter_async_context(run_server(Hold(), Echo(), **overrides))


@contextlib.asynccontextmanager
async def client(server: TestServer, bearer: str | None) -> AsyncIterator[NexusClient]:
    async with NexusClient(server.address, token=bearer) as nexus_client:
        yield nexus_client


async def ws_open(server: TestServer, bearer: str | None, *, in_protocol: bool = False) -> ClientConnection:
    """A WebSocket with ``bearer`` in the query (or as a subprotocol entry); the connection frame is read when
    the server accepted it."""
    url = server.ws_url
    protocols = list(NEXUS_V1)
    if bearer is not None and in_protocol:
        protocols.append(Subprotocol(bearer))
    elif bearer is not None:
        url += "?token=" + quote(bearer)
    return await connect(url, subprotocols=protocols, open_timeout=GUARD)


async def frame(socket_: ClientConnection, **fields: Any) -> dict[str, Any]:
    """Send a frame; return the first answer that is not an event."""
    await socket_.send(json.dumps(fields))
    while True:
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(socket_.recv(), GUARD))
        if answer["type"] in ("error", "published", "pong", "subscribed"):
            return answer


async def refused_with_1008(server: TestServer, bearer: str | None) -> str:
    """Open a WebSocket with ``bearer``; assert an `unauthenticated` error frame and close 1008; the message."""
    ws = await ws_open(server, bearer)
    error = json.loads(await asyncio.wait_for(ws.recv(), GUARD))
    assert (error["type"], error["code"]) == ("error", "unauthenticated")
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), GUARD)
    assert ws.close_code == 1008
    return str(error["message"])


async def http_status(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and (for a response with Content-Length) body of a GET; a streaming response is left unread."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        async with asyncio.timeout(GUARD):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
            body = await reader.readexactly(int(fields["content-length"])) if "content-length" in fields else b""
    finally:
        writer.close()
    return int(status_line.split()[1]), body


async def grpc_code(call: Any) -> grpc.StatusCode:
    """The status code a raw stub call (unary or streaming) ends with."""
    try:
        await asyncio.wait_for(call.read() if hasattr(call, "read") else call, GUARD)
    except grpc.aio.AioRpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    raise AssertionError("the call succeeded")


# --- refusals ----------------------------------------------------------------------------------------------------


async def test_without_a_token_every_transport_refuses_but_health_answers(nexus: TestServer) -> None:
    """No token: every NexusService RPC ends UNAUTHENTICATED, a WebSocket gets an error frame and 1008, /sse and
    the listings 401; the health service still answers SERVING."""
    stub = nexus.client.stub
    event = nexus_pb2.EventRequest(event_type="demo:thing:v1:happened")
    calls = {
        "EmitEvent": stub.EmitEvent(event),
        "SubscribeEvents": stub.SubscribeEvents(nexus_pb2.SubscribeRequest(event_types=[">"])),
        "SubscribeEventBatches": stub.SubscribeEventBatches(nexus_pb2.SubscribeEventBatchesRequest(event_types=[">"])),
        "PublishEvents": stub.PublishEvents(iter([nexus_pb2.PublishEventsRequest(event=event)])),
        "RequestEvent": stub.RequestEvent(
            nexus_pb2.RequestEventRequest(event=nexus_pb2.EventRequest(event_type="auth:echo:v1:requested"))
        ),
        "CancelStream": stub.CancelStream(nexus_pb2.CancelStreamRequest(correlation_id="x")),
        "ListHandlers": stub.ListHandlers(nexus_pb2.ListHandlersRequest()),
        "ListStreams": stub.ListStreams(nexus_pb2.ListStreamsRequest()),
    }
    codes = {name: await grpc_code(call) for name, call in calls.items()}
    assert codes == dict.fromkeys(calls, grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(Unauthenticated, match="requires a token"):
        await nexus.client.emit("demo:thing:v1:happened", {})
    health = health_pb2_grpc.HealthStub(nexus.client.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=GUARD)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    assert "requires a token" in await refused_with_1008(nexus, None)
    port = nexus.server.ws_port
    for path in ("/sse?patterns=demo:%3E", "/api/handlers", "/api/streams"):
        status, body = await http_status(port, path)
        assert (status, json.loads(body)["error"]) == (401, "unauthenticated"), path
    assert (await http_status(port, "/"))[0] == 200  # the page holds no data


async def test_expired_forged_and_foreign_audience_tokens_are_refused(nexus: TestServer) -> None:
    """An expired token, one signed with another secret and one for another audience are refused on gRPC,
    WebSocket and SSE alike; a good one passes all three."""
    bad = {
        "expired": token("alice", **ALICE, exp=int(time.time()) - 120),
        "signature": token("alice", **ALICE, secret="another-secret-" + "y" * 32),
        "audience": token("alice", **ALICE, aud="someone-else"),
    }
    for reason, bearer in bad.items():
        async with client(nexus, bearer) as alice:
            with pytest.raises(Unauthenticated) as caught:
                await alice.emit("demo:thing:v1:happened", {})
        assert reason in caught.value.message, caught.value.message
        assert reason in await refused_with_1008(nexus, bearer)
        headers = {"Authorization": f"Bearer {bearer}"}
        assert (await http_status(nexus.server.ws_port, "/sse?patterns=demo:%3E", headers))[0] == 401
    good = token("alice", **ALICE)
    async with client(nexus, good) as alice:
        assert (await alice.emit("demo:thing:v1:happened", {})).metadata["user_id"] == "alice"
    ws = await ws_open(nexus, good, in_protocol=True)
    assert ws.subprotocol == "nexus.v1"
    assert json.loads(await ws.recv())["type"] == "connection"
    await ws.close()
    status, _ = await http_status(nexus.server.ws_port, f"/sse?patterns=demo:%3E&token={good}")
    assert status == 200


# --- scopes ------------------------------------------------------------------------------------------------------


async def test_alice_publishes_and_subscribes_only_inside_her_patterns(nexus: TestServer) -> None:
    """alice (`demo:>`) may publish and subscribe there; outside, a publish is PERMISSION_DENIED / an error frame
    `permission_denied` (the socket stays open), and a subscription to `>` is refused, over gRPC, WebSocket and
    SSE (403), never silently emptied."""
    bearer = token("alice", **ALICE)
    async with client(nexus, bearer) as alice:
        await alice.emit("demo:thing:v1:happened", {})
        with pytest.raises(PermissionDenied, match="outside the patterns you may publish to"):
            await alice.emit("other:thing:v1:happened", {})
        with pytest.raises(PermissionDenied, match="outside the patterns you may subscribe to"):
            async for _ in alice.subscribe(">"):
                pass
        with pytest.raises(PermissionDenied):
            async for _ in alice.subscribe("demo:>", "other:>"):
                pass
        sub = alice.subscribe("demo:*:v1:*")
        seen = asyncio.ensure_future(anext(aiter(sub)))
        await asyncio.sleep(0.2)
        await alice.emit("demo:later:v1:happened", {})
        assert (await asyncio.wait_for(seen, GUARD)).event_type == "demo:later:v1:happened"
        sub.close()

    ws = await ws_open(nexus, bearer)
    assert json.loads(await ws.recv())["type"] == "connection"
    answer = await frame(ws, type="other:thing:v1:happened", payload={}, event_id="x1")
    assert (answer["type"], answer["code"], answer.get("ref")) == ("error", "permission_denied", "x1")
    answer = await frame(ws, type="subscribe", event_types=[">"])
    assert (answer["type"], answer["code"]) == ("error", "permission_denied")
    assert (await frame(ws, type="subscribe", event_types=["demo:>"]))["type"] == "subscribed"
    assert (await frame(ws, type="ping"))["type"] == "pong"
    await ws.close()

    status, body = await http_status(nexus.server.ws_port, f"/sse?patterns=%3E&token={bearer}")
    assert (status, json.loads(body)["error"]) == (403, "permission_denied")


async def test_alice_cannot_impersonate_bob(nexus: TestServer) -> None:
    """Whatever a client writes in metadata.user_id, the stored event says the token's user (gRPC, WebSocket,
    and a request's lifecycle as its handler sees it); nothing says `auth: none`."""
    async with client(nexus, token("root", admin=True)) as root:
        recorder = await Recorder(root.subscribe("demo:>", "auth:>")).start()
        bearer = token("alice", **ALICE)
        async with client(nexus, bearer) as alice:
            stored = await alice.emit("demo:said:v1:happened", {"n": 1}, metadata={"user_id": "bob"})
            assert stored.metadata["user_id"] == "alice"
            assert "auth" not in stored.metadata
            reply = await alice.call("auth:echo:v1:requested", {}, metadata={"user_id": "bob"})
            assert reply.payload["user_id"] == "alice"
        ws = await ws_open(nexus, bearer)
        await ws.recv()
        await frame(ws, type="demo:said:v1:happened", payload={"n": 2}, metadata={"user_id": "bob"})
        await ws.close()
        recorded = await recorder.wait_for(lambda events: len(events) >= 4)  # 2 said, a request, its success
        await recorder.stop()
    assert len(recorded) == 4
    assert {e.metadata.get("user_id") for e in recorded} == {"alice"}


async def test_a_token_without_patterns_may_still_request_handled_types_and_gets_their_lifecycle(
    nexus: TestServer,
) -> None:
    """Deny by default: carol's token has no patterns; she can publish no plain event and request no unhandled
    type, yet she may request a handled type and receives that request's whole lifecycle (gRPC and WebSocket)."""
    bearer = token("carol")
    async with client(nexus, bearer) as carol:
        reply = await carol.call("auth:echo:v1:requested", {"n": 1})
        assert (reply.state, reply.payload["user_id"]) == ("success", "carol")
        with pytest.raises(PermissionDenied):
            await carol.emit("demo:thing:v1:happened", {})
        with pytest.raises(PermissionDenied):
            await carol.emit("nobody:thing:v1:requested", {})
        held = StreamFollower(carol.request("auth:stream_hold:v1:requested", {}, heartbeats=False))
        await held.wait_for(lambda chunks: len(chunks) == 1)
        assert (await held.cancel()).state == "cancelled"

    ws = await ws_open(nexus, bearer)
    await ws.recv()
    await ws.send(json.dumps({"type": "auth:echo:v1:requested", "payload": {"n": 2}}))
    types: list[str] = []
    async with asyncio.timeout(GUARD):
        while not types or types[-1] != "auth:echo:v1:success":
            types.append(json.loads(await ws.recv())["type"])
    assert types == ["published", "auth:echo:v1:success"]
    answer = await frame(ws, type="demo:thing:v1:happened", payload={})
    assert (answer["type"], answer["code"]) == ("error", "permission_denied")
    await ws.close()


async def test_streams_are_listed_to_their_owner_and_all_of_them_to_an_admin(nexus: TestServer) -> None:
    """alice and bob each see their own stream in ListStreams and /api/streams; an admin token sees both."""
    async with client(nexus, token("alice")) as alice, client(nexus, token("bob")) as bob:
        mine = StreamFollower(alice.request("auth:stream_hold:v1:requested", {}, event_id="a-1", heartbeats=False))
        theirs = StreamFollower(bob.request("auth:stream_hold:v1:requested", {}, event_id="b-1", heartbeats=False))
        await mine.wait_for(lambda chunks: len(chunks) == 1)
        await theirs.wait_for(lambda chunks: len(chunks) == 1)
        assert [s["correlation_id"] for s in await alice.streams()] == ["a-1"]
        assert [s["correlation_id"] for s in await bob.streams()] == ["b-1"]
        assert await bob.cancel("a-1") is False
        async with client(nexus, token("root", admin=True)) as root:
            assert sorted(s["correlation_id"] for s in await root.streams()) == ["a-1", "b-1"]
        port = nexus.server.ws_port
        for who, expected in (("alice", ["a-1"]), ("bob", ["b-1"])):
            status, body = await http_status(port, "/api/streams", {"Authorization": f"Bearer {token(who)}"})
            assert (status, [s["correlation_id"] for s in json.loads(body)]) == (200, expected)
        status, body = await http_status(port, f"/api/streams?token={token('root', admin=True)}")
        assert sorted(s["correlation_id"] for s in json.loads(body)) == ["a-1", "b-1"]
        status, body = await http_status(port, f"/api/handlers?token={token('carol')}")
        assert status == 200
        assert {h["event_type"] for h in json.loads(body)} == {"auth:stream_hold", "auth:echo"}
        await mine.cancel()
        await theirs.cancel()


async def test_with_authentication_off_the_client_claim_stays_and_is_marked() -> None:
    """Auth off: a client's metadata.user_id is kept as its claim, and the server marks it `auth: none`."""
    async with run_server(Echo()) as nexus:
        stored = await nexus.client.emit("demo:said:v1:happened", {}, metadata={"user_id": "bob"})
        assert (stored.metadata["user_id"], stored.metadata["auth"]) == ("bob", "none")
        forged = await nexus.client.emit("demo:said:v1:happened", {}, metadata={"auth": "jwt"})
        assert forged.metadata["auth"] == "none"


# --- public keys -------------------------------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("form", ["pem", "jwks"])
async def test_rs256_tokens_verify_against_a_pem_or_a_jwks_file(tmp_path: Path, form: str) -> None:
    """A server with --jwt-public-key accepts tokens its key signed (by kid in a JWKS file) and refuses tokens of
    another key and HS256 tokens made with the public key as secret."""
    key, other = rsa_key(), rsa_key()
    path = tmp_path / f"keys.{form}"
    if form == "pem":
        path.write_bytes(public_pem(key))
        headers: dict[str, str] = {}
    else:
        entries = [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "alg": "RS256"}
            for kid, k in (("old", other), ("current", key))
        ]
        path.write_text(json.dumps({"keys": entries}))
        headers = {"kid": "current"}
    claims = {"sub": "dana", "exp": int(time.time()) + 60, "nexus": {"publish": ["demo:>"]}}
    good = jwt.encode(claims, key, algorithm="RS256", headers=headers)
    forged = jwt.encode(claims, other, algorithm="RS256", headers=headers)
    async with run_server(Echo(), gateway=True, jwt_public_key_file=str(path)) as nexus:
        async with client(nexus, good) as dana:
            assert (await dana.emit("demo:thing:v1:happened", {})).metadata["user_id"] == "dana"
        async with client(nexus, forged) as mallory:
            with pytest.raises(Unauthenticated, match="signature"):
                await mallory.emit("demo:thing:v1:happened", {})
        assert "signature" in await refused_with_1008(nexus, forged)
        ws = await ws_open(nexus, good)
        assert json.loads(await ws.recv())["type"] == "connection"
        await ws.close()


# --- the command line ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cli_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``nexus ARGS``: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus.cli", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    async with asyncio.timeout(GUARD * 3):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_nexus_token_prints_a_token_the_server_accepts() -> None:
    """`nexus token` prints one line, a token with the requested scopes that the server configured with the same
    secret (from NEXUS_JWT_SECRET) accepts; without a secret it exits 2."""
    args = ("token", "--sub", "alice", "--publish", "demo:>", "--ttl", "5m")
    code, out, err = await run_cli(*args, env=cli_env(NEXUS_JWT_SECRET=SECRET))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 1
    claims = jwt.decode(lines[0], SECRET, algorithms=["HS256"])
    assert claims["nexus"] == {"publish": ["demo:>"], "subscribe": []}
    assert 290 <= claims["exp"] - time.time() <= 301
    async with run_server(Echo(), jwt_secret=SECRET) as nexus, client(nexus, lines[0]) as alice:
        assert (await alice.emit("demo:thing:v1:happened", {})).metadata["user_id"] == "alice"

        emit = ("emit", "demo:cli:v1:happened", "--server", nexus.address)
        code, out, err = await run_cli(*emit, env=cli_env(NEXUS_TOKEN=lines[0]))
        assert code == 0, err
        assert json.loads(out)["metadata"]["user_id"] == "alice"
        code, out, err = await run_cli(*emit, env=cli_env())
        assert (code, out) == (1, "")
        assert err.startswith("nexus: unauthenticated:")

    code, out, err = await run_cli("token", "--sub", "alice", env=cli_env())
    assert (code, out) == (2, "")
    assert "--jwt-secret" in err


async def test_a_relaying_gateway_authenticates_its_users_and_keeps_their_identity(nexus: TestServer) -> None:
    """`nexus gateway`'s setup: a RemoteNode with an admin token (`--nexus-token`) under a gateway that checks its
    own clients' tokens: alice's events reach the core as alice's, and a client without a token is refused."""
    node = RemoteNode(nexus.address, token=token("relay", admin=True), history_size=100)
    await node.start()
    gateway = GatewayServer(
        node,
        GatewaySettings(host="127.0.0.1", port=0),
        authenticator=Settings(jwt_secret=SECRET, jwt_audience=AUDIENCE).authenticator(),
    )
    await gateway.start()
    try:
        async with client(nexus, token("root", admin=True)) as root:
            recorder = await Recorder(root.subscribe("demo:>")).start()
            async with connect(f"{gateway.url}?token={token('alice', **ALICE)}", subprotocols=NEXUS_V1) as ws:
                assert json.loads(await ws.recv())["type"] == "connection"
                answer = await frame(ws, type="demo:relayed:v1:happened", payload={}, metadata={"user_id": "bob"})
                assert answer["type"] == "published"
            (event,) = await recorder.wait_for(lambda events: len(events) >= 1)
            await recorder.stop()
        assert event.metadata["user_id"] == "alice"
        async with connect(gateway.url, subprotocols=NEXUS_V1) as ws:
            assert json.loads(await ws.recv())["code"] == "unauthenticated"
    finally:
        await node.close()
        await gateway.stop(grace=1.0)


def test_protected_mode_refuses_an_anonymous_server_on_every_interface() -> None:
    """`nexus serve --host 0.0.0.0` without authentication exits 2 with one line saying why and how; with
    --allow-anonymous it starts (and stops on SIGTERM)."""
    grpc_port, ws_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "nexus.cli", "serve", "--host", "0.0.0.0", "--grpc-port", str(grpc_port),
        "--ws-port", str(ws_port), "--no-entry-points", "--log-format", "json",
    ]  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=GUARD * 3, check=False)
    assert refused.returncode == 2
    lines = refused.stderr.splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("nexus: error: nexus serve on 0.0.0.0 (not loopback) without authentication")
    assert "--jwt-secret" in lines[0]
    assert "--allow-anonymous" in lines[0]

    process = subprocess.Popen(
        [*command, "--allow-anonymous"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env()
    )
    try:
        deadline = time.monotonic() + GUARD * 2
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", grpc_port), timeout=0.5):
                break
            assert time.monotonic() < deadline, "nexus serve --allow-anonymous did not open its port"
            time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(GUARD)


async def sse_events(server: TestServer, bearer: str, until_offset: int) -> list[dict[str, Any]]:
    """The event objects an /sse stream for '>' with ``bearer`` replays from the start of the history and
    delivers, up to the one at ``until_offset``."""
    port = server.server.ws_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = f"/sse?patterns=%3E&since_offset=0&epoch={quote(server.bus.epoch)}&token={quote(bearer)}"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(GUARD):
            assert b" 200 " in await reader.readuntil(b"\r\n")
            while not got or got[-1].get("offset") != until_offset:
                line = (await reader.readline()).decode()
                if line.startswith("data:"):
                    data = json.loads(line[5:])
                    if "offset" in data:
                        got.append(data)
    finally:
        writer.close()
    return got


async def test_private_events_and_lifecycles_reach_only_their_users_on_every_transport(nexus: TestServer) -> None:
    """bob, subscribed to everything over gRPC, WebSocket and SSE (live and replay), receives neither alice's
    request, its chunks and result, nor her note to carol; carol receives the note; the admin receives it all."""
    everything = {"subscribe": (">",), "publish": (">",)}
    async with client(nexus, token("alice", **everything)) as alice, client(nexus, token("bob", **everything)) as bob:
        recorder = Recorder(bob.subscribe(">"))
        await recorder.start()
        ws_bob = await ws_open(nexus, token("bob", **everything))
        assert json.loads(await ws_bob.recv())["type"] == "connection"
        assert (await frame(ws_bob, type="subscribe", event_types=[">"]))["type"] == "subscribed"
        done = await alice.call("auth:echo:v1:requested", {"secret": "alice's"})
        note = await alice.emit("demo:note:v1:sent", {"text": "for carol"}, metadata={"audience": "carol"})
        async with client(nexus, token("root", admin=True)) as admin:
            marker = await admin.emit("demo:marker:v1:set", {})
        private = {done.correlation_id, note.event_id}

        seen_grpc = await recorder.wait_for(lambda evs: any(e.offset == marker.offset for e in evs), GUARD)
        await recorder.stop()
        seen_ws: list[dict[str, Any]] = []
        while not seen_ws or seen_ws[-1].get("offset") != marker.offset:
            message = json.loads(await asyncio.wait_for(ws_bob.recv(), GUARD))
            if "offset" in message:
                seen_ws.append(message)
        await ws_bob.close()
        seen_sse = await sse_events(nexus, token("bob", **everything), marker.offset)
        for seen in (
            [(e.event_id, e.correlation_id) for e in seen_grpc],
            [(f["event_id"], f["metadata"].get("correlation_id", "")) for f in seen_ws],
            [(f["event_id"], f["metadata"].get("correlation_id", "")) for f in seen_sse],
        ):
            assert all(event_id not in private and correlation not in private for event_id, correlation in seen)
            assert seen[-1][0] == marker.event_id

        carol_seen = await sse_events(nexus, token("carol", subscribe=(">",)), marker.offset)
        assert note.event_id in [f["event_id"] for f in carol_seen]
        assert done.correlation_id not in [f["metadata"].get("correlation_id") for f in carol_seen]
        root_seen = await sse_events(nexus, token("root", admin=True), marker.offset)
        root_ids = {f["event_id"] for f in root_seen} | {f["metadata"].get("correlation_id") for f in root_seen}
        assert private <= root_ids
