"""API keys: long-lived credentials for scripts and services.

A key looks like ``gwk_<id>_<secret>``: ``id`` is 16 hex digits (public; it
names the key in listings and in ``gateway apikey revoke``), ``secret`` is
256 bits from :mod:`secrets` (URL-safe base64, which may itself contain
``_``).  The profile store keeps only the SHA-256 of the secret, with the
owner, a name, scopes and the creation, expiry, revocation and last-use
times.  Keys are made, listed and revoked with ``gateway apikey ...``.

A request presents a key as ``X-API-Key: gwk_...`` or
``Authorization: Bearer gwk_...``.  A malformed, unknown, wrong, revoked or
expired key is refused with 401 ``invalid_credentials``; a valid one makes
the request the owner's, with the key's scopes (checked by the proxy against
a route's ``scopes``).  The headers that carried a key never reach an
upstream.  A key's record is cached in each process for at most
``cache_ttl`` (so a revocation takes effect everywhere within it), and its
``last_used_at`` is written at most once per ``last_used_interval``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import tornado.httputil

from gateway import hookimpl
from gateway.config import DURATION, SCOPE, Option
from gateway.errors import GatewayError, invalid_credentials
from gateway.profiles.base import ApiKey, utcnow
from gateway.providers import Provider
from gateway.requestinfo import Principal

log = logging.getLogger("gateway.apikey")

PREFIX = "gwk_"
HEADER = "X-API-Key"
MAX_NAME = 200
MAX_SCOPES = 100
#: records (and last-use notes) kept per process; the oldest go first
CACHE_SIZE = 10_000
_ID = re.compile(r"^[0-9a-f]{16}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
#: compared against when the id is unknown, so that costs what a wrong secret does
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


# -- the key format -----------------------------------------------------------------


def hash_secret(secret: str) -> str:
    """SHA-256 (hex) of a key's secret: what the store keeps."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_key(raw: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed key, else ``None``."""
    if not raw.startswith(PREFIX):
        return None
    key_id, sep, secret = raw[len(PREFIX):].partition("_")
    if not sep or not _ID.match(key_id) or not _SECRET.match(secret):
        return None
    return key_id, secret


def check_scopes(scopes: list[str]) -> list[str]:
    """``scopes`` without duplicates, in order; ``ValueError`` naming a bad one."""
    if len(scopes) > MAX_SCOPES:
        raise ValueError(f"at most {MAX_SCOPES} scopes")
    for scope in scopes:
        if not SCOPE.match(scope):  # as in [[routes]] scopes (they travel space-separated)
            raise ValueError(f"scope {scope!r} must be 1 to 128 printable ASCII characters "
                             "without spaces, quotes or backslashes")
    return list(dict.fromkeys(scopes))


def check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise ValueError("the name must not be empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"the name must be at most {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("the name must not contain control characters")
    return name


def new_api_key(user_id: str, name: str, scopes: list[str],
                expires_in: float | None = None) -> tuple[str, ApiKey]:
    """A fresh key and its record: ``(the key, shown once; the record to store)``.
    ``ValueError`` for a bad name or scope."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    now = utcnow()
    record = ApiKey(
        id=key_id, user_id=user_id, name=check_name(name), scopes=check_scopes(scopes),
        secret_hash=hash_secret(secret), created_at=now,
        expires_at=None if expires_in is None else now + timedelta(seconds=expires_in),
    )
    return f"{PREFIX}{key_id}_{secret}", record


# -- finding the key in a request ----------------------------------------------------


def _bearer_keys(request: tornado.httputil.HTTPServerRequest) -> list[str]:
    """API keys sent as ``Authorization: Bearer gwk_...``."""
    found = []
    for value in request.headers.get_list("Authorization"):
        parts = value.split(None, 1)  # "Bearer", any whitespace, the key
        if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip().startswith(PREFIX):
            found.append(parts[1].strip())
    return found


class ApiKeyProvider(Provider):
    """Authenticates requests carrying an API key (no login endpoint)."""

    name = "apikey"
    login_route = False
    options = [
        Option("cache_ttl", DURATION, "5s", "a key's record is cached in each process at most this long "
               "(a revocation takes effect everywhere within it; 0 = no cache)"),
        Option("last_used_interval", DURATION, "60s", "a key's last_used_at is written at most once per interval"),
    ]

    def __init__(self, gateway: Any, settings: Any) -> None:
        super().__init__(gateway, settings)
        #: key id -> (record or None for an unknown id, monotonic time read)
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()
        #: key id -> monotonic time of this process's last last_used_at write (or attempt)
        self._touched: OrderedDict[str, float] = OrderedDict()

    def credential_headers(self, request: tornado.httputil.HTTPServerRequest) -> list[str]:
        """The request headers carrying an API key, stripped from every proxied
        request: ``X-API-Key`` in any spelling an upstream may fold into it
        (``X_API_Key``...), and ``Authorization`` when it is ``Bearer gwk_...``."""
        names = list(dict.fromkeys(
            name for name, _ in request.headers.get_all() if name.lower().replace("_", "-") == "x-api-key"))
        if _bearer_keys(request):
            names.append("Authorization")
        return names

    async def authenticate(self, request: tornado.httputil.HTTPServerRequest) -> Principal | None:
        """The key's owner, ``None`` when no key is presented, or 401."""
        presented = request.headers.get_list(HEADER) + _bearer_keys(request)
        if not presented:
            return None
        if len(set(presented)) > 1:
            raise invalid_credentials("send one API key, in X-API-Key or Authorization, not several")
        parsed = parse_key(presented[0].strip())
        if parsed is None:
            raise invalid_credentials("the API key is malformed (expected gwk_<id>_<secret>)")
        key_id, secret = parsed
        record = await self._record(key_id)
        matches = hmac.compare_digest(hash_secret(secret), record.secret_hash if record else _DUMMY_HASH)
        if record is None or not matches:
            raise invalid_credentials("the API key is not valid")
        now = utcnow()
        if record.revoked_at is not None:
            raise invalid_credentials("the API key has been revoked")
        if record.expired(now):
            raise invalid_credentials("the API key has expired")
        await self._note_use(record, now)
        return Principal(user_id=record.user_id, provider=self.name, scopes=list(record.scopes),
                         headers_to_strip=tuple(self.credential_headers(request)))

    async def _record(self, key_id: str) -> ApiKey | None:
        """The key's record, from this process's cache when read within ``cache_ttl``."""
        ttl = self.settings.cache_ttl
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[1] < ttl:
            return cached[0]
        record = await self.gateway.profiles.get_api_key(key_id)  # StoreUnavailable: 503
        if ttl > 0 and record is not None:  # an unknown id is not remembered: it may be created any moment
            self._remember(self._cache, key_id, (record, now))
        return record

    async def _note_use(self, record: ApiKey, now: datetime) -> None:
        """Write ``last_used_at`` at most once per interval; a failure is only logged."""
        interval = self.settings.last_used_interval
        mono = time.monotonic()
        last = self._touched.get(record.id)
        if last is not None and mono - last < interval:
            return
        if record.last_used_at is not None and now - record.last_used_at < timedelta(seconds=interval):
            if last is None:
                self._remember(self._touched, record.id, mono - (now - record.last_used_at).total_seconds())
            return
        self._remember(self._touched, record.id, mono)
        try:
            await self.gateway.profiles.touch_api_key(record.id, now, now - timedelta(seconds=interval))
        except GatewayError as exc:
            log.warning("could not record the last use of API key %s: %s", record.id, exc.detail or exc.message)
        except Exception as exc:  # the request stands whatever the store says
            log.warning("could not record the last use of API key %s: %r", record.id, exc)

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > CACHE_SIZE:
            table.popitem(last=False)


@hookimpl
def gateway_providers() -> list[type[Provider]]:
    return [ApiKeyProvider]


@hookimpl
async def gateway_authenticate(request: tornado.httputil.HTTPServerRequest, gateway: Any) -> Principal | None:
    provider = gateway.providers.get(ApiKeyProvider.name)
    if not isinstance(provider, ApiKeyProvider) or not getattr(provider, "enabled", True):
        return None
    return await provider.authenticate(request)
