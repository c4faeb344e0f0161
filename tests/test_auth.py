"""Token verification and claims, without a server: nexus.auth is pure (time is an argument)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nexus.auth import (
    Credentials,
    JwtAuthenticator,
    JwtSettings,
    allow_all,
    bearer_token,
    load_public_keys,
    mint_token,
)
from nexus.config import ConfigError, Settings, is_loopback, load_settings
from nexus.errors import ConfigurationError, Unauthenticated

SECRET = "s" * 32
NOW = 1_800_000_000.0


def hs256(secret: str = SECRET, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": "alice", "exp": NOW + 60}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm="HS256")


def check(token: str | None, settings: JwtSettings | None = None, now: float = NOW) -> Any:
    authenticator = JwtAuthenticator(settings or JwtSettings(secret=SECRET))
    return authenticator.authenticate(Credentials(token, connection_id="c1"), now=now)


def refused(token: str | None, settings: JwtSettings | None = None, now: float = NOW) -> str:
    with pytest.raises(Unauthenticated) as caught:
        check(token, settings, now)
    return caught.value.message


def test_a_valid_token_gives_the_user_and_the_scopes_of_its_claims() -> None:
    """`sub` is the user id; the `nexus` claim's publish / subscribe / admin become the principal's scopes."""
    token = hs256(nexus={"publish": ["demo:>"], "subscribe": ["demo:*:v1:*"], "admin": False})
    principal = check(token)
    assert (principal.user_id, principal.authenticated, principal.connection_id) == ("alice", True, "c1")
    assert principal.publish == ("demo:>",)
    assert principal.subscribe == ("demo:*:v1:*",)
    assert principal.may_publish("demo:thing:v1:happened")
    assert not principal.may_publish("other:thing:v1:happened")
    assert not principal.may_subscribe(">")
    assert check(hs256(nexus={"admin": True})).admin


def test_without_a_nexus_claim_a_user_may_publish_and_subscribe_to_nothing() -> None:
    """Deny by default: no patterns at all (requests to handled types are the node's exception)."""
    principal = check(hs256())
    assert principal.publish == ()
    assert principal.subscribe == ()
    assert not principal.may_publish("demo:thing:v1:happened")
    assert not principal.may_subscribe("demo:>")
    assert not principal.admin


def test_missing_expired_premature_and_unexpiring_tokens_are_refused() -> None:
    """No token, a past `exp` (beyond the leeway), a future `nbf` and a token without `exp` are refused."""
    assert "requires a token" in refused(None)
    assert "expired" in refused(hs256(exp=NOW - 11))
    assert check(hs256(exp=NOW - 5)).user_id == "alice"  # inside the 10 s leeway
    assert "expired" in refused(hs256(exp=NOW - 5), JwtSettings(secret=SECRET, leeway_s=0))
    assert "not valid yet" in refused(hs256(nbf=NOW + 60))
    assert check(hs256(nbf=NOW + 5)).user_id == "alice"
    assert "'exp'" in refused(hs256(exp=None))
    assert "'sub'" in refused(hs256(sub=None))


def test_a_token_signed_with_another_secret_or_tampered_with_is_refused() -> None:
    """The signature is checked: another secret, a changed payload, garbage."""
    assert "signature" in refused(hs256(secret="t" * 32))
    header, _payload, signature = hs256().split(".")
    forged = jwt.utils.base64url_encode(json.dumps({"sub": "bob", "exp": NOW + 60}).encode()).decode()
    assert "signature" in refused(f"{header}.{forged}.{signature}")
    assert "well-formed" in refused("not-a-token")


def test_audience_and_issuer_are_checked_when_configured() -> None:
    """With an audience, a token for another (or none) is refused; without one, a token naming one is refused."""
    settings = JwtSettings(secret=SECRET, audience="nexus", issuer="https://id.example.com")
    good = hs256(aud="nexus", iss="https://id.example.com")
    assert check(good, settings).user_id == "alice"
    assert "audience" in refused(hs256(aud="other", iss="https://id.example.com"), settings)
    assert "aud" in refused(hs256(iss="https://id.example.com"), settings)
    assert "issuer" in refused(hs256(aud="nexus", iss="https://evil.example.com"), settings)
    assert "audience" in refused(hs256(aud="nexus"))  # this server names no audience


def hs256_signed_with(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token made by hand (PyJWT refuses to sign with a PEM key as an HMAC secret)."""
    encode = jwt.utils.base64url_encode
    signing = b".".join(encode(json.dumps(part).encode()) for part in ({"alg": "HS256", "typ": "JWT"}, claims))
    return (signing + b"." + encode(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


def test_only_the_configured_algorithms_are_accepted(tmp_path: Path) -> None:
    """`alg: none` is refused, and so is HS256 signed with the public key as secret (the classic confusion), with
    a public key alone or beside a secret."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "rs.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    rs = JwtSettings(public_keys=load_public_keys(str(pem)))
    both = JwtSettings(secret=SECRET, public_keys=rs.public_keys)
    claims = {"sub": "mallory", "exp": NOW + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    for settings in (JwtSettings(secret=SECRET), rs, both):
        assert "not accepted" in refused(unsigned, settings)
    confused = hs256_signed_with(pem.read_bytes(), claims)
    assert "not accepted" in refused(confused, rs)
    assert "signature" in refused(confused, both)
    rs_token = jwt.encode({"sub": "alice", "exp": NOW + 60}, key, algorithm="RS256")
    assert check(rs_token, rs).user_id == "alice"
    assert check(rs_token, both).user_id == "alice"
    assert "not accepted" in refused(rs_token)  # a secret-only server takes HS256 only


def test_es256_pem_and_jwks_keys_are_picked_by_kid(tmp_path: Path) -> None:
    """A JWKS file holds several keys: the token's `kid` picks one; an unknown kid, or another key's signature,
    is refused."""
    one = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    two = ec.generate_private_key(ec.SECP256R1())
    stranger = ec.generate_private_key(ec.SECP256R1())
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(one.public_key())), "kid": "one", "use": "sig"},
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(two.public_key())), "kid": "two", "alg": "ES256"},
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    settings = JwtSettings(public_keys=load_public_keys(str(path)))
    assert settings.algorithms == ("ES256", "RS256")
    claims = {"sub": "alice", "exp": NOW + 60}
    assert check(jwt.encode(claims, one, "RS256", headers={"kid": "one"}), settings).user_id == "alice"
    assert check(jwt.encode(claims, two, "ES256", headers={"kid": "two"}), settings).user_id == "alice"
    assert "kid" in refused(jwt.encode(claims, two, "ES256", headers={"kid": "three"}), settings)
    assert "signature" in refused(jwt.encode(claims, stranger, "ES256", headers={"kid": "two"}), settings)
    pem = tmp_path / "es.pem"
    pem.write_bytes(
        two.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    es = JwtSettings(public_keys=load_public_keys(str(pem)))
    assert check(jwt.encode(claims, two, "ES256"), es).user_id == "alice"


def test_unusable_key_files_and_short_secrets_stop_the_server_at_start(tmp_path: Path) -> None:
    """A missing file, a file that is no key, a short RSA key and a short secret are configuration errors."""
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_public_keys(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigurationError, match="neither a PEM public key nor a JWKS"):
        load_public_keys(str(junk))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    junk.write_bytes(small.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigurationError, match="too short"):
        load_public_keys(str(junk))
    with pytest.raises(ConfigError, match="32 bytes or more") as caught:
        load_settings(None, {"NEXUS_JWT_SECRET": "short-secret"}, {})
    assert "short-secret" not in str(caught.value)  # a secret is never shown
    assert "short-secret" not in repr(load_settings(None, {"NEXUS_JWT_SECRET": SECRET}, {}))


def test_bad_scopes_in_a_valid_token_are_refused() -> None:
    """A `nexus` claim that is not an object, patterns that are not a list or do not parse, a non-boolean admin."""
    assert "object" in refused(hs256(nexus=["demo:>"]))
    assert "list of patterns" in refused(hs256(nexus={"publish": "demo:>"}))
    assert "bad pattern" in refused(hs256(nexus={"subscribe": ["demo:>:x"]}))
    assert "true or false" in refused(hs256(nexus={"admin": "yes"}))


def test_minted_tokens_verify_and_carry_their_scopes() -> None:
    """`mint_token` (what `nexus token` prints) verifies with the same secret, for its ttl."""
    token = mint_token(SECRET, "bob", publish=["demo:>"], subscribe=["demo:>"], admin=True, ttl_s=60, now=NOW)
    principal = check(token)
    assert (principal.user_id, principal.publish, principal.subscribe, principal.admin) == (
        "bob",
        ("demo:>",),
        ("demo:>",),
        True,
    )
    assert "expired" in refused(token, now=NOW + 75)


async def test_with_authentication_off_everyone_is_anonymous() -> None:
    """allow_all ignores any token; the settings pick it when no secret or key is configured."""
    principal = await allow_all(Credentials("whatever", connection_id="c9"))
    assert (principal.connection_id, principal.user_id, principal.authenticated) == ("c9", None, False)
    assert principal.publish is None
    assert principal.subscribe is None
    assert Settings().authenticator() is allow_all
    assert isinstance(Settings(jwt_secret=SECRET).authenticator(), JwtAuthenticator)


def test_bearer_values() -> None:
    """`Bearer <token>` gives the token; nothing or another scheme (a proxy's Basic credentials) gives none."""
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token(None) is None
    assert bearer_token("Basic dXNlcjpwdw==") is None
    assert bearer_token("Bearer ") is None


def test_protected_mode_refuses_an_anonymous_server_beyond_loopback() -> None:
    """Loopback binds need nothing; any other address needs a secret, a key, or allow_anonymous."""
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        Settings(host=host).check_exposure()
    for host in ("0.0.0.0", "::", "192.168.1.10", "nexus.example.com"):
        assert not is_loopback(host), host
        with pytest.raises(ConfigurationError, match="--allow-anonymous"):
            Settings(host=host).check_exposure()
        Settings(host=host, allow_anonymous=True).check_exposure()
        Settings(host=host, jwt_secret=SECRET).check_exposure()
