"""Contract tests for the profile stores, run against every backend.

``sqlite`` always runs (on a file under ``tmp_path``).  ``mongodb`` runs only
when ``GATEWAY_TEST_MONGODB_URL`` names a MongoDB server; each test then gets
its own database, dropped afterwards.  Plugins' records (``records()``) have a
contract suite of their own.  The MongoDB outage test needs no
server: it points the store at a closed port.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from gateway.api import Below, Collection, Records
from gateway.errors import Conflict, StoreUnavailable
from gateway.profiles.base import ProfileStore
from gateway.profiles.mongodb import MongoProfileStore
from gateway.profiles.legacy import mongodb_api_keys, sqlite_api_keys
from gateway.profiles.sqlite import SQLiteProfileStore

MONGODB_URL = os.environ.get("GATEWAY_TEST_MONGODB_URL")
MONGODB_SKIP = (
    "MongoDB store tests skipped: set GATEWAY_TEST_MONGODB_URL to a MongoDB server URL to run them"
)
_RUN_ID = uuid.uuid4().hex[:10]
_DB_COUNTER = itertools.count()


async def _drop_mongo_database(name: str) -> None:
    from pymongo import AsyncMongoClient

    client: Any = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=5000)
    try:
        await client.drop_database(name)
    finally:
        await client.close()


@pytest.fixture(params=["sqlite", "mongodb"])
def store(request: pytest.FixtureRequest, tmp_path: Path, io_loop: Any) -> ProfileStore:
    """An un-opened store; tests ``await store.open()``; closed (and a MongoDB
    test database dropped) afterwards."""
    database: str | None = None
    profile_store: ProfileStore
    if request.param == "sqlite":
        profile_store = SQLiteProfileStore(str(tmp_path / "data" / "profiles.db"))
    else:
        if not MONGODB_URL:
            pytest.skip(MONGODB_SKIP)
        database = f"gateway_test_{_RUN_ID}_{next(_DB_COUNTER)}"
        profile_store = MongoProfileStore(MONGODB_URL, database, timeout=5.0)

    def finish() -> None:
        io_loop.run_sync(profile_store.close)
        if database is not None:
            io_loop.run_sync(lambda: _drop_mongo_database(database))

    request.addfinalizer(finish)
    return profile_store


async def stored_counts(store: ProfileStore) -> tuple[int, int]:
    """(users, identities) as held by the backing database itself."""
    if isinstance(store, SQLiteProfileStore):
        with sqlite3.connect(store.path) as conn:
            users = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
            identities = conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
        conn.close()
        return users, identities
    assert isinstance(store, MongoProfileStore)
    from pymongo import AsyncMongoClient

    client: Any = AsyncMongoClient(MONGODB_URL)
    try:
        db = client[store.database]
        return await db.users.count_documents({}), await db.identities.count_documents({})
    finally:
        await client.close()


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - value) < timedelta(minutes=5)


# -- the contract, for every store ----------------------------------------------


@pytest.mark.gen_test
async def test_get_user_unknown_is_none(store: ProfileStore) -> None:
    await store.open()
    assert await store.get_user("u_nobody") is None
    assert await store.get_identity("password", "nobody") is None


@pytest.mark.gen_test
async def test_resolve_identity_creates_once(store: ProfileStore) -> None:
    await store.open()
    user, link, created = await store.resolve_identity(
        "password", "alice", profile={"display_name": "Alice"}, data={"hash": "h1"}
    )
    assert created is True
    assert user.profile == {"display_name": "Alice"}
    assert (link.provider, link.subject, link.user_id, link.data) == ("password", "alice", user.id, {"hash": "h1"})
    assert link.key == "password:alice"

    again, link2, created2 = await store.resolve_identity(
        "password", "alice", profile={"display_name": "Other"}, data={"hash": "other"}
    )
    assert created2 is False
    assert again.id == user.id
    assert again.profile == {"display_name": "Alice"}  # profile only used on creation
    assert link2.data == {"hash": "h1"}  # data only used on creation
    assert (await store.get_user(user.id)).profile == {"display_name": "Alice"}
    fetched = await store.get_identity("password", "alice")
    assert fetched is not None and fetched.user_id == user.id
    assert await stored_counts(store) == (1, 1)


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_first_logins_create_one_user(store: ProfileStore) -> None:
    await store.open()
    results = await asyncio.gather(
        *(store.resolve_identity("password", "crowd", profile={"n": i}) for i in range(50))
    )
    user_ids = {user.id for user, _, _ in results}
    assert len(user_ids) == 1
    assert {link.user_id for _, link, _ in results} == user_ids
    assert sum(1 for _, _, created in results if created) == 1
    (user_id,) = user_ids
    assert len(await store.list_identities(user_id)) == 1
    assert await stored_counts(store) == (1, 1)


@pytest.mark.gen_test
async def test_create_identity_conflict_creates_nothing(store: ProfileStore) -> None:
    await store.open()
    user, link = await store.create_identity("password", "bob", profile={"display_name": "Bob"}, data={"hash": "x"})
    assert link.user_id == user.id
    assert user.profile == {"display_name": "Bob"}
    assert (await store.get_user(user.id)) is not None
    with pytest.raises(Conflict):
        await store.create_identity("password", "bob", profile={"display_name": "Impostor"})
    assert await stored_counts(store) == (1, 1)
    assert (await store.get_user(user.id)).profile == {"display_name": "Bob"}
    assert (await store.get_identity("password", "bob")).user_id == user.id


@pytest.mark.gen_test
async def test_link_identity(store: ProfileStore) -> None:
    await store.open()
    alice, _, _ = await store.resolve_identity("password", "alice")
    bob, _, _ = await store.resolve_identity("password", "bob")

    link = await store.link_identity(alice.id, "github", "42", data={"token": "t"})
    assert (link.provider, link.subject, link.user_id, link.data) == ("github", "42", alice.id, {"token": "t"})

    same = await store.link_identity(alice.id, "github", "42", data={"token": "ignored"})
    assert same.user_id == alice.id
    assert same.data == {"token": "t"}  # a no-op

    with pytest.raises(Conflict):
        await store.link_identity(bob.id, "github", "42")
    with pytest.raises(Conflict):
        await store.link_identity(bob.id, "password", "alice")
    with pytest.raises(KeyError):
        await store.link_identity("u_nobody", "github", "43")

    identities = await store.list_identities(alice.id)
    assert [(i.provider, i.subject) for i in identities] == [("password", "alice"), ("github", "42")]
    assert [i.subject for i in await store.list_identities(bob.id)] == ["bob"]
    assert await store.list_identities("u_nobody") == []
    assert await stored_counts(store) == (2, 3)


@pytest.mark.gen_test
async def test_update_identity_data_merges(store: ProfileStore) -> None:
    await store.open()
    await store.resolve_identity("password", "carol", data={"hash": "h1", "algo": "argon2"})
    await store.update_identity_data("password", "carol", {"hash": "h2", "failures": 0})
    link = await store.get_identity("password", "carol")
    assert link is not None
    assert link.data == {"hash": "h2", "algo": "argon2", "failures": 0}
    with pytest.raises(KeyError):
        await store.update_identity_data("password", "nobody", {"hash": "x"})


@pytest.mark.gen_test
async def test_update_profile_merges_and_none_removes(store: ProfileStore) -> None:
    await store.open()
    user, _, _ = await store.resolve_identity("password", "dave", profile={"display_name": "Dave", "city": "Oslo"})
    updated = await store.update_profile(user.id, {"city": None, "lang": "nb"})
    assert updated.id == user.id
    assert updated.profile == {"display_name": "Dave", "lang": "nb"}
    assert updated.updated_at >= user.updated_at - timedelta(milliseconds=1)
    assert (await store.get_user(user.id)).profile == {"display_name": "Dave", "lang": "nb"}
    # removing a field that is not there is fine
    assert (await store.update_profile(user.id, {"missing": None})).profile == {"display_name": "Dave", "lang": "nb"}


@pytest.mark.gen_test
async def test_update_profile_unknown_user_is_key_error(store: ProfileStore) -> None:
    await store.open()
    with pytest.raises(KeyError):
        await store.update_profile("u_nobody", {"display_name": "x"})
    assert await stored_counts(store) == (0, 0)


@pytest.mark.gen_test
async def test_unicode_round_trips(store: ProfileStore) -> None:
    await store.open()
    profile = {"display_name": "Band 🎸", "city": "广州", "nested": {"note": "naïve ☃"}}
    user, _, _ = await store.resolve_identity("password", "李雷", profile=profile, data={"hint": "🔑"})
    assert (await store.get_user(user.id)).profile == profile
    updated = await store.update_profile(user.id, {"motto": "頑張って 💪"})
    assert updated.profile["motto"] == "頑張って 💪"
    assert (await store.get_user(user.id)).profile == {**profile, "motto": "頑張って 💪"}
    link = await store.get_identity("password", "李雷")
    assert link is not None and link.subject == "李雷" and link.data == {"hint": "🔑"}
    if isinstance(store, SQLiteProfileStore):  # stored as real Unicode, not \u escapes
        with sqlite3.connect(store.path) as conn:
            (raw,) = conn.execute("SELECT profile FROM users WHERE id = ?", (user.id,)).fetchone()
        conn.close()
        assert "Band 🎸" in raw and "广州" in raw


@pytest.mark.gen_test
async def test_datetimes_are_aware_utc(store: ProfileStore) -> None:
    await store.open()
    user, link, _ = await store.resolve_identity("password", "erin")
    for value in (user.created_at, user.updated_at, link.created_at):
        assert_utc(value)
    fetched = await store.get_user(user.id)
    fetched_link = await store.get_identity("password", "erin")
    assert fetched is not None and fetched_link is not None
    for value in (fetched.created_at, fetched.updated_at, fetched_link.created_at):
        assert_utc(value)
    # stored precision may be coarser (BSON: milliseconds), never shifted
    assert abs(fetched.created_at - user.created_at) < timedelta(milliseconds=2)
    assert_utc((await store.update_profile(user.id, {"x": 1})).updated_at)
    assert all(i.created_at.utcoffset() == timedelta(0) for i in await store.list_identities(user.id))


# -- SQLite specifics -----------------------------------------------------------------


@pytest.mark.gen_test
async def test_sqlite_data_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "nested" / "dir" / "profiles.db")
    first = SQLiteProfileStore(path)
    await first.open()
    user, _, _ = await first.resolve_identity("password", "frank", profile={"display_name": "Band 🎸"}, data={"hash": "h"})
    await first.update_profile(user.id, {"city": "广州"})
    await first.link_identity(user.id, "github", "7")
    await first.close()

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

    second = SQLiteProfileStore(path)
    await second.open()
    try:
        again = await second.get_user(user.id)
        assert again is not None
        assert again.profile == {"display_name": "Band 🎸", "city": "广州"}
        assert again.created_at == user.created_at
        _, link, created = await second.resolve_identity("password", "frank")
        assert created is False and link.user_id == user.id and link.data == {"hash": "h"}
        assert [i.provider for i in await second.list_identities(user.id)] == ["password", "github"]
    finally:
        await second.close()


@pytest.mark.gen_test
async def test_sqlite_memory_database() -> None:
    store = SQLiteProfileStore(":memory:")
    await store.open()
    try:
        user, _, created = await store.resolve_identity("password", "gina")
        assert created and (await store.get_user(user.id)) is not None
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_sqlite_unwritable_path_is_unavailable_without_leaking_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = str(blocker / "x.db")
    store = SQLiteProfileStore(path)
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    exc = info.value
    assert exc.status == 503
    for text in (str(exc), exc.message, str(exc.body()), exc.log_message or ""):
        assert path not in text
        assert str(tmp_path) not in text
    # a failed open leaves the store unusable but well-behaved
    with pytest.raises(StoreUnavailable):
        await store.get_user("u_x")
    await store.close()


@pytest.mark.gen_test
async def test_sqlite_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteProfileStore(str(tmp_path / "p.db"))
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_user("u_x")


# -- MongoDB outage (no server needed) ---------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_mongodb_outage_unreachable_server_raises_store_unavailable_fast() -> None:
    url = "mongodb://gateway:s3cr3t-pa55@127.0.0.1:1/?authSource=admin"
    store = MongoProfileStore(url, f"gateway_outage_{_RUN_ID}", timeout=1.0)
    assert "s3cr3t" not in repr(store)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert time.monotonic() - started < 2.5
        exc = info.value
        assert exc.status == 503 and exc.headers.get("Retry-After") == "1"
        for text in (str(exc), exc.message, exc.log_message or ""):
            assert "s3cr3t" not in text and "gateway:" not in text
        assert exc.log_message  # something useful for the operator

        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.resolve_identity("password", "alice")
        assert time.monotonic() - started < 2.5
        assert "s3cr3t" not in (info.value.log_message or "")
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_mongodb_unopened_store_is_unavailable() -> None:
    store = MongoProfileStore("mongodb://127.0.0.1:1", "gateway_unopened")
    with pytest.raises(StoreUnavailable):
        await store.get_user("u_x")
    await store.close()


@pytest.mark.gen_test
async def test_sqlite_reads_do_not_wait_for_another_process_writing(tmp_path: Path) -> None:
    store = SQLiteProfileStore(str(tmp_path / "p.db"))
    await store.open()
    try:
        user, _, _ = await store.resolve_identity("password", "alice")
        other = sqlite3.connect(str(tmp_path / "p.db"))  # e.g. another worker, mid-write
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE users SET updated_at = updated_at")
        try:
            assert (await store.get_user(user.id)).id == user.id
            assert (await store.get_identity("password", "alice")).user_id == user.id
            assert [i.subject for i in await store.list_identities(user.id)] == ["alice"]
        finally:
            other.rollback()
            other.close()
    finally:
        await store.close()


def _open_and_login(path: str, results: Any) -> None:
    async def main() -> None:
        store = SQLiteProfileStore(path)
        await store.open()
        await store.resolve_identity("password", "alice")
        await store.close()

    try:
        asyncio.run(main())
        results.put("ok")
    except Exception as exc:  # reported to the test
        results.put(repr(exc))


def test_sqlite_file_opened_by_several_worker_processes_at_once(tmp_path: Path) -> None:
    """`server.workers > 1` starts processes that open a new file together."""
    import multiprocessing

    for round_ in range(8):
        path = str(tmp_path / f"p{round_}.db")
        results: Any = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=_open_and_login, args=(path, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 1


# -- plugins' records, for every store -------------------------------------------------

KEYS = Collection("demo_keys", key="id", unique=("secret_hash",), indexes=("user_id",))
TZ_PLUS_5 = timezone(timedelta(hours=5))


def same_store(store: ProfileStore) -> ProfileStore:
    """Another, un-opened store on the same backing database."""
    if isinstance(store, SQLiteProfileStore):
        return SQLiteProfileStore(store.path)
    assert isinstance(store, MongoProfileStore) and MONGODB_URL
    return MongoProfileStore(MONGODB_URL, store.database, timeout=5.0)


def key_record(key_id: str, user_id: str = "u_alice", **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": key_id, "user_id": user_id, "name": "CI 机器人 🤖", "scopes": ["orders:read"],
        "secret_hash": f"hash-of-{key_id}", "created_at": datetime.now(timezone.utc),
        "expires_at": None, "revoked_at": None, "meta": {"n": 1, "ok": True, "tags": ["a", "b"]},
    }
    record.update(fields)
    return record


def present(record: dict[str, Any] | None) -> dict[str, Any]:
    assert record is not None
    return record


def assert_same_record(got: dict[str, Any] | None, want: dict[str, Any]) -> None:
    """Equal, datetimes within the stores' precision (BSON: milliseconds) and UTC."""
    assert got is not None
    assert set(got) == set(want)
    for name, value in want.items():
        if isinstance(value, datetime):
            assert isinstance(got[name], datetime) and got[name].utcoffset() == timedelta(0), name
            assert abs(got[name] - value) < timedelta(milliseconds=2), name
        else:
            assert got[name] == value, name


@pytest.mark.gen_test
async def test_records_insert_get_find(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    # keys inserted out of their sort order: find answers in insertion order
    records = [key_record("k3"), key_record("k1", "u_bob"), key_record("k2"), key_record("k0")]
    for record in records:
        await keys.insert(record)
    assert_same_record(await keys.get("k1"), records[1])
    assert await keys.get("k9") is None
    assert [r["id"] for r in await keys.find("user_id", "u_alice")] == ["k3", "k2", "k0"]
    assert [r["id"] for r in await keys.find("user_id", "u_bob")] == ["k1"]
    assert await keys.find("user_id", "u_nobody") == []
    (by_hash,) = await keys.find("secret_hash", "hash-of-k2")
    assert_same_record(by_hash, records[2])
    assert [r["id"] for r in await keys.find("id", "k0")] == ["k0"]
    with pytest.raises(ValueError):
        await keys.find("name", "CI 机器人 🤖")  # neither key, unique nor indexed


@pytest.mark.gen_test
async def test_records_conflict_on_taken_key_or_unique_field_stores_nothing(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    first = key_record("k1", secret_hash="s3cr3t-hash-value")
    await keys.insert(first)

    with pytest.raises(Conflict) as info:
        await keys.insert(key_record("k1", "u_bob", secret_hash="other"))
    assert "id" in info.value.message
    with pytest.raises(Conflict) as info:
        await keys.insert(key_record("k2", "u_bob", secret_hash="s3cr3t-hash-value"))
    assert "secret_hash" in info.value.message
    for text in (info.value.message, str(info.value), info.value.log_message or ""):
        assert "s3cr3t" not in text
    assert_same_record(await keys.get("k1"), first)
    assert await keys.get("k2") is None
    assert await keys.find("user_id", "u_bob") == []
    assert await keys.find("secret_hash", "other") == []

    # an update to a taken value conflicts too, and writes nothing
    await keys.insert(key_record("k3", secret_hash="third"))
    with pytest.raises(Conflict) as info:
        await keys.update("k3", {"secret_hash": "s3cr3t-hash-value", "name": "changed"})
    assert "secret_hash" in info.value.message and "s3cr3t" not in info.value.message
    assert present(await keys.get("k3"))["name"] == "CI 机器人 🤖"
    assert [r["id"] for r in await keys.find("secret_hash", "third")] == ["k3"]


@pytest.mark.gen_test
async def test_records_unique_field_without_a_value_never_clashes(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    await keys.insert(key_record("k1", secret_hash=None))
    await keys.insert(key_record("k2", secret_hash=None))
    lacking = key_record("k3")
    del lacking["secret_hash"]
    await keys.insert(lacking)
    assert [r["id"] for r in await keys.find("secret_hash", None)] == ["k1", "k2", "k3"]
    assert "secret_hash" not in present(await keys.get("k3"))
    # a value set later is unique again; cleared, it frees the value
    assert present(await keys.update("k1", {"secret_hash": "h"}))["secret_hash"] == "h"
    with pytest.raises(Conflict):
        await keys.update("k2", {"secret_hash": "h"})
    await keys.update("k1", {"secret_hash": None})
    assert present(await keys.update("k2", {"secret_hash": "h"}))["secret_hash"] == "h"
    assert [r["id"] for r in await keys.find("secret_hash", "h")] == ["k2"]


@pytest.mark.gen_test
async def test_records_update_where_equal_and_none(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    await keys.insert(key_record("k1", name="ci", uses=3))
    lacking = key_record("k2")
    del lacking["revoked_at"]
    await keys.insert(lacking)

    updated = await keys.update("k1", {"name": "deploy", "note": "renamed"}, where={"name": "ci"})
    assert updated is not None and (updated["name"], updated["note"], updated["id"]) == ("deploy", "renamed", "k1")
    assert await keys.update("k1", {"name": "other"}, where={"name": "ci"}) is None  # no longer holds
    assert present(await keys.get("k1"))["name"] == "deploy"
    # numbers compare as numbers (3 == 3.0), never as booleans or strings
    assert await keys.update("k1", {"uses": 4}, where={"uses": "3"}) is None
    assert await keys.update("k1", {"uses": 4}, where={"uses": True}) is None
    assert present(await keys.update("k1", {"uses": 4}, where={"uses": 3.0}))["uses"] == 4

    now = datetime.now(timezone.utc)
    # None matches null and missing alike
    assert await keys.update("k1", {"revoked_at": now}, where={"revoked_at": None}) is not None
    assert await keys.update("k2", {"revoked_at": now}, where={"revoked_at": None}) is not None
    assert await keys.update("k2", {"revoked_at": now + timedelta(hours=1)}, where={"revoked_at": None}) is None
    assert abs(present(await keys.get("k2"))["revoked_at"] - now) < timedelta(milliseconds=2)
    # several conditions must all hold
    assert await keys.update("k1", {"name": "x"}, where={"name": "deploy", "user_id": "u_bob"}) is None
    assert present(await keys.update("k1", {"name": "x"}, where={"name": "deploy", "user_id": "u_alice"}))["name"] == "x"

    assert await keys.update("k9", {"name": "x"}) is None
    assert await keys.update("k9", {"name": "x"}, where={"name": None}) is None
    with pytest.raises(ValueError):
        await keys.update("k1", {"id": "k5"})  # the key never changes
    assert present(await keys.update("k1", {}))["id"] == "k1"  # nothing to change: the record
    assert await keys.update("k1", {}, where={"name": "y"}) is None


@pytest.mark.gen_test
async def test_records_update_where_below_datetimes_and_numbers(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    t0 = datetime(2030, 5, 1, 12, 0, tzinfo=timezone.utc)
    await keys.insert(key_record("k1", last_used_at=None, uses=10))
    await keys.insert(key_record("k2", last_used_at=t0, uses=10.5))
    lacking = key_record("k3")
    await keys.insert(lacking)

    # missing and null meet any bound
    assert await keys.update("k1", {"last_used_at": t0}, where={"last_used_at": Below(t0)}) is not None
    assert await keys.update("k3", {"last_used_at": t0}, where={"last_used_at": Below(t0)}) is not None
    # equal is not below
    assert await keys.update("k2", {"hit": 1}, where={"last_used_at": Below(t0)}) is None
    # compared as instants: 16:59:59+05:00 is before 12:00Z, 17:00:01+05:00 after it
    assert await keys.update("k2", {"hit": 1}, where={
        "last_used_at": Below(datetime(2030, 5, 1, 16, 59, 59, tzinfo=TZ_PLUS_5))}) is None
    got = await keys.update("k2", {"last_used_at": t0 + timedelta(minutes=1)}, where={
        "last_used_at": Below(datetime(2030, 5, 1, 17, 0, 1, tzinfo=TZ_PLUS_5))})
    assert got is not None and got["last_used_at"] == t0 + timedelta(minutes=1)
    # a value stored in another zone compares by its instant too
    await keys.insert(key_record("k4", last_used_at=datetime(2030, 5, 1, 17, 0, tzinfo=TZ_PLUS_5)))
    assert await keys.update("k4", {"hit": 1}, where={"last_used_at": Below(t0)}) is None
    assert await keys.update("k4", {"hit": 1}, where={"last_used_at": Below(t0 + timedelta(seconds=1))}) is not None

    # numbers: ints and floats together
    assert await keys.update("k1", {"hit": 1}, where={"uses": Below(10)}) is None
    assert await keys.update("k1", {"hit": 1}, where={"uses": Below(10.25)}) is not None
    assert await keys.update("k2", {"hit": 1}, where={"uses": Below(10)}) is None
    assert await keys.update("k2", {"hit": 1}, where={"uses": Below(11)}) is not None
    # a bound of another type is never met by a value
    assert await keys.update("k1", {"hit": 2}, where={"uses": Below("zzz")}) is None
    assert await keys.update("k1", {"hit": 2}, where={"last_used_at": Below(2**40)}) is None
    with pytest.raises(ValueError):
        await keys.update("k1", {"hit": 2}, where={"uses": Below(None)})


@pytest.mark.gen_test(timeout=30)
async def test_records_concurrent_conditional_updates_one_wins(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    await keys.insert(key_record("k1"))
    base = datetime.now(timezone.utc)
    results = await asyncio.gather(*(
        keys.update("k1", {"revoked_at": base + timedelta(seconds=i), "by": i}, where={"revoked_at": None})
        for i in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    stored = await keys.get("k1")
    assert stored is not None and stored["by"] == winners[0]["by"]
    assert stored["revoked_at"] == winners[0]["revoked_at"]


@pytest.mark.gen_test(timeout=30)
async def test_records_concurrent_first_use_of_a_collection(store: ProfileStore) -> None:
    await store.open()
    collection = Collection("demo_crowd", indexes=("group",))
    await asyncio.gather(*(store.records(collection).insert({"id": f"r{i}", "group": "g"}) for i in range(10)))
    assert sorted(r["id"] for r in await store.records(collection).find("group", "g")) == sorted(
        f"r{i}" for i in range(10))


@pytest.mark.gen_test
async def test_records_delete(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    await keys.insert(key_record("k1"))
    assert await keys.delete("k1") is True
    assert await keys.delete("k1") is False
    assert await keys.get("k1") is None
    await keys.insert(key_record("k1"))  # key and unique value are free again
    assert await keys.get("k1") is not None


@pytest.mark.gen_test
async def test_records_survive_reopen(store: ProfileStore) -> None:
    await store.open()
    record = key_record("k1", expires_at=datetime.now(timezone.utc) + timedelta(days=30))
    await store.records(KEYS).insert(record)
    await store.records(KEYS).insert(key_record("k2"))
    await store.close()

    again = same_store(store)
    await again.open()
    try:
        keys = again.records(KEYS)
        assert_same_record(await keys.get("k1"), record)
        assert [r["id"] for r in await keys.find("user_id", "u_alice")] == ["k1", "k2"]
        with pytest.raises(Conflict):
            await keys.insert(key_record("k3", secret_hash=record["secret_hash"]))
        await keys.insert(key_record("k3"))
        assert [r["id"] for r in await keys.find("user_id", "u_alice")] == ["k1", "k2", "k3"]
    finally:
        await again.close()


@pytest.mark.gen_test
async def test_records_datetimes_come_back_aware_utc(store: ProfileStore) -> None:
    await store.open()
    keys = store.records(KEYS)
    local = datetime(2031, 1, 2, 3, 4, 5, 678000, tzinfo=TZ_PLUS_5)
    await keys.insert(key_record("k1", created_at=local))
    got = await keys.get("k1")
    assert got is not None and got["created_at"].utcoffset() == timedelta(0)
    assert got["created_at"] == local  # the same instant
    assert got["created_at"].hour == 22 and got["created_at"].day == 1
    updated = await keys.update("k1", {"expires_at": local + timedelta(days=1)})
    assert updated is not None and updated["expires_at"].utcoffset() == timedelta(0)
    assert present(await keys.get("k1"))["expires_at"] == local + timedelta(days=1)
    (found,) = await keys.find("user_id", "u_alice")
    assert found["created_at"] == local and found["created_at"].utcoffset() == timedelta(0)
    with pytest.raises(ValueError):
        await keys.insert(key_record("k2", created_at=datetime(2031, 1, 1)))  # naive
    with pytest.raises(ValueError):
        await keys.insert(key_record("k2", meta={"when": datetime.now(timezone.utc)}))  # nested
    assert await keys.get("k2") is None


@pytest.mark.gen_test
async def test_records_refuse_bad_names_and_values(store: ProfileStore) -> None:
    for name in ("", "Keys", "1keys", "my-keys", "my keys", "my.keys", "kéys", "k" * 49, "keys\0"):
        with pytest.raises(ValueError):
            store.records(Collection(name))
    store.records(Collection("k" * 48))
    for bad in (Collection("demo_a", key="my-id"), Collection("demo_b", unique=("a.b",)),
                Collection("demo_c", indexes=("$x",)), Collection("demo_d", indexes=["x"]),  # type: ignore[arg-type]
                Collection("demo_e", unique=("email",), indexes=("Email",))):
        with pytest.raises(ValueError):
            store.records(bad)
    store.records(KEYS)
    with pytest.raises(ValueError):  # one name, one declaration
        store.records(Collection(KEYS.name, indexes=("name",)))

    await store.open()
    keys = store.records(KEYS)
    for record in ({"user_id": "u"}, {"id": 7}, {"id": "k", "_secret": 1}, {"id": "k", "$x": 1},
                   {"id": "k", "a.b": 1}, {"id": "k", "n": float("nan")}, {"id": "k", "n": 2**64},
                   {"id": "k", "o": {"$dt": "x"}}, {"id": "k", "s": {1, 2}}):
        with pytest.raises(ValueError):
            await keys.insert(record)
    assert await keys.get("k") is None


@pytest.mark.gen_test
async def test_records_of_two_collections_are_independent(store: ProfileStore) -> None:
    await store.open()
    first = store.records(KEYS)
    second = store.records(Collection("other_keys", unique=("secret_hash",), indexes=("user_id",)))
    await first.insert(key_record("k1", name="first"))
    await second.insert(key_record("k1", name="second"))  # same key, same unique value
    assert present(await first.get("k1"))["name"] == "first"
    assert present(await second.get("k1"))["name"] == "second"
    assert await first.delete("k1") is True
    assert await first.get("k1") is None
    assert present(await second.get("k1"))["name"] == "second"
    assert [r["name"] for r in await second.find("user_id", "u_alice")] == ["second"]


@pytest.mark.gen_test
async def test_records_fields_declared_later_are_indexed_and_unique(store: ProfileStore) -> None:
    await store.open()
    plain = Collection("demo_evolve")
    await store.records(plain).insert({"id": "a", "email": "x@example.com", "team": "t1"})
    await store.records(plain).insert({"id": "b", "email": "y@example.com", "team": "t1"})
    await store.close()

    later = same_store(store)
    await later.open()
    try:
        records = later.records(Collection("demo_evolve", unique=("email",), indexes=("team",)))
        assert [r["id"] for r in await records.find("email", "y@example.com")] == ["b"]
        assert [r["id"] for r in await records.find("team", "t1")] == ["a", "b"]
        with pytest.raises(Conflict):
            await records.insert({"id": "c", "email": "x@example.com"})
    finally:
        await later.close()

    # no longer unique: the value may be shared again
    last = same_store(store)
    await last.open()
    try:
        records = last.records(Collection("demo_evolve", indexes=("team",)))
        await records.insert({"id": "c", "email": "x@example.com", "team": "t2"})
        assert [r["id"] for r in await records.find("team", "t2")] == ["c"]
    finally:
        await last.close()


@pytest.mark.gen_test
async def test_sqlite_records_of_a_closed_store_are_unavailable(tmp_path: Path) -> None:
    store = SQLiteProfileStore(str(tmp_path / "p.db"))
    keys: Records = store.records(KEYS)
    with pytest.raises(StoreUnavailable):  # not open yet
        await keys.get("k1")
    await store.open()
    await keys.insert(key_record("k1"))
    await store.close()
    with pytest.raises(StoreUnavailable):
        await keys.get("k1")
    with pytest.raises(StoreUnavailable):
        await keys.update("k1", {"name": "x"}, where={"revoked_at": None})


@pytest.mark.gen_test
async def test_sqlite_records_are_stored_as_readable_json(tmp_path: Path) -> None:
    store = SQLiteProfileStore(str(tmp_path / "p.db"))
    await store.open()
    try:
        await store.records(KEYS).insert(key_record("k1", name="Band 🎸"))
    finally:
        await store.close()
    with sqlite3.connect(store.path) as conn:
        (doc,) = conn.execute("SELECT doc FROM plugin_demo_keys WHERE key = 'k1'").fetchone()
    conn.close()
    assert "Band 🎸" in doc and '"$dt"' in doc


# -- the one-off move of legacy API keys --------------------------------------------------

LEGACY_SCHEMA = """
CREATE TABLE users (
    id TEXT PRIMARY KEY, profile TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE identities (
    key TEXT PRIMARY KEY, provider TEXT NOT NULL, subject TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id), data TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL);
CREATE INDEX identities_user_id ON identities(user_id);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id), name TEXT NOT NULL,
    scopes TEXT NOT NULL DEFAULT '[]', secret_hash TEXT NOT NULL, created_at TEXT NOT NULL,
    expires_at TEXT, revoked_at TEXT, last_used_at TEXT);
CREATE INDEX api_keys_user_id ON api_keys(user_id);
INSERT INTO users VALUES ('u_old', '{}', '2025-01-01T00:00:00.000000+00:00', '2025-01-01T00:00:00.000000+00:00');
INSERT INTO api_keys VALUES ('00000000000000bb', 'u_old', 'second', '["orders:read"]', 'ab', '2025-02-01T00:00:00.000000+00:00',
    '2026-02-01T00:00:00.000000+00:00', '2025-03-01T10:00:00.123456+00:00', NULL);
INSERT INTO api_keys VALUES ('00000000000000aa', 'u_old', 'CI 机器人', '["orders:read","orders:write"]', 'cd',
    '2025-01-15T00:00:00.000000+00:00', NULL, NULL, '2025-01-20T08:30:00.000000+00:00');
"""

APIKEY_COLLECTION = Collection("apikey_keys", key="id", indexes=("user_id",))


@pytest.mark.gen_test
async def test_sqlite_legacy_api_keys_move_to_the_plugin_collection(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY_SCHEMA)
    conn.close()

    first_use = datetime(2025, 1, 20, 8, 30, tzinfo=timezone.utc)
    for round_ in range(2):  # the second open finds nothing left to move, and keeps the first's writes
        store = SQLiteProfileStore(path, migrations=(sqlite_api_keys,))
        await store.open()
        try:
            keys = store.records(APIKEY_COLLECTION)
            listed = await keys.find("user_id", "u_old")
            assert [k["id"] for k in listed] == ["00000000000000aa", "00000000000000bb"]  # oldest first
            assert listed[0] == {
                "id": "00000000000000aa", "user_id": "u_old", "name": "CI 机器人",
                "scopes": ["orders:read", "orders:write"], "secret_hash": "cd",
                "created_at": datetime(2025, 1, 15, tzinfo=timezone.utc), "expires_at": None,
                "revoked_at": None, "last_used_at": listed[0]["last_used_at"] if round_ else first_use,
            }
            if round_:
                assert_utc(listed[0]["last_used_at"])
            second = await keys.get("00000000000000bb")
            assert second is not None
            assert second["revoked_at"] == datetime(2025, 3, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
            assert second["expires_at"] == datetime(2026, 2, 1, tzinfo=timezone.utc)
            assert second["revoked_at"].utcoffset() == timedelta(0)
            # the moved records behave like any others
            if not round_:
                touched = await keys.update("00000000000000aa", {"last_used_at": datetime.now(timezone.utc)},
                                            where={"last_used_at": Below(datetime(2025, 6, 1, tzinfo=timezone.utc))})
                assert touched is not None
            assert (await store.get_user("u_old")) is not None
        finally:
            await store.close()

    # the old table stays for older versions still running (or brought back),
    # and a key one of them makes meanwhile is copied at the next open
    with sqlite3.connect(path) as conn:
        kept = conn.execute("SELECT id, secret_hash FROM api_keys ORDER BY id").fetchall()
        conn.execute("INSERT INTO api_keys VALUES ('00000000000000cc', 'u_old', 'made by an older version', '[]', "
                     "'ef', '2025-04-01T00:00:00.000000+00:00', NULL, NULL, NULL)")
    conn.close()
    assert kept == [("00000000000000aa", "cd"), ("00000000000000bb", "ab")]  # nothing lost
    store = SQLiteProfileStore(path, migrations=(sqlite_api_keys,))
    await store.open()
    try:
        listed = await store.records(APIKEY_COLLECTION).find("user_id", "u_old")
        assert [k["id"] for k in listed] == ["00000000000000aa", "00000000000000bb", "00000000000000cc"]
        assert listed[0]["last_used_at"] != first_use  # the copy made earlier was not overwritten
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_sqlite_new_file_has_no_api_key_table(tmp_path: Path) -> None:
    store = SQLiteProfileStore(str(tmp_path / "new.db"))
    await store.open()
    await store.close()
    with sqlite3.connect(store.path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"users", "identities"}


@pytest.mark.gen_test
async def test_mongodb_legacy_api_keys_move_to_the_plugin_collection() -> None:
    if not MONGODB_URL:
        pytest.skip(MONGODB_SKIP)
    from pymongo import AsyncMongoClient

    database = f"gateway_test_{_RUN_ID}_{next(_DB_COUNTER)}"
    created = datetime(2025, 1, 15, tzinfo=timezone.utc)
    client: Any = AsyncMongoClient(MONGODB_URL, tz_aware=True)
    try:
        await client[database].api_keys.insert_many([
            {"_id": "00000000000000bb", "user_id": "u_old", "name": "second", "scopes": ["orders:read"],
             "secret_hash": "ab", "created_at": created + timedelta(days=1), "expires_at": None,
             "revoked_at": created + timedelta(days=2), "last_used_at": None},
            {"_id": "00000000000000aa", "user_id": "u_old", "name": "first", "scopes": [],
             "secret_hash": "cd", "created_at": created, "expires_at": None, "revoked_at": None,
             "last_used_at": None},
        ])
        for _ in range(2):
            store = MongoProfileStore(MONGODB_URL, database, timeout=5.0, migrations=(mongodb_api_keys,))
            await store.open()
            try:
                keys = store.records(APIKEY_COLLECTION)
                listed = await keys.find("user_id", "u_old")
                assert [k["id"] for k in listed] == ["00000000000000aa", "00000000000000bb"]
                assert listed[0] == {"id": "00000000000000aa", "user_id": "u_old", "name": "first", "scopes": [],
                                     "secret_hash": "cd", "created_at": created, "expires_at": None,
                                     "revoked_at": None, "last_used_at": None}
                assert listed[1]["revoked_at"] == created + timedelta(days=2)
                assert listed[1]["revoked_at"].utcoffset() == timedelta(0)
            finally:
                await store.close()
        names = set(await client[database].list_collection_names())
        assert "api_keys" in names  # left for older versions still running
        assert await client[database].api_keys.count_documents({}) == 2
    finally:
        await client.drop_database(database)
        await client.close()
