"""Contract tests for the profile stores, run against every backend.

``sqlite`` always runs (on a file under ``tmp_path``).  ``mongodb`` runs only
when ``GATEWAY_TEST_MONGODB_URL`` names a MongoDB server; each test then gets
its own database, dropped afterwards.  The MongoDB outage test needs no
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

from gateway.errors import Conflict, StoreUnavailable
from gateway.profiles.base import ApiKey, ProfileStore
from gateway.profiles.mongodb import MongoProfileStore
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


# -- API keys, for every store -------------------------------------------------------


def _api_key(key_id: str, user_id: str, **fields: Any) -> ApiKey:
    values: dict[str, Any] = {
        "name": "ci bot", "scopes": ["orders:read", "orders:write"], "secret_hash": "ab" * 32,
        "created_at": datetime.now(timezone.utc), "expires_at": None,
    }
    values.update(fields)
    return ApiKey(id=key_id, user_id=user_id, **values)


async def api_key_count(store: ProfileStore) -> int:
    """API key records as held by the backing database itself."""
    if isinstance(store, SQLiteProfileStore):
        with sqlite3.connect(store.path) as conn:
            count = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
        conn.close()
        return count
    from pymongo import AsyncMongoClient

    assert isinstance(store, MongoProfileStore)
    client: Any = AsyncMongoClient(MONGODB_URL)
    try:
        return await client[store.database].api_keys.count_documents({})
    finally:
        await client.close()


@pytest.mark.gen_test
async def test_api_key_create_and_get_round_trip(store: ProfileStore) -> None:
    await store.open()
    user, _, _ = await store.resolve_identity("password", "alice")
    expires = datetime.now(timezone.utc) + timedelta(days=30)
    await store.create_api_key(_api_key("0123456789abcdef", user.id, name="CI 机器人 🤖", expires_at=expires))
    got = await store.get_api_key("0123456789abcdef")
    assert got is not None
    assert (got.id, got.user_id, got.name, got.scopes, got.secret_hash) == (
        "0123456789abcdef", user.id, "CI 机器人 🤖", ["orders:read", "orders:write"], "ab" * 32)
    assert got.revoked_at is None and got.last_used_at is None
    assert got.expires_at is not None and abs(got.expires_at - expires) < timedelta(milliseconds=2)
    assert_utc(got.created_at)
    assert got.expires_at.utcoffset() == timedelta(0)
    assert await store.get_api_key("fedcba9876543210") is None

    await store.create_api_key(_api_key("1111111111111111", user.id, scopes=[]))
    no_expiry = await store.get_api_key("1111111111111111")
    assert no_expiry is not None and no_expiry.expires_at is None and no_expiry.scopes == []
    assert await api_key_count(store) == 2


@pytest.mark.gen_test
async def test_api_key_duplicate_id_conflicts_and_unknown_user_is_key_error(store: ProfileStore) -> None:
    await store.open()
    alice, _, _ = await store.resolve_identity("password", "alice")
    bob, _, _ = await store.resolve_identity("password", "bob")
    await store.create_api_key(_api_key("0123456789abcdef", alice.id, name="first"))
    with pytest.raises(Conflict):
        await store.create_api_key(_api_key("0123456789abcdef", bob.id, name="second"))
    with pytest.raises(KeyError):
        await store.create_api_key(_api_key("2222222222222222", "u_nobody"))
    kept = await store.get_api_key("0123456789abcdef")
    assert kept is not None and (kept.user_id, kept.name) == (alice.id, "first")
    assert await store.get_api_key("2222222222222222") is None
    assert await api_key_count(store) == 1


@pytest.mark.gen_test
async def test_api_key_list_is_per_user_oldest_first_revoked_included(store: ProfileStore) -> None:
    await store.open()
    alice, _, _ = await store.resolve_identity("password", "alice")
    bob, _, _ = await store.resolve_identity("password", "bob")
    start = datetime.now(timezone.utc)
    # created out of order: the listing follows created_at
    await store.create_api_key(_api_key("000000000000000b", alice.id, name="second", created_at=start + timedelta(seconds=1)))
    await store.create_api_key(_api_key("000000000000000a", alice.id, name="first", created_at=start))
    await store.create_api_key(_api_key("000000000000000c", bob.id, name="bob's"))
    await store.create_api_key(_api_key("000000000000000d", alice.id, name="third", created_at=start + timedelta(seconds=2)))
    await store.revoke_api_key("000000000000000b", datetime.now(timezone.utc))
    listed = await store.list_api_keys(alice.id)
    assert [k.name for k in listed] == ["first", "second", "third"]
    assert [k.revoked_at is not None for k in listed] == [False, True, False]
    assert [k.name for k in await store.list_api_keys(bob.id)] == ["bob's"]
    assert await store.list_api_keys("u_nobody") == []


@pytest.mark.gen_test
async def test_api_key_revoke_once(store: ProfileStore) -> None:
    await store.open()
    user, _, _ = await store.resolve_identity("password", "alice")
    await store.create_api_key(_api_key("0123456789abcdef", user.id))
    first = datetime.now(timezone.utc)
    revoked = await store.revoke_api_key("0123456789abcdef", first)
    assert revoked is not None and revoked.revoked_at is not None
    assert abs(revoked.revoked_at - first) < timedelta(milliseconds=2)
    # revoking again keeps the first time
    again = await store.revoke_api_key("0123456789abcdef", first + timedelta(hours=1))
    assert again is not None and again.revoked_at == revoked.revoked_at
    stored = await store.get_api_key("0123456789abcdef")
    assert stored is not None and stored.revoked_at == revoked.revoked_at
    assert_utc(stored.revoked_at)
    assert await store.revoke_api_key("fedcba9876543210", first) is None
    assert await api_key_count(store) == 1


@pytest.mark.gen_test
async def test_api_key_touch_writes_at_most_once_per_interval(store: ProfileStore) -> None:
    await store.open()
    user, _, _ = await store.resolve_identity("password", "alice")
    await store.create_api_key(_api_key("0123456789abcdef", user.id))
    interval = timedelta(minutes=1)
    t0 = datetime.now(timezone.utc)
    assert await store.touch_api_key("0123456789abcdef", t0, t0 - interval) is True
    stored = await store.get_api_key("0123456789abcdef")
    assert stored is not None and stored.last_used_at is not None
    assert abs(stored.last_used_at - t0) < timedelta(milliseconds=2)
    assert_utc(stored.last_used_at)

    # within the interval (another process, say): nothing written
    t1 = t0 + timedelta(seconds=30)
    assert await store.touch_api_key("0123456789abcdef", t1, t1 - interval) is False
    assert (await store.get_api_key("0123456789abcdef")).last_used_at == stored.last_used_at

    # of concurrent touches for one interval, exactly one writes
    t2 = t0 + timedelta(seconds=61)
    results = await asyncio.gather(*(store.touch_api_key("0123456789abcdef", t2, t2 - interval) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    later = await store.get_api_key("0123456789abcdef")
    assert later is not None and abs(later.last_used_at - t2) < timedelta(milliseconds=2)

    assert await store.touch_api_key("fedcba9876543210", t2, t2 - interval) is False


@pytest.mark.gen_test
async def test_sqlite_existing_database_gains_api_keys(tmp_path: Path) -> None:
    """A file made before API keys existed gets the table on open."""
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE users (id TEXT PRIMARY KEY, profile TEXT NOT NULL DEFAULT '{}',"
            " created_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
            "INSERT INTO users VALUES ('u_old', '{}', '2025-01-01T00:00:00.000000+00:00',"
            " '2025-01-01T00:00:00.000000+00:00');"
        )
    conn.close()
    store = SQLiteProfileStore(path)
    await store.open()
    try:
        await store.create_api_key(_api_key("0123456789abcdef", "u_old"))
        assert [k.id for k in await store.list_api_keys("u_old")] == ["0123456789abcdef"]
    finally:
        await store.close()
    reopened = SQLiteProfileStore(path)
    await reopened.open()
    try:
        assert (await reopened.get_api_key("0123456789abcdef")) is not None
    finally:
        await reopened.close()


@pytest.mark.gen_test
async def test_sqlite_closed_store_api_keys_unavailable(tmp_path: Path) -> None:
    store = SQLiteProfileStore(str(tmp_path / "p.db"))
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.get_api_key("0123456789abcdef")
    with pytest.raises(StoreUnavailable):
        await store.touch_api_key("0123456789abcdef", datetime.now(timezone.utc), datetime.now(timezone.utc))
