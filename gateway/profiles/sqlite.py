"""A :class:`~gateway.profiles.base.ProfileStore` in a local SQLite file.

The database is a durable file (WAL journal, ``synchronous=FULL``) whose
parent directory is created on :meth:`SQLiteProfileStore.open`; ``":memory:"``
gives a throw-away database for tests.

All database work runs off the event loop on one dedicated worker thread
(a single-thread :class:`~concurrent.futures.ThreadPoolExecutor`) that owns
the one connection.  Every operation is serialised on that thread and every
read-modify-write runs inside ``BEGIN IMMEDIATE`` so it is also atomic against
other processes sharing the file; this is what makes fifty concurrent first
logins for one subject create exactly one user.

Profiles and identity data are stored as JSON text (``ensure_ascii=False``,
so any Unicode round-trips unchanged); datetimes are stored as ISO 8601
strings in UTC and read back as timezone-aware UTC datetimes.

A plugin's :class:`~gateway.api.Collection` ``<name>`` is the table
``plugin_<name>``, made (with its indexes) on first use inside a write
transaction, so concurrent first uses, in one process or several, are safe::

    seq  INTEGER PRIMARY KEY  -- insertion order (a rowid alias, kept by VACUUM)
    key  TEXT NOT NULL UNIQUE -- the record's key field
    doc  TEXT NOT NULL        -- the record as JSON; a datetime as {"$dt": "<UTC ISO 8601>"}
    f_<field>                 -- one per unique / indexes field: the value's JSON, NULL for None

with a UNIQUE index on each ``unique`` column (NULLs never clash) and a plain
index on each ``indexes`` column.  A field declared later gets its column
(filled from the records already stored) and index at the next first use; a
field no longer declared loses them.  A conditional update re-reads the
record and writes it inside one ``BEGIN IMMEDIATE`` transaction, so it is
atomic against other processes too; a ``Below`` bound is compared with the
decoded value (datetimes as instants, numbers as numbers), never as text.
A taken key or unique value is a :class:`~gateway.errors.Conflict` naming
the field, never its value.

One-off upgrades of files made by older versions run at open
(:mod:`gateway.profiles.legacy`).

Any :class:`sqlite3.Error` (or an :class:`OSError` preparing the file) is
raised as :class:`~gateway.errors.StoreUnavailable`; neither the message nor
the log message carries SQL text or the database path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, TypeVar

from gateway.errors import Conflict, StoreUnavailable
from gateway.profiles.base import (
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
    record_matches,
    utcnow,
)

__all__ = ["SQLiteProfileStore"]

T = TypeVar("T")

_WHAT = "profile store"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,
    profile     TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    key         TEXT PRIMARY KEY,
    provider    TEXT NOT NULL,
    subject     TEXT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(id),
    data        TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS identities_user_id ON identities(user_id);
"""


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _loads(text: str | None) -> dict[str, Any]:
    return dict(json.loads(text)) if text else {}


def _ts(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _opt_dt(text: str | None) -> datetime | None:
    return None if text is None else _dt(text)


def _merge(current: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``current`` updated by ``fields``; a ``None`` value removes the key."""
    merged = dict(current)
    for key, value in fields.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _failure(exc: BaseException) -> str:
    """What failed, without SQL or paths."""
    if isinstance(exc, sqlite3.Error):
        # sqlite3 messages describe the failure ("unable to open database
        # file", "database is locked", "disk I/O error"), never the path.
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        # str(OSError) includes the file name; strerror does not.
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return type(exc).__name__


def _unavailable(exc: BaseException, action: str) -> StoreUnavailable:
    """A StoreUnavailable whose log message names the failure, not SQL or paths."""
    return StoreUnavailable(_WHAT, log_message=f"sqlite {action} failed: {_failure(exc)}")


# -- plugins' records (worker thread) ----------------------------------------------

_DT = "$dt"  # tags a datetime in a record's JSON (no plugin object key begins with "$")


def _encode(value: Any) -> Any:
    return {_DT: _ts(value)} if isinstance(value, datetime) else value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_DT), str):
        return _dt(value[_DT])
    return value


def _doc(record: dict[str, Any]) -> str:
    return _dumps({name: _encode(value) for name, value in record.items()})


def _record(doc: str) -> dict[str, Any]:
    return {name: _decode(value) for name, value in json.loads(doc).items()}


def _column_value(value: Any) -> str | None:
    """What a field's column holds: NULL for ``None``, else the value's JSON,
    so values of different types never clash (``"1"`` is not ``1``; ``1.0``
    is ``1``)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return json.dumps(_encode(value), ensure_ascii=False, separators=(",", ":"))


def _table(collection: Collection) -> str:
    return f"plugin_{collection.name}"


def _fields(collection: Collection) -> list[str]:
    """The fields with a column of their own: unique first, then indexes."""
    return [f for f in dict.fromkeys((*collection.unique, *collection.indexes)) if f != collection.key]


def _prepare_collection(conn: sqlite3.Connection, collection: Collection) -> None:
    """The table, columns and indexes of ``collection``, idempotently (inside
    a write transaction, so a concurrent process waits and then finds them)."""
    table = _table(collection)
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" ('
                 "seq INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, doc TEXT NOT NULL)")
    columns = {str(row[1]) for row in conn.execute(f'PRAGMA table_info("{table}")')}
    wanted = _fields(collection)
    for column in sorted(c for c in columns if c.startswith("f_") and c[2:] not in wanted):
        # no longer declared: its index and column go (no stale values linger)
        conn.execute(f'DROP INDEX IF EXISTS "{table}:unique:{column[2:]}"')
        conn.execute(f'DROP INDEX IF EXISTS "{table}:index:{column[2:]}"')
        conn.execute(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')
    for field in wanted:
        if f"f_{field}" not in columns:  # newly declared: fill from what is stored
            conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "f_{field}"')
            for seq, doc in conn.execute(f'SELECT seq, doc FROM "{table}"').fetchall():
                conn.execute(f'UPDATE "{table}" SET "f_{field}" = ? WHERE seq = ?',
                             (_column_value(_record(doc).get(field)), seq))
        unique = field in collection.unique
        conn.execute(f'DROP INDEX IF EXISTS "{table}:{"index" if unique else "unique"}:{field}"')
        conn.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX IF NOT EXISTS'
                     f' "{table}:{"unique" if unique else "index"}:{field}" ON "{table}" ("f_{field}")')


def _taken(collection: Collection, exc: sqlite3.IntegrityError) -> Conflict:
    """The Conflict for a unique violation, naming the field (never the value):
    SQLite says ``UNIQUE constraint failed: <table>.<column>``."""
    column = str(exc).rsplit(".", 1)[-1].strip()
    field = collection.key if column == "key" else column[2:] if column.startswith("f_") else "record"
    return Conflict(f"that {field} is already taken")


def _insert(conn: sqlite3.Connection, collection: Collection, record: dict[str, Any],
            or_ignore: bool = False) -> None:
    fields = _fields(collection)
    columns = ", ".join(["key", "doc", *(f'"f_{f}"' for f in fields)])
    marks = ", ".join("?" * (2 + len(fields)))
    values = [record[collection.key], _doc(record), *(_column_value(record.get(f)) for f in fields)]
    try:
        conn.execute(f'INSERT {"OR IGNORE " if or_ignore else ""}INTO "{_table(collection)}"'
                     f" ({columns}) VALUES ({marks})", values)
    except sqlite3.IntegrityError as exc:
        raise _taken(collection, exc) from None


#: A one-off upgrade run at open, inside a write transaction (so of several
#: processes opening the file only the first one does the work).
Migration = Callable[[sqlite3.Connection], None]


class SQLiteProfileStore(ProfileStore):
    """Users and identity links in one SQLite file.  See the module docstring."""

    name = "sqlite"

    def __init__(self, path: str, *, migrations: tuple[Migration, ...] = ()) -> None:
        self.path = path
        self.migrations = migrations
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._declared: dict[str, Collection] = {}
        self._prepared: set[Collection] = set()
        self._prepare_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} open={self._conn is not None}>"

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Create the file (and its directory) and the schema, idempotently."""
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-profiles")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(executor, self._connect)
        except StoreUnavailable:
            executor.shutdown(wait=False)
            raise
        self._prepare_lock = asyncio.Lock()
        self._executor = executor

    async def close(self) -> None:
        """Close the connection and stop the worker thread (pending work runs first)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        conn, self._conn = self._conn, None
        self._prepared.clear()  # ":memory:" forgets its tables
        loop = asyncio.get_running_loop()
        try:
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
        except sqlite3.Error:
            pass
        finally:
            executor.shutdown(wait=False)

    def _prepare_file(self, conn: sqlite3.Connection, attempts: int = 50) -> None:
        """WAL mode, the schema and the one-off migration.  Several worker
        processes may open a new file at once, and switching the journal mode
        answers "locked" without waiting for the busy timeout: retry for a few
        seconds."""
        for attempt in range(attempts):
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                for migrate in self.migrations:
                    SQLiteProfileStore._transaction(conn, migrate, raw=True)
                return
            except sqlite3.OperationalError as exc:
                if attempt + 1 == attempts or "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(0.1)

    def _connect(self) -> sqlite3.Connection:
        """Open the connection and create the schema (runs on the worker thread)."""
        conn: sqlite3.Connection | None = None
        try:
            if self.path != ":memory:":
                parent = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(parent, exist_ok=True)
            # isolation_level=None: no implicit transactions; we issue
            # BEGIN IMMEDIATE / COMMIT ourselves.
            conn = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._prepare_file(conn)
            return conn
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            # (the setting is named; never its path, as no message of this store names one)
            raise StoreUnavailable(_WHAT, log_message="cannot open the SQLite profile store (profiles.sqlite_path): "
                                   f"sqlite open failed: {_failure(exc)}") from None

    # -- plumbing ----------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """Run ``fn(conn)`` on the worker thread inside one transaction:
        ``BEGIN IMMEDIATE`` for writes, a deferred ``BEGIN`` for reads (WAL
        readers never wait for a writer in another process)."""
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreUnavailable(_WHAT, log_message="sqlite profile store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, functools.partial(self._transaction, conn, fn, write))
        except RuntimeError as exc:  # executor shut down by a concurrent close()
            raise StoreUnavailable(_WHAT, log_message=f"sqlite profile store closed: {exc}") from None

    @staticmethod
    def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], write: bool = True,
                     raw: bool = False) -> T:
        """``fn(conn)`` in one transaction; a :class:`sqlite3.Error` becomes
        StoreUnavailable (``raw``: is raised as it is)."""
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if raw:
                raise
            raise _unavailable(exc, "query") from None

    # -- row helpers (worker thread) ----------------------------------------

    @staticmethod
    def _user(conn: sqlite3.Connection, user_id: str) -> User | None:
        row = conn.execute(
            "SELECT id, profile, created_at, updated_at FROM users WHERE id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        return User(id=row[0], profile=_loads(row[1]), created_at=_dt(row[2]), updated_at=_dt(row[3]))

    @staticmethod
    def _identity(conn: sqlite3.Connection, key: str) -> Identity | None:
        row = conn.execute(
            "SELECT provider, subject, user_id, data, created_at FROM identities WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else SQLiteProfileStore._identity_row(row)

    @staticmethod
    def _identity_row(row: tuple[Any, ...]) -> Identity:
        return Identity(
            provider=row[0], subject=row[1], user_id=row[2], data=_loads(row[3]), created_at=_dt(row[4])
        )

    @staticmethod
    def _insert_user(conn: sqlite3.Connection, user_id: str, profile: dict[str, Any]) -> User:
        now = utcnow()
        conn.execute(
            "INSERT INTO users (id, profile, created_at, updated_at) VALUES (?, ?, ?, ?)",
            (user_id, _dumps(profile), _ts(now), _ts(now)),
        )
        return User(id=user_id, profile=dict(profile), created_at=now, updated_at=now)

    @staticmethod
    def _insert_identity(
        conn: sqlite3.Connection, provider: str, subject: str, user_id: str, data: dict[str, Any]
    ) -> Identity:
        now = utcnow()
        conn.execute(
            "INSERT INTO identities (key, provider, subject, user_id, data, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (identity_key(provider, subject), provider, subject, user_id, _dumps(data), _ts(now)),
        )
        return Identity(provider=provider, subject=subject, user_id=user_id, data=dict(data), created_at=now)

    # -- the contract ----------------------------------------------------------

    async def get_user(self, user_id: str) -> User | None:
        return await self._run(lambda conn: self._user(conn, user_id), write=False)

    async def update_profile(self, user_id: str, fields: dict[str, Any]) -> User:
        def work(conn: sqlite3.Connection) -> User:
            user = self._user(conn, user_id)
            if user is None:
                raise KeyError(user_id)
            user.profile = _merge(user.profile, fields)
            user.updated_at = utcnow()
            conn.execute(
                "UPDATE users SET profile = ?, updated_at = ? WHERE id = ?",
                (_dumps(user.profile), _ts(user.updated_at), user_id),
            )
            return user

        return await self._run(work)

    async def get_identity(self, provider: str, subject: str) -> Identity | None:
        key = identity_key(provider, subject)
        return await self._run(lambda conn: self._identity(conn, key), write=False)

    async def resolve_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity, bool]:
        key = identity_key(provider, subject)

        def work(conn: sqlite3.Connection) -> tuple[User, Identity, bool]:
            link = self._identity(conn, key)
            if link is not None:
                user = self._user(conn, link.user_id)
                if user is None:  # dangling link (should not happen): heal it
                    user = self._insert_user(conn, link.user_id, {})
                return user, link, False
            user = self._insert_user(conn, new_user_id(), profile or {})
            link = self._insert_identity(conn, provider, subject, user.id, data or {})
            return user, link, True

        return await self._run(work)

    async def create_identity(
        self,
        provider: str,
        subject: str,
        profile: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> tuple[User, Identity]:
        key = identity_key(provider, subject)

        def work(conn: sqlite3.Connection) -> tuple[User, Identity]:
            if self._identity(conn, key) is not None:
                raise Conflict("that identity is already registered")
            user = self._insert_user(conn, new_user_id(), profile or {})
            link = self._insert_identity(conn, provider, subject, user.id, data or {})
            return user, link

        return await self._run(work)

    async def link_identity(
        self, user_id: str, provider: str, subject: str, data: dict[str, Any] | None = None
    ) -> Identity:
        key = identity_key(provider, subject)

        def work(conn: sqlite3.Connection) -> Identity:
            link = self._identity(conn, key)
            if link is not None:
                if link.user_id != user_id:
                    raise Conflict("that identity is linked to another user")
                return link
            if self._user(conn, user_id) is None:
                raise KeyError(user_id)
            return self._insert_identity(conn, provider, subject, user_id, data or {})

        return await self._run(work)

    async def update_identity_data(
        self, provider: str, subject: str, data: dict[str, Any]
    ) -> None:
        key = identity_key(provider, subject)

        def work(conn: sqlite3.Connection) -> None:
            link = self._identity(conn, key)
            if link is None:
                raise KeyError(key)
            conn.execute(
                "UPDATE identities SET data = ? WHERE key = ?", (_dumps(_merge(link.data, data)), key)
            )

        await self._run(work)

    async def list_identities(self, user_id: str) -> list[Identity]:
        def work(conn: sqlite3.Connection) -> list[Identity]:
            rows = conn.execute(
                "SELECT provider, subject, user_id, data, created_at FROM identities"
                " WHERE user_id = ? ORDER BY created_at, rowid",
                (user_id,),
            ).fetchall()
            return [self._identity_row(row) for row in rows]

        return await self._run(work, write=False)

    # -- plugins' records ---------------------------------------------------------

    def records(self, collection: Collection) -> Records:
        check_collection(collection)
        declared = self._declared.setdefault(collection.name, collection)
        if declared != collection:
            raise ValueError(f"collection {collection.name} is already declared otherwise")
        return _SQLiteRecords(self, collection)

    async def _prepare(self, collection: Collection) -> None:
        """Make the collection's table and indexes once per open (a lock keeps
        concurrent first uses to one)."""
        if collection in self._prepared:
            return
        lock = self._prepare_lock
        if lock is None or self._conn is None:
            raise StoreUnavailable(_WHAT, log_message="sqlite profile store is not open")
        async with lock:
            if collection not in self._prepared:
                await self._run(lambda conn: _prepare_collection(conn, collection))
                self._prepared.add(collection)


class _SQLiteRecords:
    """The records of one collection in its ``plugin_<name>`` table (see the
    module docstring)."""

    def __init__(self, store: SQLiteProfileStore, collection: Collection) -> None:
        self._store = store
        self._collection = collection
        self._table = _table(collection)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._collection.name}>"

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        await self._store._prepare(self._collection)
        return await self._store._run(fn, write=write)

    async def insert(self, record: Mapping[str, Any]) -> None:
        values = check_record(self._collection, record)
        await self._run(lambda conn: _insert(conn, self._collection, values))

    async def get(self, key: str) -> dict[str, Any] | None:
        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(f'SELECT doc FROM "{self._table}" WHERE key = ?', (key,)).fetchone()
            return None if row is None else _record(row[0])

        return await self._run(work, write=False)

    async def find(self, field: str, value: Any) -> list[dict[str, Any]]:
        collection = self._collection
        value = check_value(field, value)
        params: list[Any] = []
        if field == collection.key:
            if not isinstance(value, str):
                return []
            where, params = "key = ?", [value]
        elif field in _fields(collection):
            encoded = _column_value(value)
            where, params = (f'"f_{field}" IS NULL', []) if encoded is None else (f'"f_{field}" = ?', [encoded])
        else:
            raise ValueError(f"collection {collection.name}: {field!r} is not its key, a unique or an indexes field")

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(f'SELECT doc FROM "{self._table}" WHERE {where} ORDER BY seq', params).fetchall()
            return [_record(row[0]) for row in rows]

        return await self._run(work, write=False)

    async def update(self, key: str, changes: Mapping[str, Any],
                     where: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        collection = self._collection
        values = check_changes(collection, key, changes)
        conditions = check_where(where)
        columns = [f for f in _fields(collection) if f in values]

        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            # inside BEGIN IMMEDIATE: nobody writes between this read and the write
            row = conn.execute(f'SELECT doc FROM "{self._table}" WHERE key = ?', (key,)).fetchone()
            if row is None:
                return None
            record = _record(row[0])
            if not record_matches(record, conditions):
                return None
            record.update(values)
            sets = ", ".join(["doc = ?", *(f'"f_{f}" = ?' for f in columns)])
            try:
                conn.execute(f'UPDATE "{self._table}" SET {sets} WHERE key = ?',
                             [_doc(record), *(_column_value(values[f]) for f in columns), key])
            except sqlite3.IntegrityError as exc:
                raise _taken(collection, exc) from None
            return record

        return await self._run(work)

    async def delete(self, key: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            return conn.execute(f'DELETE FROM "{self._table}" WHERE key = ?', (key,)).rowcount > 0

        return await self._run(work)
