"""TLS: ``--tls-cert`` / ``--tls-key`` serve gRPC over TLS and the gateway as wss:// and https://. A client that
trusts the test CA connects on every transport; a plaintext client and a client without the CA are refused.

The CA and the server certificate (for 127.0.0.1 and localhost) are made here, with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats_support import free_port
from nexus.gateway.server import GatewayServer, GatewaySettings
from test_sse import SseClient
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from nexus import Event, Stream, StreamingEventHandler
from nexus.client import NexusClient
from nexus.config import ConfigError, Settings, load_settings
from nexus.errors import ConfigurationError, Unavailable
from nexus.node_remote import RemoteNode
from nexus.server import NexusServer
from nexus.tls import client_ssl_context

GUARD = 15.0
NEXUS_V1 = [Subprotocol("nexus.v1")]
REFUSED_WITHIN = 5.0
"""Seconds a refused call may take to fail (it fails at the handshake; a guard, not a measurement)."""


# --- certificates ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    """Files of a test CA and of a server certificate it signed."""

    ca_file: str
    cert_file: str
    key_file: str
    other_key_file: str
    """A key that does not belong to the certificate."""


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1, ::1 and localhost, valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Nexus test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "server.pem": cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(key),
        "other.key": _pem_key(ec.generate_private_key(ec.SECP256R1())),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(*(str(directory / name) for name in files))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- a TLS server -------------------------------------------------------------------------------------------------


class Countdown(StreamingEventHandler):
    event_type = "demo:stream_countdown"

    async def handle_stream(self, event: Event, stream: Stream) -> None:
        for i in range(int(event.payload.get("n", 3)), 0, -1):
            await stream.send({"remaining": i})


def tls_settings(pki: Pki, **fields: Any) -> Settings:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "ws_port": 0,
        "gateway": True,
        "load_entry_points": False,
        "tls_cert_file": pki.cert_file,
        "tls_key_file": pki.key_file,
    }
    return Settings(**(base | fields))


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[NexusServer]:
    """``nexus serve --tls-cert --tls-key`` in process, gRPC and gateway on free ports."""
    nexus = NexusServer(tls_settings(pki), handlers=[Countdown()])
    await nexus.start()
    try:
        yield nexus
    finally:
        await nexus.stop(grace=1.0)


def gateway_of(server: NexusServer) -> GatewayServer:
    assert isinstance(server.gateway, GatewayServer)
    return server.gateway


# --- gRPC --------------------------------------------------------------------------------------------------------


async def test_grpc_client_with_the_ca_emits_subscribes_and_requests(server: NexusServer, pki: Pki) -> None:
    """NexusClient(tls=True, ca_file=CA) talks to the TLS port: a subscription gets what another call emits, and
    a streaming request runs to success."""
    async with NexusClient(server.address, tls=True, ca_file=pki.ca_file) as client:
        received: list[Event] = []
        subscribed = asyncio.Event()
        subscription = client.subscribe("demo:>", on_connect=lambda _: subscribed.set())

        async def follow() -> None:
            async for event in subscription:
                received.append(event)
                return

        reader = asyncio.create_task(follow())
        async with asyncio.timeout(GUARD):
            await subscribed.wait()
            stored = await client.emit("demo:tick:v1:happened", {"n": 1})
            await reader
        assert [(e.event_type, e.offset, e.payload) for e in received] == [
            ("demo:tick:v1:happened", stored.offset, {"n": 1})
        ]
        async with asyncio.timeout(GUARD):
            states = [e.state async for e in client.request("demo:stream_countdown:v1:requested", {"n": 2})]
        assert [s for s in states if s != "heartbeat"] == ["started", "stream", "stream", "success"]


async def test_a_plaintext_grpc_client_is_refused(server: NexusServer) -> None:
    """A plaintext channel to the TLS port fails with UNAVAILABLE; nothing is stored."""
    head = await server.bus.head_offset()
    async with NexusClient(server.address) as client:
        async with asyncio.timeout(REFUSED_WITHIN):
            with pytest.raises(Unavailable):
                await client.emit("demo:tick:v1:happened", {"n": 1}, timeout=REFUSED_WITHIN)
    assert await server.bus.head_offset() == head


async def test_a_grpc_client_without_the_ca_fails_verification(server: NexusServer, pki: Pki, tmp_path: Path) -> None:
    """TLS against the system's roots (which do not hold the test CA), or another CA, fails with UNAVAILABLE."""
    other = make_pki(tmp_path)
    for ca_file in (None, other.ca_file):
        async with NexusClient(server.address, tls=True, ca_file=ca_file) as client:
            async with asyncio.timeout(REFUSED_WITHIN):
                with pytest.raises(Unavailable):
                    await client.emit("demo:tick:v1:happened", {"n": 1}, timeout=REFUSED_WITHIN)


# --- the gateway ---------------------------------------------------------------------------------------------------


async def test_wss_client_with_the_ca_subscribes_and_receives(server: NexusServer, pki: Pki) -> None:
    """The gateway serves wss:// only: with the CA, a client gets its connection frame, subscribes and receives an
    event published over gRPC."""
    gateway = gateway_of(server)
    assert gateway.url.startswith("wss://127.0.0.1:")
    assert gateway.http_url.startswith("https://127.0.0.1:")
    async with (
        NexusClient(server.address, ca_file=pki.ca_file) as client,
        connect(gateway.url, subprotocols=NEXUS_V1, ssl=client_ssl_context(pki.ca_file), open_timeout=GUARD) as ws,
    ):
        async with asyncio.timeout(GUARD):
            assert json.loads(await ws.recv())["type"] == "connection"
            await ws.send(json.dumps({"type": "subscribe", "event_types": ["demo:>"]}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            stored = await client.emit("demo:tick:v1:happened", {"n": 7})
            frame = json.loads(await ws.recv())
        assert (frame["type"], frame["offset"], frame["payload"]) == ("demo:tick:v1:happened", stored.offset, {"n": 7})


async def test_ws_to_the_wss_port_and_wss_without_the_ca_are_refused(server: NexusServer) -> None:
    """A plaintext ws:// handshake to the TLS port gets no connection; wss:// against the system's roots fails
    certificate verification."""
    gateway = gateway_of(server)
    plain = gateway.url.replace("wss://", "ws://", 1)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever websockets makes of a TLS alert
        async with connect(plain, subprotocols=NEXUS_V1, open_timeout=REFUSED_WITHIN):
            pass
    assert not isinstance(caught.value, TimeoutError)
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(gateway.url, subprotocols=NEXUS_V1, ssl=ssl.create_default_context()):
            pass
    assert gateway.stats.connections_total == 0


async def test_sse_over_https_streams_events(server: NexusServer, pki: Pki) -> None:
    """/sse on the TLS port: the stream taken over from websockets keeps working over TLS (subscribed, then the
    events as they are published), and a plaintext request gets no response."""
    gateway = gateway_of(server)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.port, ssl=client_ssl_context(pki.ca_file), server_hostname="127.0.0.1"
    )
    client = SseClient(reader, writer)
    try:
        writer.write(f"GET /sse?patterns=demo:> HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n\r\n".encode())
        async with asyncio.timeout(GUARD):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
        assert (await client.message()).json["type"] == "subscribed"
        async with NexusClient(server.address, ca_file=pki.ca_file) as nexus:
            stored = [await nexus.emit("demo:tick:v1:happened", {"n": n}) for n in range(3)]
        messages = await client.messages(3)
        assert [m.json["offset"] for m in messages] == [e.offset for e in stored]
        assert [m.id for m in messages] == [f"{e.epoch}:{e.offset}" for e in stored]
    finally:
        await client.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"GET /sse?patterns=demo:> HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(GUARD):
            answer = await reader.read(4096)
        assert not answer.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_gateway_reaches_a_tls_core(server: NexusServer, pki: Pki) -> None:
    """``nexus gateway --nexus-tls --nexus-ca-file``: a RemoteNode over TLS mirrors the core; without the CA it
    cannot start."""
    node = RemoteNode(server.address, tls=True, ca_file=pki.ca_file)
    await node.start()
    gateway = GatewayServer(node, GatewaySettings(host="127.0.0.1", port=0))
    await gateway.start()
    try:
        async with connect(gateway.url, subprotocols=NEXUS_V1, open_timeout=GUARD) as ws:
            async with asyncio.timeout(GUARD):
                assert json.loads(await ws.recv())["type"] == "connection"
                await ws.send(json.dumps({"type": "subscribe", "event_types": ["demo:>"]}))
                assert json.loads(await ws.recv())["type"] == "subscribed"
                async with NexusClient(server.address, ca_file=pki.ca_file) as client:
                    stored = await client.emit("demo:tick:v1:happened", {"n": 1})
                frame = json.loads(await ws.recv())
        assert frame["offset"] == stored.offset
    finally:
        await node.close()
        await gateway.stop(grace=1.0)

    plain = RemoteNode(server.address, connect_timeout=2.0)
    with pytest.raises(Unavailable):
        await plain.start()
    await plain.close()


# --- configuration -------------------------------------------------------------------------------------------------


async def test_unusable_tls_files_stop_the_server_before_it_starts(pki: Pki) -> None:
    """A certificate without its key, or a key of another certificate, is a ConfigurationError at start naming
    the flags; nothing is left listening."""
    for fields, message in (
        ({"tls_key_file": None}, "--tls-key"),
        ({"tls_cert_file": None}, "--tls-cert"),
        ({"tls_key_file": pki.other_key_file}, "--tls-cert"),
        ({"tls_cert_file": pki.ca_file, "tls_key_file": pki.key_file}, "--tls-cert"),
    ):
        nexus = NexusServer(tls_settings(pki, **fields))
        with pytest.raises(ConfigurationError, match=message):
            await nexus.start()
        assert nexus.grpc_port == 0
    with pytest.raises(ConfigError, match="tls_cert_file \\(from flag --tls-cert\\): must be an existing file"):
        load_settings(None, {}, {"tls_cert_file": pki.cert_file + ".missing"})


# --- the CLI ---------------------------------------------------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nexus.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(GUARD):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_client_commands_take_tls_and_a_ca_file(server: NexusServer, pki: Pki) -> None:
    """``nexus emit --ca-file CA`` stores an event on a TLS server; without TLS it exits 1 with unavailable."""
    code, out, err = await run_cli(
        "emit", "demo:tick:v1:happened", "--payload", '{"n": 1}', "--server", server.address, "--ca-file", pki.ca_file
    )
    assert code == 0, err
    assert json.loads(out)["event_type"] == "demo:tick:v1:happened"
    code, out, err = await run_cli("streams", "--server", server.address, "--tls", "--ca-file", pki.ca_file)
    assert code == 0, err
    code, out, err = await run_cli("emit", "demo:tick:v1:happened", "--server", server.address)
    assert code == 1
    assert out == ""
    assert "nexus: unavailable:" in err


async def test_cli_serve_refuses_a_certificate_without_its_key(pki: Pki) -> None:
    """``nexus serve --tls-cert FILE`` alone exits 2 and says the key is missing."""
    code, _, err = await run_cli("serve", "--grpc-port", "0", "--ws-port", "0", "--tls-cert", pki.cert_file)
    assert code == 2
    assert "--tls-key" in err


async def test_cli_gateway_reaches_a_tls_core_and_serves_wss(server: NexusServer, pki: Pki) -> None:
    """``nexus gateway --nexus-ca-file CA --tls-cert --tls-key --ws-allowed-origin``: the gateway process mirrors
    the TLS core and serves wss:// (a client with the CA connects; a page of an origin not listed gets 403)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEXUS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nexus.cli",
        "gateway",
        "--nexus",
        server.address,
        "--nexus-ca-file",
        pki.ca_file,
        "--ws-port",
        str(port),
        "--tls-cert",
        pki.cert_file,
        "--tls-key",
        pki.key_file,
        "--ws-allowed-origin",
        "https://app.example.com",
        "--log-format",
        "json",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    url = f"wss://127.0.0.1:{port}/ws"
    context = client_ssl_context(pki.ca_file)
    try:
        async with asyncio.timeout(GUARD):
            while True:  # until the gateway listens
                assert process.returncode is None, "nexus gateway exited"
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        async with connect(url, subprotocols=NEXUS_V1, ssl=context, origin=Origin("https://app.example.com")) as ws:
            async with asyncio.timeout(GUARD):
                assert json.loads(await ws.recv())["type"] == "connection"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, subprotocols=NEXUS_V1, ssl=context, origin=Origin("http://localhost:3000")):
                pass
        assert refused.value.response.status_code == 403
    finally:
        process.terminate()
        async with asyncio.timeout(GUARD):
            await process.communicate()
