"""Authentication: what a client presented (a bearer token, or nothing) → who it acts as (a :class:`Principal`).

Every transport reads the token its own way (gRPC: ``authorization: Bearer <token>`` call metadata; the gateway:
the ``token`` query parameter, a ``Sec-WebSocket-Protocol`` entry or ``Authorization: Bearer``), wraps it in
:class:`Credentials` with the connection's id, and asks one :class:`Authenticator`:

- :func:`allow_all` (authentication off, the default): everyone is an anonymous principal, any token ignored;
- :class:`JwtAuthenticator` (authentication on): a JSON Web Token signed with the configured HS256 secret or by
  one of the configured RS256 / ES256 public keys (PEM, or a JWKS file whose key is picked by ``kid``), with
  ``exp`` required and checked, ``nbf`` checked (both with a small leeway), and ``aud`` / ``iss`` when configured.
  A missing, malformed, expired or wrongly signed token raises :class:`~nexus.errors.Unauthenticated`.

Claims → principal (:func:`principal_from_claims`)::

    {"sub": "alice", "exp": 1767225600,
     "nexus": {"publish": ["demo:>"], "subscribe": ["demo:>"], "serve": ["demo:>"], "admin": false}}

``sub`` is the user id. The ``nexus`` claim's ``publish`` / ``subscribe`` lists are the patterns the user may
publish to and subscribe to; ``serve`` the requests a worker with this token may handle (matched against
``service:action:*:requested``); both default to none (deny by default: such a user may still send requests to
handled types and receive the lifecycle of its own requests, see :meth:`nexus.node.Node.admit`). ``admin: true``
may do and see everything.

Verification is pure (:meth:`JwtAuthenticator.authenticate` takes the time as an argument): only the algorithms
configured are accepted, and the key is chosen by the algorithm the token names, so ``none`` and "HS256 signed
with the public key as secret" are refused before any signature is checked.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nexus.errors import ConfigurationError, InvalidPattern, Unauthenticated
from nexus.identity import Principal
from nexus.patterns import parse_pattern

HS256: Final = "HS256"
PUBLIC_KEY_ALGORITHMS: Final = ("RS256", "ES256")
MIN_SECRET_BYTES: Final = 32
"""Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash)."""
DEFAULT_LEEWAY_S: Final = 10.0
CLAIM: Final = "nexus"
"""The claim holding a token's scopes: ``publish``, ``subscribe`` (pattern lists) and ``admin``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    """What a connecting client presented, and where it came from."""

    token: str | None
    connection_id: str = ""
    """The server's id of the client connection (the principal's ``connection_id``)."""
    path: str = ""
    remote_address: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    subprotocols: Sequence[str] = ()


class Authenticator(Protocol):
    """Who a client acts as: returns its :class:`Principal`, or raises
    :class:`~nexus.errors.Unauthenticated` / :class:`~nexus.errors.PermissionDenied`."""

    async def __call__(self, credentials: Credentials) -> Principal: ...


async def allow_all(credentials: Credentials) -> Principal:
    """Authentication off: everyone is accepted, anonymously (a token, if any, is not looked at)."""
    return Principal(connection_id=credentials.connection_id)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` value ``Bearer <token>``; None for none or another scheme (``Basic``
    credentials meant for a proxy in front of Nexus are not Nexus's to judge)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


# --- keys ---------------------------------------------------------------------------------------------------------


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclasses.dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key: the algorithm it verifies and its ``kid`` (None for a PEM key)."""

    algorithm: str
    key: PublicKey
    kid: str | None = None


def _algorithm_of(key: object, where: str) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigurationError(f"{where}: an RSA key of {key.key_size} bits is too short (2048 at least)")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigurationError(f"{where}: an EC key on {key.curve.name} (ES256 needs P-256)")
        return "ES256"
    raise ConfigurationError(f"{where}: a {type(key).__name__} (use an RSA key for RS256 or a P-256 key for ES256)")


def load_public_keys(path: str) -> tuple[VerificationKey, ...]:
    """The keys of ``--jwt-public-key FILE``: a PEM public key (or certificate), or a JWKS JSON file
    (``{"keys": [...]}``: its RS256 / ES256 signature keys, picked by ``kid``). Raises ConfigurationError."""
    where = f"--jwt-public-key {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if data.lstrip().startswith(b"{"):
        return _jwks_keys(data, where)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            from cryptography import x509

            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigurationError(f"{where} is neither a PEM public key nor a JWKS JSON file ({exc})") from None
    algorithm = _algorithm_of(key, where)  # refuses keys of other kinds
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return (VerificationKey(algorithm, key),)


def _jwks_keys(data: bytes, where: str) -> tuple[VerificationKey, ...]:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ConfigurationError(f"{where} is not valid JSON ({exc})") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigurationError(f'{where}: a JWKS file holds {{"keys": [...]}}')
    keys: list[VerificationKey] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue  # encryption keys are not for verifying tokens
        if entry.get("alg") not in (None, *PUBLIC_KEY_ALGORITHMS):
            continue  # an algorithm this server does not accept: the key is not used
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise ConfigurationError(f"{where}: key {index} cannot be used ({exc})") from None
        key = jwk.key
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            continue  # a symmetric or private key has no place in a public key set
        algorithm = _algorithm_of(key, f"{where} key {index}")
        if entry.get("alg") not in (None, algorithm):
            raise ConfigurationError(f"{where}: key {index} says alg {entry['alg']!r} but is a {algorithm} key")
        kid = entry.get("kid")
        keys.append(VerificationKey(algorithm, key, kid if isinstance(kid, str) else None))
    if not keys:
        raise ConfigurationError(f"{where}: no RS256 or ES256 signature key in the set")
    return tuple(keys)


# --- verification -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class JwtSettings:
    """How tokens are verified (from :class:`~nexus.config.Settings`)."""

    secret: str | None = None
    """HS256 shared secret (at least 32 bytes)."""
    public_keys: tuple[VerificationKey, ...] = ()
    audience: str | None = None
    """When set, a token's ``aud`` must name it; when not, a token that names an audience is refused."""
    issuer: str | None = None
    leeway_s: float = DEFAULT_LEEWAY_S
    """Seconds of clock difference forgiven around ``exp`` and ``nbf``."""

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"the JWT secret is {len(self.secret.encode())} bytes: use {MIN_SECRET_BYTES} or more, e.g. "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if self.secret is None and not self.public_keys:
            raise ConfigurationError("JWT verification needs a secret (--jwt-secret) or public keys (--jwt-public-key)")

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms a token may be signed with: HS256 with a secret, the public keys' own."""
        found = [HS256] if self.secret is not None else []
        found += sorted({key.algorithm for key in self.public_keys})
        return tuple(found)


class JwtAuthenticator:
    """Authentication on: every client needs a valid token (see the module docstring)."""

    def __init__(self, settings: JwtSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock

    async def __call__(self, credentials: Credentials) -> Principal:
        return self.authenticate(credentials, now=self.clock())

    def authenticate(self, credentials: Credentials, *, now: float) -> Principal:
        """The principal of ``credentials`` at time ``now`` (epoch seconds); raises :class:`Unauthenticated`."""
        if not credentials.token:
            raise Unauthenticated("this server requires a token (authentication is on)")
        claims = self.verify(credentials.token, now=now)
        return principal_from_claims(claims, credentials.connection_id)

    def verify(self, token: str, *, now: float) -> dict[str, Any]:
        """The claims of ``token`` once its signature, algorithm, ``exp``, ``nbf``, ``aud`` and ``iss`` check out."""
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in s.algorithms:
            accepted = ", ".join(s.algorithms)
            raise Unauthenticated(f"tokens signed with {str(algorithm)[:20]!r} are not accepted (only {accepted})")
        key = s.secret if algorithm == HS256 else self._public_key(algorithm, header.get("kid"))
        try:
            # Time is checked below against `now`; PyJWT checks the signature, the audience and the issuer.
            claims: dict[str, Any] = jwt.decode(
                token,
                key,  # type: ignore[arg-type]  # a str secret or a public key object
                algorithms=[algorithm],
                audience=s.audience,
                issuer=s.issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": ["exp", "sub"]},
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            wanted = f"{s.audience!r}" if s.audience else "none"
            raise Unauthenticated(f"the token is for another audience (this server's: {wanted})") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token is from another issuer") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token cannot be used ({exc})") from None
        check_times(claims, now=now, leeway=s.leeway_s)
        return claims

    def _public_key(self, algorithm: str, kid: object) -> PublicKey:
        candidates = [key for key in self.settings.public_keys if key.algorithm == algorithm]
        if kid is not None:
            candidates = [key for key in candidates if key.kid == kid]
            if not candidates:
                raise Unauthenticated(f"no key with kid {str(kid)[:40]!r} for {algorithm}")
        elif len(candidates) > 1:
            raise Unauthenticated("the token names no kid, and there are several keys to choose from")
        return candidates[0].key


def check_times(claims: Mapping[str, Any], *, now: float, leeway: float) -> None:
    """Refuse a token whose ``exp`` is past or whose ``nbf`` is to come, at ``now`` give or take ``leeway``."""
    for name in ("exp", "nbf"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Unauthenticated(f"the token's {name!r} claim must be a number of epoch seconds")
    if float(claims["exp"]) <= now - leeway:
        raise Unauthenticated("the token has expired")
    if "nbf" in claims and float(claims["nbf"]) > now + leeway:
        raise Unauthenticated("the token is not valid yet (nbf)")


def _patterns(scopes: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = scopes.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Unauthenticated(f"the token's {CLAIM}.{name} claim must be a list of patterns")
    try:
        for pattern in value:
            parse_pattern(pattern)
    except InvalidPattern as exc:
        raise Unauthenticated(f"the token's {CLAIM}.{name} claim holds a bad pattern: {exc.message}") from None
    return tuple(value)


def principal_from_claims(claims: Mapping[str, Any], connection_id: str) -> Principal:
    """The principal a verified token's claims describe (deny by default: no ``nexus`` claim, no patterns)."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthenticated("the token's 'sub' claim must be a user id")
    scopes = claims.get(CLAIM, {})
    if not isinstance(scopes, Mapping):
        raise Unauthenticated(f"the token's {CLAIM!r} claim must be an object")
    admin = scopes.get("admin", False)
    if not isinstance(admin, bool):
        raise Unauthenticated(f"the token's {CLAIM}.admin claim must be true or false")
    return Principal(
        connection_id=connection_id,
        user_id=sub,
        authenticated=True,
        publish=_patterns(scopes, "publish"),
        subscribe=_patterns(scopes, "subscribe"),
        serve=_patterns(scopes, "serve"),
        admin=admin,
    )


def mint_token(
    secret: str,
    sub: str,
    *,
    publish: Sequence[str] = (),
    subscribe: Sequence[str] = (),
    admin: bool = False,
    ttl_s: float = 3600.0,
    serve: Sequence[str] = (),
    now: float | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token for ``sub`` with these scopes, valid ``ttl_s`` seconds from ``now`` (for development and
    tests: ``nexus token``). Patterns are checked (:class:`~nexus.errors.InvalidPattern`)."""
    for pattern in (*publish, *subscribe, *serve):
        parse_pattern(pattern)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + max(1, round(ttl_s))}
    scopes: dict[str, Any] = {"publish": list(publish), "subscribe": list(subscribe)}
    if serve:
        scopes["serve"] = list(serve)
    if admin:
        scopes["admin"] = True
    claims[CLAIM] = scopes
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=HS256)
