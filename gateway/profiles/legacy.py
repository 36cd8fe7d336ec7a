"""One-off upgrades of profile stores made by older versions.

Before plugins kept their own records (:class:`gateway.api.Collection`),
the profile store kept API keys in a table (SQLite) or collection (MongoDB)
of its own, ``api_keys``.  At every open, its rows not copied yet are copied into the
records of the plugin that owns API keys now (collection ``apikey_keys``,
as the built-in API-key plugin declares it); a key already copied is never
overwritten.  The old table is left as it is, so older versions still
running beside the new one (a rolling upgrade) or brought back (a rollback)
keep working with the keys made before; keys an older version makes
meanwhile are copied at the next open.  Drop ``api_keys`` once no older
version runs.  This module is the one place in the
core that knows that plugin's storage, and only to carry old data over.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from gateway.api import Collection
from gateway.profiles.mongodb import MongoProfileStore
from gateway.profiles.sqlite import _dt, _insert, _opt_dt, _prepare_collection, _table

#: Where the API-key plugin keeps its keys now.
_API_KEYS = Collection("apikey_keys", key="id", indexes=("user_id",))


def sqlite_api_keys(conn: sqlite3.Connection) -> None:
    """At open: copy the API keys of an ``api_keys`` table (files from before
    plugins kept their own records) that are not in the plugin's collection
    yet.  Runs in one write transaction, so processes opening the file at
    once copy each key once."""
    def exists(name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (name,)).fetchone() is not None

    if not exists("api_keys"):
        return
    table = _table(_API_KEYS)
    if not exists(table):
        _prepare_collection(conn, _API_KEYS)
    # fill every field column the table has (the plugin may declare more)
    columns = tuple(str(row[1])[2:] for row in conn.execute(f'PRAGMA table_info("{table}")')
                    if str(row[1]).startswith("f_"))
    target = Collection(_API_KEYS.name, key=_API_KEYS.key, indexes=columns)
    rows = conn.execute(
        "SELECT id, user_id, name, scopes, secret_hash, created_at, expires_at, revoked_at, last_used_at"
        " FROM api_keys ORDER BY created_at, rowid").fetchall()
    for row in rows:
        _insert(conn, target, {
            "id": row[0], "user_id": row[1], "name": row[2],
            "scopes": [str(s) for s in json.loads(row[3] or "[]")], "secret_hash": row[4],
            "created_at": _dt(row[5]), "expires_at": _opt_dt(row[6]),
            "revoked_at": _opt_dt(row[7]), "last_used_at": _opt_dt(row[8]),
        }, or_ignore=True)


async def mongodb_api_keys(store: MongoProfileStore) -> None:
    """At open: copy the API keys of an ``api_keys`` collection (documents
    already shaped as records: ``_id`` the key id) that are not in the
    plugin's collection yet.  Safe to repeat and to race: a copied key is
    skipped."""
    db = store.db
    if not await db.list_collection_names(filter={"name": "api_keys"}):
        return
    old = db["api_keys"]
    docs = await old.find().sort([("created_at", ASCENDING), ("_id", ASCENDING)]).to_list(None)
    target = db[f"plugin_{_API_KEYS.name}"]
    copied = set(await target.distinct("_id", {"_id": {"$in": [d["_id"] for d in docs]}})) if docs else set()
    docs = [d for d in docs if d["_id"] not in copied]
    if docs:
        last = await store.reserve_seq(_API_KEYS.name, len(docs))
        for n, doc in enumerate(docs):
            with contextlib.suppress(DuplicateKeyError):  # a concurrent open copied it
                await target.insert_one({**doc, "_seq": last - len(docs) + 1 + n})


#: What a store runs at open, oldest upgrade first.
SQLITE_MIGRATIONS = (sqlite_api_keys,)
MONGODB_MIGRATIONS = (mongodb_api_keys,)
