"""The MongoDB profile store as production meets it: outages answered 503
`unavailable` fast and without the URL's password, the URL's own timeouts
in force, one user per identity however creates race or are retried, and a
primary step-down that yields only successes or 503s.

The outage tests need no server: they point a real ``AsyncMongoClient`` at
ports nothing listens on.  The others run against the server named by
``GATEWAY_TEST_MONGODB_URL`` (each on a database of its own, dropped
afterwards) and are reported as skipped without it; the step-down test also
needs that server to be a replica set (``hello`` names a ``setName``) and
the URL's user the right to run ``replSetStepDown``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import quote

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, OperationFailure

from gateway.api import Collection
from gateway.errors import Conflict, StoreUnavailable
from gateway.profiles.mongodb import MongoProfileStore, client_options
from gateway.testing import free_port

MONGODB_URL = os.environ.get("GATEWAY_TEST_MONGODB_URL")
MONGODB_SKIP = (
    "MongoDB server tests skipped: set GATEWAY_TEST_MONGODB_URL to a MongoDB server URL to run them"
)
_RUN_ID = uuid.uuid4().hex[:10]
#: what replSetStepDown itself may answer as the primary steps down
#: (PrimarySteppedDown, InterruptedDueToReplStateChange, ShutdownInProgress)
INTERRUPTED_BY_STEP_DOWN = (189, 11602, 91)
UNAUTHORIZED = 13

PASSWORD = "s3cr3t/p@ss:w0rd"
QUOTED = quote(PASSWORD, safe="")
SECRETS = (PASSWORD, QUOTED, "s3cr3t", f"gateway:{QUOTED}")


def _texts(exc: StoreUnavailable) -> list[str]:
    return [str(exc), exc.message, json.dumps(exc.body()), exc.log_message or "", repr(exc)]


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} in {text!r}"


# -- outages, no server needed ------------------------------------------------------


def test_client_options_leave_the_urls_own_settings_alone() -> None:
    assert client_options("mongodb://127.0.0.1:27017", 1.0) == {
        "timeoutMS": 1000, "serverSelectionTimeoutMS": 1000, "connectTimeoutMS": 1000,
        "appname": "session-gateway"}
    url = (f"mongodb://gateway:{QUOTED}@db1:27017,db2:27017/gateway?replicaSet=rs0&TIMEOUTMS=5000"
           "&connectTimeoutMS=2000&appName=orders")
    assert client_options(url, 0.25) == {"serverSelectionTimeoutMS": 250}
    assert client_options("mongodb+srv://cluster0.example.net/?serverSelectionTimeoutMS=3000", 2) == {
        "timeoutMS": 2000, "connectTimeoutMS": 2000, "appname": "session-gateway"}
    # a ? in the (escaped) password is not the start of the options
    assert "timeoutMS" in client_options("mongodb://u:a%3Ftimeoutms%3D1@h/db", 1.0)


@pytest.mark.gen_test(timeout=60)
async def test_closed_port_answers_unavailable_fast_and_without_the_password(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    url = (f"mongodb://gateway:{QUOTED}@127.0.0.1:{port}/gateway?authSource=admin&w=majority"
           "&readPreference=primary&retryWrites=true")
    store = MongoProfileStore(url, f"gateway_closed_{_RUN_ID}", timeout=0.5)
    _assert_no_secret(repr(store))
    records = store.records(Collection("demo_keys", key="id", unique=("secret_hash",)))
    calls: list[tuple[str, Any]] = [
        ("open", store.open),
        ("get_user", lambda: store.get_user("u_x")),
        ("get_identity", lambda: store.get_identity("password", "alice")),
        ("resolve_identity", lambda: store.resolve_identity("password", "alice")),
        ("create_identity", lambda: store.create_identity("password", "bob", data={"hash": "h"})),
        ("link_identity", lambda: store.link_identity("u_x", "github", "7")),
        ("update_profile", lambda: store.update_profile("u_x", {"nickname": "x"})),
        ("update_identity_data", lambda: store.update_identity_data("password", "alice", {"n": 1})),
        ("list_identities", lambda: store.list_identities("u_x")),
        ("records.insert", lambda: records.insert({"id": "k1", "secret_hash": "h"})),
        ("records.get", lambda: records.get("k1")),
    ]
    try:
        for name, call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await call()
            elapsed = time.monotonic() - started
            assert elapsed < 2.0, f"{name} took {elapsed:.2f}s"
            exc = info.value
            assert exc.status == 503 and exc.code == "unavailable" and exc.headers.get("Retry-After") == "1"
            assert exc.store == "profile store"
            assert exc.log_message and "mongodb" in exc.log_message, name
            _assert_no_secret(*_texts(exc))
    finally:
        await store.close()
    _assert_no_secret(caplog.text, *(r.getMessage() for r in caplog.records))


@pytest.mark.gen_test(timeout=30)
async def test_the_replica_set_url_of_the_docs_answers_unavailable_fast_without_the_password() -> None:
    hosts = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    url = (f"mongodb://gateway:{QUOTED}@{hosts}/gateway?replicaSet=rs0&w=majority"
           "&readPreference=primary&retryWrites=true&tls=true")
    store = MongoProfileStore(url, "gateway", timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert time.monotonic() - started < 2.5
        _assert_no_secret(*_texts(info.value))
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_urls_own_timeouts_win_over_the_configured_one() -> None:
    port = free_port()
    shorter = MongoProfileStore(f"mongodb://127.0.0.1:{port}/?timeoutMS=300", "gateway", timeout=10.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await shorter.open()
        assert time.monotonic() - started < 2.0  # not the configured 10 s
    finally:
        await shorter.close()

    longer = MongoProfileStore(f"mongodb://127.0.0.1:{port}/?timeoutMS=1500", "gateway", timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await longer.open()
        elapsed = time.monotonic() - started
        assert 1.3 < elapsed < 4.0  # the URL's 1.5 s, not the configured 0.2 s
    finally:
        await longer.close()


# -- against a real server ------------------------------------------------------------


@pytest.fixture
def mongo_store(io_loop: Any) -> Any:
    """An opened store on a database of its own, dropped afterwards."""
    if not MONGODB_URL:
        pytest.skip(MONGODB_SKIP)
    url = MONGODB_URL
    database = f"gateway_prod_{_RUN_ID}_{uuid.uuid4().hex[:6]}"
    store = MongoProfileStore(url, database, timeout=1.0)
    io_loop.run_sync(store.open, timeout=30)
    yield store

    async def finish() -> None:
        await store.close()
        client: Any = AsyncMongoClient(url, serverSelectionTimeoutMS=30000)
        try:
            await client.drop_database(database)
        finally:
            await client.close()

    io_loop.run_sync(finish, timeout=60)


async def _stored(store: MongoProfileStore) -> tuple[set[str], dict[str, str]]:
    """(the user ids, identity key -> user id), as the database holds them,
    read from the primary."""
    assert MONGODB_URL
    client: Any = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=30000, readPreference="primary")
    try:
        db = client[store.database]
        users = {doc["_id"] for doc in await db.users.find({}, {"_id": 1}).to_list(None)}
        links = {doc["_id"]: doc["user_id"] for doc in await db.identities.find({}, {"user_id": 1}).to_list(None)}
        return users, links
    finally:
        await client.close()


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_and_retried_creates_of_one_identity_make_one_user(mongo_store: MongoProfileStore) -> None:
    store = mongo_store
    for n in range(20):
        subject = f"reg{n}"
        results = await asyncio.gather(
            store.create_identity("password", subject, profile={"by": "first"}, data={"hash": "a"}),
            store.create_identity("password", subject, profile={"by": "second"}, data={"hash": "b"}),
            return_exceptions=True)
        made = [r for r in results if isinstance(r, tuple)]
        assert len(made) == 1, results
        assert sum(isinstance(r, Conflict) for r in results) == 1, results
        user, link = made[0]
        stored = await store.get_identity("password", subject)
        assert stored is not None and stored.user_id == user.id == link.user_id
        with pytest.raises(Conflict):  # the registration retried after it succeeded
            await store.create_identity("password", subject, profile={"by": "retry"})
        # a first login racing a registration of the same identity joins it
        raced = await asyncio.gather(
            store.create_identity("wechat", subject), store.resolve_identity("wechat", subject),
            store.resolve_identity("wechat", subject), return_exceptions=True)
        assert all(isinstance(r, (tuple, Conflict)) for r in raced), raced
        ids = {r[0].id for r in raced if isinstance(r, tuple)}
        assert len(ids) == 1, raced

    users, links = await _stored(store)
    assert len(links) == 40
    assert set(links.values()) == users  # one user per identity, none left over
    assert len(users) == 40


@pytest.mark.gen_test(timeout=180)
async def test_a_step_down_during_profile_writes_yields_successes_or_503_and_no_duplicate(
        mongo_store: MongoProfileStore) -> None:
    store = mongo_store
    assert MONGODB_URL
    admin: Any = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=30000)
    try:
        hello = await admin.admin.command("hello")
        if not hello.get("setName"):
            pytest.skip("step-down test skipped: GATEWAY_TEST_MONGODB_URL is not a replica set "
                        "(its hello names no setName)")

        existing = {f"s{n}": (await store.resolve_identity("stepdown", f"s{n}"))[0].id for n in range(10)}
        seen: dict[str, set[str]] = defaultdict(set)
        outcomes: Counter[str] = Counter()
        stepped = asyncio.Event()
        refused: list[OperationFailure] = []

        async def step_down() -> None:
            await asyncio.sleep(1.0)
            try:
                await admin.admin.command(
                    {"replSetStepDown": 5, "secondaryCatchUpPeriodSecs": 2, "force": True})
            except ConnectionFailure:
                pass  # the stepping-down primary may drop the connection
            except OperationFailure as exc:
                if exc.code not in INTERRUPTED_BY_STEP_DOWN:
                    refused.append(exc)
            stepped.set()

        async def one(i: int) -> None:
            subject = f"s{i % 10}"
            match i % 5:
                case 0:  # a login of an existing identity
                    user, _, created = await store.resolve_identity("stepdown", subject)
                    assert not created and user.id == existing[subject]
                case 1:  # first logins, some repeated
                    user, _, _ = await store.resolve_identity("fresh", f"f{i % 40}")
                    seen[f"fresh:f{i % 40}"].add(user.id)
                case 2:  # registrations, retried once they succeeded
                    try:
                        user, _ = await store.create_identity("registered", f"r{i % 30}", data={"hash": "h"})
                        seen[f"registered:r{i % 30}"].add(user.id)
                    except Conflict:
                        outcomes["conflict"] += 1
                case 3:
                    await store.update_profile(existing[subject], {"n": i})
                case _:
                    await store.update_identity_data("stepdown", subject, {"n": i})

        task = asyncio.ensure_future(step_down())
        deadline = time.monotonic() + 120
        i = streak = 0
        while not (stepped.is_set() and streak >= 50):
            assert time.monotonic() < deadline, f"no primary came back: {outcomes}"
            started = time.monotonic()
            try:
                await one(i)
                outcomes["ok"] += 1
                streak += 1
            except StoreUnavailable as exc:  # the only failure allowed: 503 unavailable
                assert exc.status == 503 and exc.code == "unavailable"
                outcomes["503"] += 1
                streak = 0
                await asyncio.sleep(0.05)
            assert time.monotonic() - started < 5.0, "a profile store call took longer than its timeouts allow"
            i += 1
        await task
        for failure in refused:
            if failure.code == UNAUTHORIZED:
                pytest.skip("step-down test skipped: the user of GATEWAY_TEST_MONGODB_URL may not run "
                            "replSetStepDown (it needs the clusterManager role)")
            pytest.fail(f"replSetStepDown failed: code {failure.code}")

        # no duplicate: each identity always gave the same user, the one its link names
        users, links = await _stored(store)
        for key, ids in seen.items():
            assert len(ids) == 1, (key, ids)
            assert links[key] in ids
        for subject, user_id in existing.items():
            assert links[f"stepdown:{subject}"] == user_id
        assert set(links.values()) <= users  # no link names a missing user
        # a user no link names is only left by a write whose outcome a 503 left unknown
        assert len(users - set(links.values())) <= outcomes["503"]
        for subject, user_id in existing.items():
            user, _, created = await store.resolve_identity("stepdown", subject)
            assert user.id == user_id and not created
    finally:
        await admin.close()
