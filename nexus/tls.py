"""TLS for the transports: the server's certificate and key, and what clients trust.

``nexus serve --tls-cert FILE --tls-key FILE`` serves gRPC over TLS and the gateway as ``wss://`` / ``https://``
with one certificate (PEM, the chain after the leaf) and its private key (PEM, unencrypted). Clients verify the
server against a CA file (``NexusClient(..., tls=True, ca_file=...)``, ``--tls --ca-file``), or against the
system's roots when none is given.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import grpc

from nexus.errors import ConfigurationError


@dataclasses.dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's certificate chain and private key, both PEM, checked to belong together."""

    cert_chain: bytes
    private_key: bytes
    cert_file: str
    key_file: str

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``."""
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)])

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the gateway (TLS 1.2 or later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"--tls-cert {self.cert_file} / --tls-key {self.key_file} cannot be used: {_reason(exc)}"
            ) from None
        return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{flag} {path} cannot be read ({_reason(exc)})") from None


def load_server_tls(cert_file: str | None, key_file: str | None) -> ServerTls | None:
    """The server's TLS material, or None when neither file is set.

    Raises :class:`ConfigurationError` when only one is set, a file cannot be read, or the key does not match the
    certificate (checked by loading both into an ``ssl`` context now, not at the first client).
    """
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        missing = "--tls-cert (tls_cert_file)" if cert_file is None else "--tls-key (tls_key_file)"
        raise ConfigurationError(f"TLS needs a certificate and its key: {missing} is missing")
    tls = ServerTls(_read(cert_file, "--tls-cert"), _read(key_file, "--tls-key"), cert_file, key_file)
    tls.ssl_context()  # raises for a key that does not match, or files that are no PEM
    return tls


def channel_credentials(ca_file: str | None = None) -> grpc.ChannelCredentials:
    """What a TLS client trusts: the CA certificates (PEM) in ``ca_file``, else the system's roots."""
    roots = _read(ca_file, "--ca-file") if ca_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


def client_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """An ``ssl`` client context (for ``wss://`` and ``https://``) trusting ``ca_file``, else the system's roots."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"--ca-file {ca_file} cannot be used ({_reason(exc)})") from None
