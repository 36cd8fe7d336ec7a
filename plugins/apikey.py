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

import argparse
import hashlib
import hmac
import re
import secrets
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import tornado.httputil

from gateway import hookimpl
from gateway.api import (
    DURATION,
    SCOPE,
    Below,
    Collection,
    Command,
    CommandContext,
    Conflict,
    GatewayError,
    Option,
    Principal,
    Provider,
    Records,
    Section,
    add_config_option,
    invalid_credentials,
    parse_duration,
    utcnow,
)

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
#: where the keys live in the profile store
KEYS = Collection("apikey_keys", key="id", indexes=("user_id",))


@dataclass
class ApiKey:
    """An API key's record: owner, name, scopes, the SHA-256 (hex) of its
    secret and timezone-aware UTC datetimes.  ``expires_at`` ``None``: never
    expires; ``revoked_at``/``last_used_at`` ``None``: not (yet)."""

    id: str
    user_id: str
    name: str
    scopes: list[str]
    secret_hash: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "user_id": self.user_id, "name": self.name, "scopes": list(self.scopes),
                "secret_hash": self.secret_hash, "created_at": self.created_at, "expires_at": self.expires_at,
                "revoked_at": self.revoked_at, "last_used_at": self.last_used_at}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ApiKey":
        return cls(id=record["id"], user_id=record["user_id"], name=record.get("name", ""),
                   scopes=[str(s) for s in record.get("scopes") or []], secret_hash=record.get("secret_hash", ""),
                   created_at=record["created_at"], expires_at=record.get("expires_at"),
                   revoked_at=record.get("revoked_at"), last_used_at=record.get("last_used_at"))


class KeyStore:
    """API key records in the profile store (collection :data:`KEYS`)."""

    def __init__(self, records: Records) -> None:
        self.records = records

    async def create(self, key: ApiKey) -> None:
        await self.records.insert(key.to_record())

    async def get(self, key_id: str) -> ApiKey | None:
        found = await self.records.get(key_id)
        return ApiKey.from_record(found) if found else None

    async def list(self, user_id: str) -> list[ApiKey]:
        """Every key of the user, revoked and expired ones included, oldest first."""
        return [ApiKey.from_record(r) for r in await self.records.find("user_id", user_id)]

    async def revoke(self, key_id: str, when: datetime) -> ApiKey | None:
        """Set ``revoked_at`` unless already set (the first revocation
        stands); the record, ``None`` for an unknown id."""
        updated = await self.records.update(key_id, {"revoked_at": when}, where={"revoked_at": None})
        if updated is not None:
            return ApiKey.from_record(updated)
        return await self.get(key_id)

    async def touch(self, key_id: str, when: datetime, older_than: datetime) -> bool:
        """Set ``last_used_at`` only if unset or before ``older_than`` (one
        conditional write: processes write at most once per interval)."""
        return await self.records.update(key_id, {"last_used_at": when},
                                         where={"last_used_at": Below(older_than)}) is not None


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
    credential_prefixes = (PREFIX,)
    credential_header_names = (HEADER,)
    collections = (KEYS,)
    options = [
        Option("cache_ttl", DURATION, "5s", "a key's record is cached in each process at most this long "
               "(a revocation takes effect everywhere within it; 0 = no cache)"),
        Option("last_used_interval", DURATION, "60s", "a key's last_used_at is written at most once per interval"),
    ]

    def __init__(self, gateway: Any, settings: Section) -> None:
        super().__init__(gateway, settings)
        self.keys = KeyStore(gateway.profiles.records(KEYS))
        #: key id -> (record or None for an unknown id, monotonic time read)
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()
        #: key id -> monotonic time of this process's last last_used_at write (or attempt)
        self._touched: OrderedDict[str, float] = OrderedDict()

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
        record = await self.keys.get(key_id)  # StoreUnavailable: 503
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
            await self.keys.touch(record.id, now, now - timedelta(seconds=interval))
        except GatewayError as exc:
            self.log.warning("could not record the last use of API key %s: %s", record.id, exc.detail or exc.message)
        except Exception as exc:  # the request stands whatever the store says
            self.log.warning("could not record the last use of API key %s: %r", record.id, exc)

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > CACHE_SIZE:
            table.popitem(last=False)


# -- gateway apikey create|list|revoke: the profile store only, no server ---------------


def _expires(value: str) -> float:
    """``--expires``: a positive duration (argparse exits 2 on a bad one)."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must be longer than zero")
    return seconds


def _when(value: datetime | None, never: str = "-") -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else never


async def _find_user(ctx: CommandContext, user: str) -> str | None:
    """The id of the user ``--user`` names: a user id, or an identity as
    ``provider:subject`` (``password:alice``); ``None``, saying on stderr
    which lookups found nothing, when neither matches."""
    if await ctx.profiles.get_user(user) is not None:
        return user
    provider, sep, subject = user.partition(":")
    identity = await ctx.profiles.get_identity(provider, subject) if sep and provider and subject else None
    if identity is not None and await ctx.profiles.get_user(identity.user_id) is not None:
        return identity.user_id
    shown = repr(user) if len(user) <= 200 and user.isprintable() else "given"
    if not sep:
        print(f"error: no user with id {shown} (give a user id, or an identity as provider:subject, "
              "e.g. password:alice)", file=sys.stderr)
    elif identity is None:
        print(f"error: no user with id {shown}, and no {provider!r} identity with subject {subject!r}",
              file=sys.stderr)
    else:
        print(f"error: the {provider!r} identity {subject!r} belongs to user {identity.user_id}, who no longer "
              "exists", file=sys.stderr)
    return None


async def cmd_create(args: argparse.Namespace, ctx: CommandContext) -> int:
    scopes = [s.strip() for s in (args.scopes or "").split(",") if s.strip()]
    try:
        key, record = new_api_key(args.user, args.name, scopes, args.expires)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    user_id = await _find_user(ctx, args.user)
    if user_id is None:
        return 1
    record.user_id = user_id
    try:
        await KeyStore(ctx.profiles.records(KEYS)).create(record)
    except Conflict:  # 64 random bits collided: vanishingly rare, and nothing was stored
        print("error: a key with this id exists; run the command again", file=sys.stderr)
        return 1
    ctx.audit("apikey_created", by="operator", key_id=record.id, user_id=record.user_id, name=record.name,
              scopes=record.scopes, expires_at=_when(record.expires_at, "never"))
    print(f"key:     {key}")
    print("         (shown only this once: store it now; the gateway keeps only its hash)")
    print(f"id:      {record.id}")
    print(f"user:    {record.user_id}")
    print(f"name:    {record.name}")
    print(f"scopes:  {' '.join(record.scopes) or '-'}")
    print(f"expires: {_when(record.expires_at, 'never')}")
    return 0


async def cmd_list(args: argparse.Namespace, ctx: CommandContext) -> int:
    user_id = await _find_user(ctx, args.user)
    if user_id is None:
        return 1
    rows = [("ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "REVOKED", "LAST USED")]
    for k in await KeyStore(ctx.profiles.records(KEYS)).list(user_id):
        rows.append((k.id, k.name, ",".join(k.scopes) or "-", _when(k.created_at),
                     _when(k.expires_at, "never"), _when(k.revoked_at), _when(k.last_used_at)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


async def cmd_revoke(args: argparse.Namespace, ctx: CommandContext) -> int:
    key_id = args.id
    if key_id.startswith(PREFIX):  # a whole key pasted: use its id, never echo it
        parsed = parse_key(key_id)
        if parsed is None:
            print("error: that is not a well-formed API key or key id", file=sys.stderr)
            return 2
        key_id = parsed[0]
    record = await KeyStore(ctx.profiles.records(KEYS)).revoke(key_id, utcnow())
    if record is None:
        shown = repr(key_id) if len(key_id) <= 64 and key_id.isprintable() else "given"
        print(f"error: no API key with id {shown}", file=sys.stderr)
        return 1
    ctx.audit("apikey_revoked", by="operator", key_id=record.id, user_id=record.user_id, name=record.name)
    print(f"revoked: {record.id} ({record.name}) at {_when(record.revoked_at)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    keys = parser.add_subparsers(dest="apikey_command", required=True)
    create = keys.add_parser("create", help="make a key for a user and print it (once)")
    add_config_option(create)
    create.add_argument("--user", required=True, help="the owner: a user id (u_...) or an identity as "
                        "provider:subject (password:alice)")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--scopes", default="", help="comma-separated scopes, e.g. orders:read,orders:write")
    create.add_argument("--expires", type=_expires, help="lifetime, e.g. 90d (default: never expires)")
    create.set_defaults(apikey_run=cmd_create)
    listing = keys.add_parser("list", help="list a user's keys (never their secrets)")
    add_config_option(listing)
    listing.add_argument("--user", required=True, help="the owner: a user id (u_...) or provider:subject")
    listing.set_defaults(apikey_run=cmd_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id (takes effect within providers.apikey.cache_ttl)")
    add_config_option(revoke)
    revoke.add_argument("id", help="the key id (the 16 hex digits after gwk_)")
    revoke.set_defaults(apikey_run=cmd_revoke)


async def run(args: argparse.Namespace, ctx: CommandContext) -> int:
    status: int = await args.apikey_run(args, ctx)
    return status


@hookimpl
def gateway_providers() -> list[type[Provider]]:
    return [ApiKeyProvider]


@hookimpl
def gateway_commands() -> list[Command]:
    return [Command("apikey", "create, list and revoke API keys (uses the profile store only)", configure, run)]
