"""A :class:`~gateway.profiles.base.ProfileStore` in MongoDB (``pymongo`` async API).

Two collections:

``users``
    ``{_id: <user id>, profile: {...}, created_at, updated_at}``
``identities``
    ``{_id: "<provider>:<subject>", provider, subject, user_id, data: {...},
    created_at}``, indexed on ``user_id``.
``api_keys``
    ``{_id: <key id>, user_id, name, scopes: [...], secret_hash, created_at,
    expires_at, revoked_at, last_used_at}`` (missing or ``null`` times are
    unset), indexed on ``user_id``.

Uniqueness of an identity rests on its natural key being the ``_id``, so a
first login is one atomic upsert of the link (``$setOnInsert`` with a freshly
generated user id): whichever concurrent caller's insert wins, every caller
reads back the same ``user_id``.  The user document is then upserted with
``$setOnInsert`` too, by every caller, so a caller that sees the link before
the winner has written the user document still gets (and if need be creates)
that user.

The client is built in :meth:`MongoProfileStore.open` with ``tz_aware=True``
and every timeout (server selection, connect, operation via ``timeoutMS``) set
to ``timeout`` seconds, so an outage surfaces within about a second as
:class:`~gateway.errors.StoreUnavailable`.  Log messages are scrubbed of the
connection URL and its credentials.

Profile and data field names are used as dotted update paths, so they must be
non-empty and contain neither ``.`` nor a leading ``$`` (``ValueError``
otherwise).  BSON datetimes have millisecond precision.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from gateway.errors import Conflict, StoreUnavailable
from gateway.profiles.base import (
    ApiKey,
    Identity,
    ProfileStore,
    User,
    identity_key,
    new_user_id,
    utcnow,
)

__all__ = ["MongoProfileStore"]

log = logging.getLogger(__name__)

_WHAT = "profile store"
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^@/?#]*)@")


def _url_secrets(url: str) -> list[str]:
    """Substrings of ``url`` that must never reach a log line, longest first."""
    secrets = {url}
    match = _USERINFO.match(url)
    if match:
        userinfo = match.group(1)
        secrets.add(userinfo)
        if ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            secrets.update({password, unquote(password)})
    if "?" in url:  # options may carry secrets (e.g. a TLS key password)
        secrets.add(url.split("?", 1)[1])
    return sorted((s for s in secrets if s), key=len, reverse=True)


def _utc(value: Any) -> datetime:
    """A BSON datetime (tz-aware with ``tz_aware=True``) as a UTC datetime."""
    if not isinstance(value, datetime):
        return utcnow()
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _check_field(name: Any) -> str:
    if not isinstance(name, str) or not name or "." in name or name.startswith("$") or "\0" in name:
        raise ValueError(f"invalid field name {name!r}: must be non-empty, without '.' or a leading '$'")
    return name


def _merge_update(prefix: str, fields: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``$set`` / ``$unset`` merging ``fields`` into sub-document ``prefix``
    (a ``None`` value removes the field)."""
    update: dict[str, dict[str, Any]] = {}
    for key, value in fields.items():
        path = f"{prefix}.{_check_field(key)}"
        if value is None:
            update.setdefault("$unset", {})[path] = ""
        else:
            update.setdefault("$set", {})[path] = value
    return update


def _user(doc: dict[str, Any]) -> User:
    return User(
        id=doc["_id"],
        profile=dict(doc.get("profile") or {}),
        created_at=_utc(doc.get("created_at")),
        updated_at=_utc(doc.get("updated_at")),
    )


def _identity(doc: dict[str, Any]) -> Identity:
    return Identity(
        provider=doc["provider"],
        subject=doc["subject"],
        user_id=doc["user_id"],
        data=dict(doc.get("data") or {}),
        created_at=_utc(doc.get("created_at")),
    )


def _opt_utc(value: Any) -> datetime | None:
    return None if value is None else _utc(value)


def _api_key(doc: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=doc["_id"],
        user_id=doc["user_id"],
        name=doc.get("name", ""),
        scopes=[str(s) for s in doc.get("scopes") or []],
        secret_hash=doc.get("secret_hash", ""),
        created_at=_utc(doc.get("created_at")),
        expires_at=_opt_utc(doc.get("expires_at")),
        revoked_at=_opt_utc(doc.get("revoked_at")),
        last_used_at=_opt_utc(doc.get("last_used_at")),
    )


class MongoProfileStore(ProfileStore):
    """Users and identity links in a MongoDB database.  See the module docstring."""

    name = "mongodb"

    def __init__(self, url: str, database: str, timeout: float = 1.0) -> None:
        self._url = url
        self.database = database
        self.timeout = timeout
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._indexes_ready = False

    def __repr__(self) -> str:  # never show the URL: it may hold credentials
        return f"<{type(self).__name__} database={self.database!r} open={self._client is not None}>"

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Build the client and create indexes idempotently.

        Raises :class:`StoreUnavailable` if the server cannot be reached; the
        client is kept, so later calls work (and finish creating the indexes)
        once the server is back.  :meth:`close` is safe after a failed open.
        """
        if self._client is None:
            ms = max(1, int(self.timeout * 1000))
            with self._errors():
                self._client = AsyncMongoClient(
                    self._url,
                    tz_aware=True,
                    timeoutMS=ms,
                    serverSelectionTimeoutMS=ms,
                    connectTimeoutMS=ms,
                    appname="session-gateway",
                )
        await self._ensure_indexes()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._indexes_ready = False
        if client is not None:
            with contextlib.suppress(PyMongoError):
                await client.close()

    async def _ensure_indexes(self) -> None:
        if self._indexes_ready:
            return
        with self._errors():
            await self._identities.create_index([("user_id", ASCENDING)], name="user_id")
            await self._api_keys.create_index([("user_id", ASCENDING)], name="user_id")
        self._indexes_ready = True

    # -- plumbing ----------------------------------------------------------

    @property
    def _users(self) -> AsyncCollection[dict[str, Any]]:
        return self._db_client()[self.database]["users"]

    @property
    def _identities(self) -> AsyncCollection[dict[str, Any]]:
        return self._db_client()[self.database]["identities"]

    @property
    def _api_keys(self) -> AsyncCollection[dict[str, Any]]:
        return self._db_client()[self.database]["api_keys"]

    def _db_client(self) -> AsyncMongoClient[dict[str, Any]]:
        if self._client is None:
            raise StoreUnavailable(_WHAT, log_message="mongodb profile store is not open")
        return self._client

    def _scrub(self, text: str) -> str:
        for secret in _url_secrets(self._url):
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn driver errors into StoreUnavailable (DuplicateKeyError into Conflict)."""
        try:
            yield
        except DuplicateKeyError:
            raise Conflict("that record already exists") from None
        except PyMongoError as exc:
            # ConnectionFailure, ServerSelectionTimeoutError, NetworkTimeout,
            # ExecutionTimeout, ConfigurationError, OperationFailure, ...
            message = self._scrub(f"mongodb: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(_WHAT, log_message=message) from None

    async def _ready(self) -> None:
        self._db_client()
        await self._ensure_indexes()

    # -- the contract ----------------------------------------------------------

    async def get_user(self, user_id: str) -> User | None:
        await self._ready()
        with self._errors():
            doc = await self._users.find_one({"_id": user_id})
        return None if doc is None else _user(doc)

    async def update_profile(self, user_id: str, fields: dict[str, Any]) -> User:
        update = _merge_update("profile", fields)
        await self._ready()
        update.setdefault("$set", {})["updated_at"] = utcnow()
        with self._errors():
            doc = await self._users.find_one_and_update(
                {"_id": user_id}, update, return_document=ReturnDocument.AFTER
            )
        if doc is None:
            raise KeyError(user_id)
        return _user(doc)

    async def get_identity(self, provider: str, subject: str) -> Identity | None:
        await self._ready()
        with self._errors():
            doc = await self._identities.find_one({"_id": identity_key(provider, subject)})
        return None if doc is None else _identity(doc)

    async def _upsert_user(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        """The user document, created with ``profile`` if it does not exist yet."""
        now = utcnow()
        for attempt in range(2):
            try:
                with self._errors_except_duplicate():
                    doc = await self._users.find_one_and_update(
                        {"_id": user_id},
                        {"$setOnInsert": {"profile": profile, "created_at": now, "updated_at": now}},
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                if doc is not None:
                    return doc
            except DuplicateKeyError:  # a concurrent upsert won: read it back
                if attempt:
                    raise StoreUnavailable(_WHAT, log_message="mongodb: user upsert kept conflicting") from None
        raise StoreUnavailable(_WHAT, log_message="mongodb: user upsert returned nothing")

    @contextlib.contextmanager
    def _errors_except_duplicate(self) -> Iterator[None]:
        """Like :meth:`_errors` but lets DuplicateKeyError through for retrying."""
        try:
            yield
        except DuplicateKeyError:
            raise
        except PyMongoError as exc:
            message = self._scrub(f"mongodb: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(_WHAT, log_message=message) from None

    async def resolve_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity, bool]:
        await self._ready()
        key = identity_key(provider, subject)
        candidate = new_user_id()
        link: dict[str, Any] | None = None
        for attempt in range(2):
            try:
                with self._errors_except_duplicate():
                    link = await self._identities.find_one_and_update(
                        {"_id": key},
                        {
                            "$setOnInsert": {
                                "provider": provider,
                                "subject": subject,
                                "user_id": candidate,
                                "data": dict(data or {}),
                                "created_at": utcnow(),
                            }
                        },
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                break
            except DuplicateKeyError:  # concurrent upserts of one _id: retry finds it
                if attempt:
                    raise StoreUnavailable(_WHAT, log_message="mongodb: identity upsert kept conflicting") from None
        if link is None:
            raise StoreUnavailable(_WHAT, log_message="mongodb: identity upsert returned nothing")
        created = link["user_id"] == candidate
        # Every caller upserts the user: idempotent, and it covers a caller that
        # saw the link before the winning caller wrote the user document.
        user = await self._upsert_user(link["user_id"], dict(profile or {}))
        return _user(user), _identity(link), created

    async def create_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity]:
        await self._ready()
        key = identity_key(provider, subject)
        with self._errors():
            if await self._identities.find_one({"_id": key}, projection={"_id": 1}) is not None:
                raise Conflict("that identity is already registered")
        now = utcnow()
        user_id = new_user_id()
        user_doc: dict[str, Any] = {"_id": user_id, "profile": dict(profile or {}), "created_at": now, "updated_at": now}
        link_doc = {
            "_id": key,
            "provider": provider,
            "subject": subject,
            "user_id": user_doc["_id"],
            "data": dict(data or {}),
            "created_at": now,
        }
        with self._errors():
            await self._users.insert_one(user_doc)
        try:
            with self._errors_except_duplicate():
                await self._identities.insert_one(link_doc)
        except DuplicateKeyError:
            await self._discard_user(user_id)
            raise Conflict("that identity is already registered") from None
        except StoreUnavailable:
            # The link may or may not have been written; only drop the user
            # if it definitely has no link.
            with contextlib.suppress(PyMongoError, StoreUnavailable):
                if await self._identities.find_one({"_id": key, "user_id": user_id}) is None:
                    await self._discard_user(user_id)
            raise
        return _user(user_doc), _identity(link_doc)

    async def _discard_user(self, user_id: str) -> None:
        """Best-effort removal of a user created by a failed create_identity."""
        try:
            await self._users.delete_one({"_id": user_id})
        except PyMongoError as exc:
            log.warning("could not remove orphan user %s: %s", user_id, self._scrub(str(exc)))

    async def link_identity(
        self, user_id: str, provider: str, subject: str, data: dict[str, Any] | None = None
    ) -> Identity:
        await self._ready()
        key = identity_key(provider, subject)
        with self._errors():
            existing = await self._identities.find_one({"_id": key})
            if existing is None:
                if await self._users.find_one({"_id": user_id}, projection={"_id": 1}) is None:
                    raise KeyError(user_id)
                doc = {
                    "_id": key,
                    "provider": provider,
                    "subject": subject,
                    "user_id": user_id,
                    "data": dict(data or {}),
                    "created_at": utcnow(),
                }
                try:
                    await self._identities.insert_one(doc)
                    return _identity(doc)
                except DuplicateKeyError:  # linked concurrently: judge the winner
                    existing = await self._identities.find_one({"_id": key})
        if existing is None:
            raise StoreUnavailable(_WHAT, log_message="mongodb: identity vanished while linking")
        if existing["user_id"] != user_id:
            raise Conflict("that identity is linked to another user")
        return _identity(existing)

    async def update_identity_data(
        self, provider: str, subject: str, data: dict[str, Any]
    ) -> None:
        key = identity_key(provider, subject)
        update = _merge_update("data", data)
        await self._ready()
        with self._errors():
            if update:
                result = await self._identities.update_one({"_id": key}, update)
                found = result.matched_count > 0
            else:
                found = await self._identities.find_one({"_id": key}, projection={"_id": 1}) is not None
        if not found:
            raise KeyError(key)

    async def list_identities(self, user_id: str) -> list[Identity]:
        await self._ready()
        with self._errors():
            cursor = self._identities.find({"user_id": user_id}).sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            docs = await cursor.to_list(None)
        return [_identity(doc) for doc in docs]

    # -- API keys ----------------------------------------------------------------

    async def create_api_key(self, key: ApiKey) -> None:
        await self._ready()
        doc = {
            "_id": key.id,
            "user_id": key.user_id,
            "name": key.name,
            "scopes": list(key.scopes),
            "secret_hash": key.secret_hash,
            "created_at": key.created_at,
            "expires_at": key.expires_at,
            "revoked_at": key.revoked_at,
            "last_used_at": key.last_used_at,
        }
        with self._errors():
            if await self._api_keys.find_one({"_id": key.id}, projection={"_id": 1}) is not None:
                raise Conflict("that API key id already exists")
            if await self._users.find_one({"_id": key.user_id}, projection={"_id": 1}) is None:
                raise KeyError(key.user_id)
            await self._api_keys.insert_one(doc)  # a concurrent duplicate: Conflict

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        await self._ready()
        with self._errors():
            doc = await self._api_keys.find_one({"_id": key_id})
        return None if doc is None else _api_key(doc)

    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        await self._ready()
        with self._errors():
            cursor = self._api_keys.find({"user_id": user_id}).sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            docs = await cursor.to_list(None)
        return [_api_key(doc) for doc in docs]

    async def revoke_api_key(self, key_id: str, when: datetime) -> ApiKey | None:
        await self._ready()
        with self._errors():
            doc = await self._api_keys.find_one_and_update(
                {"_id": key_id, "revoked_at": None},  # null or missing: not revoked yet
                {"$set": {"revoked_at": when}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:  # unknown, or revoked before: the first revocation stands
                doc = await self._api_keys.find_one({"_id": key_id})
        return None if doc is None else _api_key(doc)

    async def touch_api_key(self, key_id: str, when: datetime, older_than: datetime) -> bool:
        await self._ready()
        with self._errors():
            result = await self._api_keys.update_one(
                {"_id": key_id, "$or": [{"last_used_at": None}, {"last_used_at": {"$lt": older_than}}]},
                {"$set": {"last_used_at": when}},
            )
        return result.modified_count > 0
