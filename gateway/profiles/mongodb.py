"""A :class:`~gateway.profiles.base.ProfileStore` in MongoDB (``pymongo`` async API).

The store's own collections:

``users``
    ``{_id: <user id>, profile: {...}, created_at, updated_at}``
``identities``
    ``{_id: "<provider>:<subject>", provider, subject, user_id, data: {...},
    created_at}``, indexed on ``user_id``.
``record_sequences``
    ``{_id: <collection name>, n}``: the last insertion number given out in
    each plugin collection.

A plugin's :class:`~gateway.api.Collection` ``<name>`` is the collection
``plugin_<name>``, whose documents are the records with the key field as
``_id``, plus ``_seq`` (the insertion number: :meth:`find` sorts on it) and
``_unique`` (``{field: value}`` for each ``unique`` field holding a value).
Its indexes, made on first use (``create_index`` is idempotent):
``unique_<field>`` on ``_unique.<field>``, unique and partial (only where
the value exists, so records without one never clash), and ``index_<field>``
on ``(<field>, _seq)`` for each unique or ``indexes`` field.  A field
declared later has its ``_unique`` values filled in before its unique index
is made; a field no longer declared loses its indexes and values.  A
conditional update is one ``find_one_and_update`` whose filter holds the
``where``; ``Below(v)`` is ``{"$or": [{f: null}, {f: {"$lt": v}}]}`` (null
also matches a missing field; ``$lt`` compares within one BSON type, dates
as instants).  Datetimes are BSON dates, read back as UTC datetimes.  A
duplicate key is a :class:`~gateway.errors.Conflict` naming the field,
never its value.

One-off upgrades of databases made by older versions run at open
(:mod:`gateway.profiles.legacy`).

Uniqueness of an identity rests on its natural key being the ``_id`` (MongoDB's
own unique index), so no retried or concurrent write can make a second link
for one ``(provider, subject)``.  A user document is always written before
the link that names it, so a link never names a missing user, whatever
fails in between: a first login inserts a fresh user, then upserts the link
with ``$setOnInsert`` of that user's id; whichever concurrent caller's link
wins, every caller reads back the same ``user_id``, and a loser deletes its
own unlinked user.  When the link's write fails with an unknown outcome (a
primary step-down, a timeout) the fresh user is left alone: it may be the
one the link names.  Such a left-over user is linked to nothing, so no
login ever reaches it.  A link without its user (made by older versions,
which wrote the link first) gets its user back at its next
:meth:`~MongoProfileStore.resolve_identity`.  The read that judges a link
refused as a duplicate goes to the primary, whatever read preference the
URL sets.

The client is built in :meth:`MongoProfileStore.open` with ``tz_aware=True``;
``timeoutMS``, ``serverSelectionTimeoutMS`` and ``connectTimeoutMS`` are
``timeout`` seconds unless the URL sets them (the URL's own settings win), so
an outage surfaces within about a second as
:class:`~gateway.errors.StoreUnavailable`.  Every driver error
(:class:`~pymongo.errors.PyMongoError`: ``ConnectionFailure``,
``AutoReconnect``, ``NotPrimaryError``, ``ServerSelectionTimeoutError``,
``NetworkTimeout``, ``ExecutionTimeout``, ``WriteConcernError``... once the
driver's own retries of retryable reads and writes are spent) is a
:class:`~gateway.errors.StoreUnavailable`, except a duplicate key where that
means "already exists".  Error and log messages are scrubbed of the
connection URL, its credentials and its options.

Profile and data field names are used as dotted update paths, so they must be
non-empty and contain neither ``.`` nor a leading ``$`` (``ValueError``
otherwise).  BSON datetimes have millisecond precision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from pymongo import ASCENDING, AsyncMongoClient, ReadPreference, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from gateway.errors import Conflict, StoreUnavailable
from gateway.profiles.base import (
    Below,
    Collection,
    Identity,
    ProfileStore,
    Records,
    User,
    check_changes,
    check_collection,
    check_record,
    check_value,
    check_where,
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


#: client options the store sets from ``timeout`` when the URL does not
_TIMEOUT_OPTIONS = ("timeoutMS", "serverSelectionTimeoutMS", "connectTimeoutMS")


def _url_options(url: str) -> set[str]:
    """The names (lower case) of the options a connection string sets: what
    follows the ``?`` after the host list's ``/``."""
    _, _, path = url.split("://", 1)[-1].partition("/")
    _, _, query = path.partition("?")
    return {part.split("=", 1)[0].strip().lower() for part in re.split(r"[&;]", query) if part.strip()}


def client_options(url: str, timeout: float) -> dict[str, Any]:
    """The keyword options :meth:`MongoProfileStore.open` gives the client
    beside ``url``: ``timeout`` (seconds) for each timeout the URL does not
    set (a keyword would override the URL's own), ``appname`` likewise."""
    ms = max(1, int(timeout * 1000))
    given = _url_options(url)
    options: dict[str, Any] = {name: ms for name in _TIMEOUT_OPTIONS if name.lower() not in given}
    if "appname" not in given:
        options["appname"] = "session-gateway"
    return options


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


# -- plugins' records ------------------------------------------------------------

_SEQUENCES = "record_sequences"
_INTERNAL = ("_id", "_seq", "_unique")  # record fields never begin with "_"


def _unique_fields(collection: Collection) -> list[str]:
    return [f for f in dict.fromkeys(collection.unique) if f != collection.key]


def _indexed_fields(collection: Collection) -> list[str]:
    return [f for f in dict.fromkeys((*collection.unique, *collection.indexes)) if f != collection.key]


def _to_doc(collection: Collection, record: dict[str, Any], seq: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": record[collection.key]}
    doc.update((name, value) for name, value in record.items() if name != collection.key)
    doc["_seq"] = seq
    unique = {f: record[f] for f in _unique_fields(collection) if record.get(f) is not None}
    if unique:
        doc["_unique"] = unique
    return doc


def _from_doc(collection: Collection, doc: Mapping[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {collection.key: doc["_id"]}
    for name, value in doc.items():
        if name not in _INTERNAL:
            record[name] = _utc(value) if isinstance(value, datetime) else value
    return record


def _match(collection: Collection, where: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``where`` as filter clauses (``None`` matches null or missing)."""
    clauses: list[dict[str, Any]] = []
    for name, expected in where.items():
        path = "_id" if name == collection.key else name
        if isinstance(expected, Below):
            clauses.append({"$or": [{path: None}, {path: {"$lt": expected.value}}]})
        else:
            clauses.append({path: expected})
    return clauses


def _taken(collection: Collection, exc: DuplicateKeyError) -> Conflict:
    """The Conflict for a duplicate key, naming the field from the index's key
    pattern or name (never the value, which the error also carries)."""
    details = exc.details if isinstance(exc.details, Mapping) else {}
    pattern = details.get("keyPattern")
    names = [str(n) for n in pattern] if isinstance(pattern, Mapping) else []
    if not names:
        found = re.search(r"index: (\S+)", str(exc))
        names = [found.group(1)] if found else [""]
    name = names[0]
    if name in ("_id", "_id_"):
        field = collection.key
    elif name.startswith(("_unique.", "unique_")):
        field = name.split(".", 1)[1] if name.startswith("_unique.") else name[len("unique_"):]
    else:
        field = "record"
    return Conflict(f"that {field} is already taken")


class MongoProfileStore(ProfileStore):
    """Users and identity links in a MongoDB database.  See the module docstring."""

    name = "mongodb"

    def __init__(self, url: str, database: str, timeout: float = 1.0, *,
                 migrations: tuple[Callable[["MongoProfileStore"], Awaitable[None]], ...] = ()) -> None:
        #: one-off upgrades of databases made by older versions, run at open
        self.migrations = migrations
        self._url = url
        self.database = database
        self.timeout = timeout
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._indexes_ready = False
        self._declared: dict[str, Collection] = {}
        self._prepared: set[Collection] = set()
        self._prepare_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:  # never show the URL: it may hold credentials
        return f"<{type(self).__name__} database={self.database!r} open={self._client is not None}>"

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Build the client, create indexes idempotently and move legacy API keys.

        Raises :class:`StoreUnavailable` if the server cannot be reached; the
        client is kept, so later calls work (and finish creating the indexes)
        once the server is back.  :meth:`close` is safe after a failed open.
        """
        if self._client is None:
            try:
                with self._errors():
                    self._client = AsyncMongoClient(self._url, tz_aware=True,
                                                    **client_options(self._url, self.timeout))
            except (ValueError, TypeError) as exc:  # an option's value the driver refuses
                raise StoreUnavailable(_WHAT, log_message=self._scrub(
                    f"mongodb: {type(exc).__name__}: {exc}")) from None
        await self._ensure_indexes()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._indexes_ready = False
        self._prepared.clear()
        if client is not None:
            with contextlib.suppress(PyMongoError):
                await client.close()

    async def _ensure_indexes(self) -> None:
        if self._indexes_ready:
            return
        with self._errors():
            await self._identities.create_index([("user_id", ASCENDING)], name="user_id")
            for migrate in self.migrations:
                await migrate(self)
        self._indexes_ready = True

    async def reserve_seq(self, name: str, count: int = 1) -> int:
        """Reserve ``count`` insertion numbers of a collection; the last one."""
        for attempt in range(2):
            try:
                with self._errors_except_duplicate():
                    doc = await self._db[_SEQUENCES].find_one_and_update(
                        {"_id": name}, {"$inc": {"n": count}}, upsert=True,
                        return_document=ReturnDocument.AFTER)
                if doc is not None:
                    return int(doc["n"])
            except DuplicateKeyError:  # concurrent first upserts: the retry finds it
                if attempt:
                    raise StoreUnavailable(_WHAT, log_message="mongodb: sequence upsert kept conflicting") from None
        raise StoreUnavailable(_WHAT, log_message="mongodb: sequence upsert returned nothing")

    # -- plumbing ----------------------------------------------------------

    @property
    def db(self) -> AsyncDatabase[dict[str, Any]]:
        """The database (for :mod:`gateway.profiles.legacy`)."""
        return self._db

    @property
    def _db(self) -> AsyncDatabase[dict[str, Any]]:
        return self._db_client()[self.database]

    @property
    def _users(self) -> AsyncCollection[dict[str, Any]]:
        return self._db["users"]

    @property
    def _identities(self) -> AsyncCollection[dict[str, Any]]:
        return self._db["identities"]

    @property
    def _primary_identities(self) -> AsyncCollection[dict[str, Any]]:
        """``identities``, read from the primary whatever the URL's read
        preference (for reads that judge a write just refused)."""
        return self._identities.with_options(read_preference=ReadPreference.PRIMARY)

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
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: PyMongoError) -> StoreUnavailable:
        """The StoreUnavailable for any other driver error, once the driver's
        own retries are spent: ConnectionFailure (AutoReconnect,
        NotPrimaryError, NetworkTimeout, ServerSelectionTimeoutError...),
        ExecutionTimeout, WriteConcernError (``w=majority`` not met, a step-down),
        OperationFailure (authentication...), ConfigurationError.  Its log
        message names the error, never the URL's credentials or options."""
        return StoreUnavailable(_WHAT, log_message=self._scrub(f"mongodb: {type(exc).__name__}: {exc}"))

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
            raise self._unavailable(exc) from None

    async def resolve_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity, bool]:
        await self._ready()
        key = identity_key(provider, subject)
        with self._errors():
            link = await self._identities.find_one({"_id": key})
        if link is not None:
            return await self._user_of(link, profile), _identity(link), False
        # A first login: the user first, then the link naming it (see the
        # module docstring), so that a link never names a missing user.
        now = utcnow()
        candidate = new_user_id()
        user_doc: dict[str, Any] = {"_id": candidate, "profile": dict(profile or {}), "created_at": now, "updated_at": now}
        with self._errors():
            await self._users.insert_one(user_doc)
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
                                "created_at": now,
                            }
                        },
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                break
            except DuplicateKeyError:  # concurrent upserts of one _id: the retry finds it
                if attempt:  # the link exists (a duplicate proves it) and is not ours
                    await self._discard_user(candidate)
                    raise StoreUnavailable(_WHAT, log_message="mongodb: identity upsert kept conflicting") from None
        if link is None:
            raise StoreUnavailable(_WHAT, log_message="mongodb: identity upsert returned nothing")
        if link["user_id"] == candidate:
            return _user(user_doc), _identity(link), True
        await self._discard_user(candidate)  # another caller's link won: ours names nobody
        return await self._user_of(link, profile), _identity(link), False

    async def _user_of(self, link: dict[str, Any], profile: dict[str, Any] | None) -> User:
        """The user a link names; created with ``profile`` if it is missing
        (a link written by an older version before its user)."""
        with self._errors():
            doc = await self._users.find_one({"_id": link["user_id"]})
        if doc is None:
            doc = await self._upsert_user(link["user_id"], dict(profile or {}))
        return _user(doc)

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
        except DuplicateKeyError:  # registered concurrently: ours is the user nothing names
            await self._discard_user(user_id)
            raise Conflict("that identity is already registered") from None
        # A StoreUnavailable here leaves the user: the link may have been
        # written (a step-down after the write), and then names it.
        return _user(user_doc), _identity(link_doc)

    async def _discard_user(self, user_id: str) -> None:
        """Best-effort removal of a user this call created and no link names."""
        try:
            await self._users.delete_one({"_id": user_id})
        except PyMongoError as exc:
            log.warning("mongodb: could not remove unlinked user %s: %s", user_id, self._scrub(f"{type(exc).__name__}: {exc}"))

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
                except DuplicateKeyError:  # linked concurrently: judge the winner, read from the primary
                    existing = await self._primary_identities.find_one({"_id": key})
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

    # -- plugins' records ---------------------------------------------------------

    def records(self, collection: Collection) -> Records:
        check_collection(collection)
        declared = self._declared.setdefault(collection.name, collection)
        if declared != collection:
            raise ValueError(f"collection {collection.name} is already declared otherwise")
        return _MongoRecords(self, collection)

    async def _prepare(self, collection: Collection) -> AsyncCollection[dict[str, Any]]:
        """The collection, its indexes made once per open (a lock keeps
        concurrent first uses to one)."""
        await self._ready()
        coll = self._db[f"plugin_{collection.name}"]
        if collection in self._prepared:
            return coll
        if self._prepare_lock is None:
            self._prepare_lock = asyncio.Lock()
        async with self._prepare_lock:
            if collection not in self._prepared:
                with self._errors():
                    await self._make_indexes(coll, collection)
                self._prepared.add(collection)
        return coll

    @staticmethod
    async def _make_indexes(coll: AsyncCollection[dict[str, Any]], collection: Collection) -> None:
        unique, indexed = _unique_fields(collection), _indexed_fields(collection)
        info = await coll.index_information()
        for name in info:  # no longer declared: values, then index, go
            if name.startswith("unique_") and name[len("unique_"):] not in unique:
                path = f"_unique.{name[len('unique_'):]}"
                await coll.update_many({path: {"$exists": True}}, {"$unset": {path: ""}})
                await coll.drop_index(name)
            elif name.startswith("index_") and name[len("index_"):] not in indexed:
                await coll.drop_index(name)
        for field in unique:
            path = f"_unique.{field}"
            if f"unique_{field}" not in info:  # declared since records were stored: fill in
                await coll.update_many({field: {"$exists": True, "$ne": None}}, [{"$set": {path: f"${field}"}}])
            await coll.create_index([(path, ASCENDING)], name=f"unique_{field}", unique=True,
                                    partialFilterExpression={path: {"$exists": True}})
        for field in indexed:
            await coll.create_index([(field, ASCENDING), ("_seq", ASCENDING)], name=f"index_{field}")


class _MongoRecords:
    """The records of one collection in ``plugin_<name>`` (see the module docstring)."""

    def __init__(self, store: MongoProfileStore, collection: Collection) -> None:
        self._store = store
        self._collection = collection

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._collection.name}>"

    async def insert(self, record: Mapping[str, Any]) -> None:
        values = check_record(self._collection, record)
        coll = await self._store._prepare(self._collection)
        seq = await self._store.reserve_seq(self._collection.name)
        with self._store._errors():
            try:
                await coll.insert_one(_to_doc(self._collection, values, seq))
            except DuplicateKeyError as exc:
                raise _taken(self._collection, exc) from None

    async def get(self, key: str) -> dict[str, Any] | None:
        coll = await self._store._prepare(self._collection)
        with self._store._errors():
            doc = await coll.find_one({"_id": key})
        return None if doc is None else _from_doc(self._collection, doc)

    async def find(self, field: str, value: Any) -> list[dict[str, Any]]:
        collection = self._collection
        value = check_value(field, value)
        if field == collection.key:
            if not isinstance(value, str):
                return []
            query: dict[str, Any] = {"_id": value}
        elif field in _indexed_fields(collection):
            query = {field: value}
        else:
            raise ValueError(f"collection {collection.name}: {field!r} is not its key, a unique or an indexes field")
        coll = await self._store._prepare(collection)
        with self._store._errors():
            docs = await coll.find(query).sort([("_seq", ASCENDING)]).to_list(None)
        return [_from_doc(collection, doc) for doc in docs]

    async def update(self, key: str, changes: Mapping[str, Any],
                     where: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        collection = self._collection
        values = check_changes(collection, key, changes)
        query: dict[str, Any] = {"_id": key}
        clauses = _match(collection, check_where(where))
        if clauses:
            query["$and"] = clauses
        update: dict[str, dict[str, Any]] = {"$set": dict(values)} if values else {}
        for field in _unique_fields(collection):
            if field in values:
                if values[field] is None:
                    update.setdefault("$unset", {})[f"_unique.{field}"] = ""
                else:
                    update["$set"][f"_unique.{field}"] = values[field]
        coll = await self._store._prepare(collection)
        with self._store._errors():
            if not update:  # nothing to change: the record, if ``where`` holds
                doc = await coll.find_one(query)
            else:
                try:
                    doc = await coll.find_one_and_update(query, update, return_document=ReturnDocument.AFTER)
                except DuplicateKeyError as exc:
                    raise _taken(collection, exc) from None
        return None if doc is None else _from_doc(collection, doc)

    async def delete(self, key: str) -> bool:
        coll = await self._store._prepare(self._collection)
        with self._store._errors():
            result = await coll.delete_one({"_id": key})
        return result.deleted_count > 0
