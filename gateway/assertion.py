"""Signed identity for upstreams: the ``X-Gateway-Assertion`` token and the JWKS.

On a route with ``assertion = true`` every authenticated request goes
upstream with ``X-Gateway-Assertion``, a JWT (RFC 7519) the gateway signs
with the first key of ``[assertion] keys``.  Its claims: ``iss``
(``[assertion] issuer``, else the gateway's own origin as the client
addressed it), ``sub`` (the user id), ``sid`` (the session id, when a
session authenticated the request), ``provider``, ``scopes`` (when the
principal has scopes: an array), ``aud`` (the route's ``audience``, by
default its prefix), ``iat``, ``exp`` (``iat`` + ``[assertion] lifetime``,
at most 60 seconds) and ``jti`` (random).  An anonymous request carries
none; like every identity header, a client's own is dropped on every route.

Every configured key is published, public parts only, as a JWK Set
(RFC 7517): ``{auth_prefix}/.well-known/jwks.json`` and the admin
listener's ``/.well-known/jwks.json``.  Several keys allow rotation: the
first signs, the others still verify the tokens they signed.

The keys are parsed once, when the gateway is built (:meth:`Signer.from_config`);
signing a request costs one signature and no PEM parsing.  A private key
never appears in a log line, an error message or a repr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from gateway.api import Principal

__all__ = ["ALGORITHMS", "KeySet", "PrivateKey", "Settings", "Signer", "SigningKey", "load_private_key"]

#: the signing algorithms allowed, and the key each needs
ALGORITHMS = {"ES256": "an EC P-256 key", "EdDSA": "an Ed25519 key", "RS256": "an RSA key of at least 2048 bits"}

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class KeySettings(Protocol):
    """One ``[[assertion.keys]]`` table (:class:`gateway.config.AssertionKeyConfig`)."""

    @property
    def kid(self) -> str: ...
    @property
    def algorithm(self) -> str: ...
    @property
    def private_key(self) -> str: ...


class Settings(Protocol):
    """The ``[assertion]`` table (:class:`gateway.config.AssertionConfig`;
    named so, as the configuration imports this module to check keys)."""

    @property
    def issuer(self) -> str: ...
    @property
    def lifetime(self) -> float: ...
    @property
    def keys(self) -> Sequence[KeySettings]: ...


def load_private_key(pem: str, algorithm: str) -> PrivateKey:
    """The private key of PEM text, checked to suit ``algorithm``.  Raises
    :class:`ValueError` with a sentence that never quotes the key."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    text = pem.strip()
    if "\\n" in text and "\n" not in text:  # a PEM put in one line of an environment variable
        text = text.replace("\\n", "\n")
    try:
        key = serialization.load_pem_private_key(text.encode("utf-8"), password=None)
    except TypeError:
        raise ValueError("the private key is encrypted; give it unencrypted (PEM, PKCS#8)") from None
    except (ValueError, UnsupportedAlgorithm, UnicodeError):
        raise ValueError(f"not a PEM private key (expected {ALGORITHMS[algorithm]}, "
                         "as -----BEGIN PRIVATE KEY-----)") from None
    if algorithm == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if algorithm == "RS256" and isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return key
    raise ValueError(f"{algorithm} needs {ALGORITHMS[algorithm]}; this is another kind of key")


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public half of ``key`` as a JWK (no private member)."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    return {name: value for name, value in jwk.items() if name != "key_ops"}  # "use" says it (RFC 7517 §4.3)


@dataclass(frozen=True)
class SigningKey:
    """One configured key, parsed."""

    kid: str
    algorithm: str
    private_key: PrivateKey = field(repr=False)

    def jwk(self) -> dict[str, Any]:
        """Its JWKS entry: the public parts, ``kid``, ``alg`` and ``use``."""
        return {**public_jwk(self.private_key), "kid": self.kid, "alg": self.algorithm, "use": "sig"}


@dataclass(frozen=True)
class KeySet:
    """The JWK Set as served: its bytes and their ETag (the same on every
    listener and every process of one configuration)."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, keys: Sequence[SigningKey]) -> KeySet:
        body = json.dumps({"keys": [k.jwk() for k in keys]}, separators=(",", ":")).encode("utf-8")
        return cls(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    @classmethod
    def from_config(cls, config: Settings) -> KeySet:
        """The key set of a validated ``[assertion]`` table (for a listener
        that signs nothing, such as the supervisor's admin listener)."""
        return Signer.from_config(config).published


class Signer:
    """Signs assertions with the first of its keys; publishes them all."""

    def __init__(self, keys: Sequence[SigningKey], *, issuer: str = "", lifetime: float = 30.0) -> None:
        self.keys = tuple(keys)
        #: the configured ``iss`` (empty: each request's own origin)
        self.issuer = issuer
        #: seconds from ``iat`` to ``exp``
        self.lifetime = max(1, int(lifetime))
        #: the JWK Set of every key
        self.published = KeySet.of(self.keys)
        if self.keys:  # the signing key's JWS header, encoded once
            first = self.keys[0]
            self._header = _b64(json.dumps({"alg": first.algorithm, "kid": first.kid, "typ": "JWT"},
                                           separators=(",", ":")).encode())
            self._algorithm = get_default_algorithms()[first.algorithm]

    @classmethod
    def from_config(cls, config: Settings) -> Signer:
        """The signer of a validated ``[assertion]`` table (each key parsed once)."""
        keys = [SigningKey(k.kid, k.algorithm, load_private_key(k.private_key, k.algorithm)) for k in config.keys]
        return cls(keys, issuer=config.issuer, lifetime=config.lifetime)

    def claims(self, principal: Principal, *, audience: str, origin: str, now: float | None = None) -> dict[str, Any]:
        """The claims of an assertion for ``principal``."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {"iss": self.issuer or origin, "sub": principal.user_id}
        if principal.session_id is not None:
            claims["sid"] = principal.session_id
        claims["provider"] = principal.provider
        if principal.scopes is not None:
            claims["scopes"] = list(principal.scopes)
        claims.update(aud=audience, iat=issued, exp=issued + self.lifetime, jti=secrets.token_urlsafe(16))
        return claims

    def sign(self, principal: Principal, *, audience: str, origin: str) -> str:
        """A fresh assertion for ``principal`` on a route of ``audience``;
        ``origin`` is the issuer when none is configured."""
        if not self.keys:
            raise RuntimeError("no [assertion] key to sign with")  # refused by the configuration check first
        # A JWS compact serialisation (RFC 7515 §7.1), as jwt.encode writes it, minus its per-call
        # header encoding and key checks: the header is fixed and the key was checked at start-up.
        payload = _b64(json.dumps(self.claims(principal, audience=audience, origin=origin),
                                  separators=(",", ":")).encode())
        signing_input = f"{self._header}.{payload}"
        signature = self._algorithm.sign(signing_input.encode("ascii"), self.keys[0].private_key)
        return f"{signing_input}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
