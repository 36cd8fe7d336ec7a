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

API keys live in ``api_keys`` (the secret's SHA-256, never the key; scopes
as a JSON list).  Profiles and identity data are stored as JSON text (``ensure_ascii=False``,
so any Unicode round-trips unchanged); datetimes are stored as ISO 8601
strings in UTC and read back as timezone-aware UTC datetimes.

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
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

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
CREATE TABLE IF NOT EXISTS api_keys (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id),
    name         TEXT NOT NULL,
    scopes       TEXT NOT NULL DEFAULT '[]',
    secret_hash  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    revoked_at   TEXT,
    last_used_at TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_user_id ON api_keys(user_id);
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


def _opt_ts(value: datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _opt_dt(text: str | None) -> datetime | None:
    return None if text is None else _dt(text)


_API_KEY_COLUMNS = "id, user_id, name, scopes, secret_hash, created_at, expires_at, revoked_at, last_used_at"


def _api_key_row(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(
        id=row[0], user_id=row[1], name=row[2], scopes=[str(s) for s in json.loads(row[3] or "[]")],
        secret_hash=row[4], created_at=_dt(row[5]), expires_at=_opt_dt(row[6]),
        revoked_at=_opt_dt(row[7]), last_used_at=_opt_dt(row[8]),
    )


def _merge(current: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``current`` updated by ``fields``; a ``None`` value removes the key."""
    merged = dict(current)
    for key, value in fields.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _unavailable(exc: BaseException, action: str) -> StoreUnavailable:
    """A StoreUnavailable whose log message names the failure, not SQL or paths."""
    if isinstance(exc, sqlite3.Error):
        # sqlite3 messages describe the failure ("unable to open database
        # file", "database is locked", "disk I/O error"), never the path.
        detail = f"{type(exc).__name__}: {exc}"
    elif isinstance(exc, OSError):
        # str(OSError) includes the file name; strerror does not.
        detail = f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    else:
        detail = type(exc).__name__
    return StoreUnavailable(_WHAT, log_message=f"sqlite {action} failed: {detail}")


class SQLiteProfileStore(ProfileStore):
    """Users and identity links in one SQLite file.  See the module docstring."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

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
        self._executor = executor

    async def close(self) -> None:
        """Close the connection and stop the worker thread (pending work runs first)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        conn, self._conn = self._conn, None
        loop = asyncio.get_running_loop()
        try:
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
        except sqlite3.Error:
            pass
        finally:
            executor.shutdown(wait=False)

    @staticmethod
    def _prepare_file(conn: sqlite3.Connection, attempts: int = 50) -> None:
        """WAL mode and the schema.  Several worker processes may open a new
        file at once, and switching the journal mode answers "locked" without
        waiting for the busy timeout: retry for a few seconds."""
        for attempt in range(attempts):
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
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
            raise _unavailable(exc, "open") from None

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
    def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], write: bool = True) -> T:
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

    # -- API keys ----------------------------------------------------------------

    @staticmethod
    def _api_key(conn: sqlite3.Connection, key_id: str) -> ApiKey | None:
        row = conn.execute(f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _api_key_row(row)

    async def create_api_key(self, key: ApiKey) -> None:
        def work(conn: sqlite3.Connection) -> None:
            if self._api_key(conn, key.id) is not None:
                raise Conflict("that API key id already exists")
            if self._user(conn, key.user_id) is None:
                raise KeyError(key.user_id)
            conn.execute(
                f"INSERT INTO api_keys ({_API_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key.id, key.user_id, key.name, json.dumps(list(key.scopes), ensure_ascii=False),
                 key.secret_hash, _ts(key.created_at), _opt_ts(key.expires_at),
                 _opt_ts(key.revoked_at), _opt_ts(key.last_used_at)),
            )

        await self._run(work)

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        return await self._run(lambda conn: self._api_key(conn, key_id), write=False)

    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        def work(conn: sqlite3.Connection) -> list[ApiKey]:
            rows = conn.execute(
                f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE user_id = ? ORDER BY created_at, rowid",
                (user_id,),
            ).fetchall()
            return [_api_key_row(row) for row in rows]

        return await self._run(work, write=False)

    async def revoke_api_key(self, key_id: str, when: datetime) -> ApiKey | None:
        def work(conn: sqlite3.Connection) -> ApiKey | None:
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                         (_ts(when), key_id))
            return self._api_key(conn, key_id)

        return await self._run(work)

    async def touch_api_key(self, key_id: str, when: datetime, older_than: datetime) -> bool:
        # Stored times share one format (UTC, microseconds), so they compare as text.
        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                (_ts(when), key_id, _ts(older_than)),
            )
            return cursor.rowcount > 0

        return await self._run(work)
