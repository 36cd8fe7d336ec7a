"""One contract suite for both session stores: memory and a real redis-server.

(Counters and shared values are the shared state's: see test_state.py.)
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.sessions.manager import Session, SessionManager, hash_token
from gateway.sessions.memory import MemorySessionStore
from gateway.sessions.redis import RedisSessionStore


@pytest.fixture(params=["memory", "redis"])
def store(request, io_loop):
    if request.param == "memory":
        s = MemorySessionStore()
    else:
        s = RedisSessionStore(request.getfixturevalue("redis_url"))
    io_loop.run_sync(s.open)
    yield s
    io_loop.run_sync(s.close)


def record(sid: str, user: str = "u1", token: str | None = None, created: float | None = None) -> dict:
    now = created or time.time()
    return Session(id=sid, user_id=user, provider="password", created_at=now, last_seen_at=now,
                   expires_at=now + 60, absolute_expires_at=now + 600,
                   token_hash=hash_token(token or f"tok-{sid}")).to_record()


@pytest.mark.gen_test
async def test_create_lookup_get_delete(store):
    await store.create(record("s1"), 60, 0)
    assert (await store.lookup(hash_token("tok-s1")))["id"] == "s1"
    assert (await store.get("s1"))["user_id"] == "u1"
    assert await store.lookup(hash_token("other")) is None
    gone = await store.delete("s1")
    assert gone["id"] == "s1"
    assert await store.lookup(hash_token("tok-s1")) is None
    assert await store.get("s1") is None
    assert await store.delete("s1") is None


@pytest.mark.gen_test
async def test_ttl_makes_sessions_vanish(store):
    await store.create(record("s1"), 0.3, 0)
    await asyncio.sleep(0.5)
    assert await store.lookup(hash_token("tok-s1")) is None
    assert await store.get("s1") is None
    assert await store.list_user("u1") == []


@pytest.mark.gen_test
async def test_save_extends_but_never_resurrects(store):
    rec = record("s1")
    await store.create(rec, 0.4, 0)
    rec["last_seen_at"] = 123.0
    assert await store.save(rec, 60) is True
    await asyncio.sleep(0.5)
    assert (await store.get("s1"))["last_seen_at"] == 123.0
    assert await store.lookup(hash_token("tok-s1")) is not None  # the token's TTL moved too
    await store.delete("s1")
    assert await store.save(rec, 60) is False
    assert await store.get("s1") is None


@pytest.mark.gen_test
async def test_rotate_keeps_old_token_for_grace_only(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    rec["prev_token_hash"] = rec["token_hash"]
    rec["token_hash"] = hash_token("new")
    assert await store.rotate(rec, 60, 0.3) is True
    assert (await store.lookup(hash_token("new")))["id"] == "s1"
    assert (await store.lookup(hash_token("tok-s1")))["id"] == "s1"
    await asyncio.sleep(0.5)
    assert await store.lookup(hash_token("tok-s1")) is None
    assert (await store.lookup(hash_token("new")))["id"] == "s1"


@pytest.mark.gen_test
async def test_list_user_oldest_first_and_per_user(store):
    base = time.time()
    for i, sid in enumerate(["a", "b", "c"]):
        await store.create(record(sid, created=base + i), 60, 0)
    await store.create(record("x", user="u2"), 60, 0)
    assert [r["id"] for r in await store.list_user("u1")] == ["a", "b", "c"]
    assert [r["id"] for r in await store.list_user("u2")] == ["x"]
    await store.delete("b")
    assert [r["id"] for r in await store.list_user("u1")] == ["a", "c"]


@pytest.mark.gen_test
async def test_max_per_user_evicts_oldest(store):
    base = time.time()
    for i in range(3):
        evicted = await store.create(record(f"s{i}", created=base + i), 60, 2)
    assert [r["id"] for r in evicted] == ["s0"]
    assert await store.lookup(hash_token("tok-s0")) is None
    assert [r["id"] for r in await store.list_user("u1")] == ["s1", "s2"]


@pytest.mark.gen_test
async def test_manager_touch_writes_at_most_once_per_interval(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0.3, rotation_grace=5)
    token, session = await mgr.create("u1", "password")
    first = (await store.get(session.id))["last_seen_at"]
    await mgr.authenticate(token)
    assert (await store.get(session.id))["last_seen_at"] == first
    await asyncio.sleep(0.35)
    await mgr.authenticate(token)
    later = await store.get(session.id)
    assert later["last_seen_at"] > first
    assert later["absolute_expires_at"] == session.absolute_expires_at


@pytest.mark.gen_test
async def test_store_ttl_is_min_of_idle_and_absolute(redis_url, redis_server):
    store = RedisSessionStore(redis_url)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=100, absolute_timeout=20, touch_interval=0, rotation_grace=5)
        token, session = await mgr.create("u1", "password")
        pttl = int(redis_server.command("PTTL", f"gw:s:{session.id}").strip().lstrip(":"))
        assert 15_000 < pttl <= 20_000
        raw_keys = redis_server.command("KEYS", "*")
        assert token not in raw_keys and hash_token(token) in raw_keys
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_memory_store_sweeps_what_expired():
    store = MemorySessionStore()
    await store.create(record("old"), 0.05, 0)
    await store.create(record("live"), 60, 0)
    await asyncio.sleep(0.1)
    store.sweep()
    assert set(store._sessions) == {"live"}
    assert list(store._tokens) == [hash_token("tok-live")]
    assert list(store._users["u1"]) == ["live"]


@pytest.mark.gen_test
async def test_redis_store_over_a_unix_socket(tmp_path):
    import shutil
    import subprocess

    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        store = RedisSessionStore(f"unix://{sock}?db=0")
        await store.open()
        await store.create(record("s1"), 60, 0)
        assert (await store.lookup(hash_token("tok-s1")))["id"] == "s1"
        await store.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.gen_test
async def test_save_is_compare_and_set_on_the_current_token(store):
    """A touch that read the record before a /refresh must not undo the rotation."""
    rec = record("s1")
    await store.create(rec, 60, 0)
    stale = dict(rec, last_seen_at=rec["last_seen_at"] + 5)      # what a concurrent request read
    rotated = dict(rec, prev_token_hash=rec["token_hash"], token_hash=hash_token("new"))
    assert await store.rotate(rotated, 60, 5) is True
    assert await store.save(stale, 60) is False                      # the touch loses
    assert (await store.get("s1"))["token_hash"] == hash_token("new")
    assert await store.rotate(dict(rotated, token_hash=hash_token("newer")), 60, 5) is False  # a second refresh too


@pytest.mark.gen_test
async def test_manager_touch_racing_a_refresh_keeps_the_new_token(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=0.2)
    token, session = await mgr.create("u1", "password")
    seen_by_request = await mgr.authenticate(token)                  # request A reads...
    new_token, _ = await mgr.refresh(Session.from_record(seen_by_request.to_record()))  # ...a refresh lands...
    assert await store.save(seen_by_request.to_record(), 60) is False  # ...and A's touch cannot write
    assert (await mgr.authenticate(token)) is not None               # old token: still in its grace
    await asyncio.sleep(0.3)
    assert await mgr.authenticate(token) is None
    assert (await mgr.authenticate(new_token)).id == session.id


# -- superseded tokens: remembered as long as the session, for reuse detection --


def rotated(rec: dict, new_token: str, keep: int = 16) -> dict:
    """``rec`` after /refresh replaced its token with ``new_token``."""
    return dict(rec, prev_token_hash=rec["token_hash"], token_hash=hash_token(new_token),
                superseded_hashes=(list(rec.get("superseded_hashes") or []) + [rec["token_hash"]])[-keep:])


@pytest.mark.gen_test
async def test_superseded_tokens_outlive_their_grace(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    assert await store.lookup_superseded(hash_token("tok-s1")) is None  # still the current token
    rec = rotated(rec, "new")
    assert await store.rotate(rec, 60, 0.2) is True
    assert (await store.lookup_superseded(hash_token("tok-s1")))["id"] == "s1"
    await asyncio.sleep(0.3)
    assert await store.lookup(hash_token("tok-s1")) is None               # no longer opens the session...
    assert (await store.lookup_superseded(hash_token("tok-s1")))["id"] == "s1"  # ...but is remembered
    assert await store.lookup_superseded(hash_token("new")) is None
    assert await store.lookup_superseded(hash_token("never-issued")) is None


@pytest.mark.gen_test
async def test_a_touch_keeps_superseded_tokens_as_long_as_the_session(store):
    rec = record("s1")
    await store.create(rec, 0.4, 0)
    rec = rotated(rec, "new")
    assert await store.rotate(rec, 0.4, 0.1) is True
    assert await store.save(rec, 60) is True
    await asyncio.sleep(0.5)
    assert (await store.lookup_superseded(hash_token("tok-s1")))["id"] == "s1"


@pytest.mark.gen_test
async def test_superseded_tokens_vanish_with_their_session(store):
    rec = record("s1")
    await store.create(rec, 0.3, 0)
    assert await store.rotate(rotated(rec, "new"), 0.3, 0.1) is True
    await asyncio.sleep(0.4)
    assert await store.lookup_superseded(hash_token("tok-s1")) is None

    rec = record("s2")
    await store.create(rec, 60, 0)
    assert await store.rotate(rotated(rec, "new2"), 60, 5) is True
    await store.delete("s2")
    assert await store.lookup_superseded(hash_token("tok-s2")) is None


@pytest.mark.gen_test
async def test_superseded_tokens_the_record_drops_are_forgotten(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    for i in range(4):
        rec = rotated(rec, f"t{i}", keep=2)
        assert await store.rotate(rec, 60, 5) is True
    # kept: the last two replaced tokens (t1, t2); t3 is current
    assert rec["superseded_hashes"] == [hash_token("t1"), hash_token("t2")]
    for gone in ("tok-s1", "t0"):
        assert await store.lookup_superseded(hash_token(gone)) is None
    for kept in ("t1", "t2"):
        assert (await store.lookup_superseded(hash_token(kept)))["id"] == "s1"


@pytest.mark.gen_test
async def test_evicted_sessions_forget_their_superseded_tokens(store):
    base = time.time()
    first = record("s0", created=base)
    await store.create(first, 60, 1)
    assert await store.rotate(rotated(first, "s0-new"), 60, 5) is True
    await store.create(record("s1", created=base + 1), 60, 1)   # evicts s0
    assert await store.get("s0") is None
    assert await store.lookup_superseded(hash_token("tok-s0")) is None


@pytest.mark.gen_test
async def test_redis_keeps_no_superseded_key_beyond_its_session(redis_url, redis_server):
    store = RedisSessionStore(redis_url)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=100, absolute_timeout=20, touch_interval=0, rotation_grace=1)
        token, session = await mgr.create("u1", "password")
        await mgr.refresh(session)
        key = f"gw:r:{hash_token(token)}"
        pttl = int(redis_server.command("PTTL", key).strip().lstrip(":"))
        assert 15_000 < pttl <= 20_000                                  # the session's TTL, not the grace
        assert token not in redis_server.command("KEYS", "*")
        await mgr.revoke(session.id, "logout")
        assert redis_server.command("EXISTS", key).strip() == ":0"
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_manager_finds_a_reused_token_in_grace_and_after(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=0.2)
    t0, session = await mgr.create("u1", "password")
    t1, _ = await mgr.refresh(session)
    now = time.time()
    assert (await mgr.find_reused(t0, presented_at=now)).id == session.id    # in its grace
    assert await mgr.find_reused(t1, presented_at=now) is None                # the current token
    assert await mgr.find_reused("gws_unknown", presented_at=now) is None
    # a request that arrived before the rotation, or within the race window, only lost a race: no reuse
    assert await mgr.find_reused(t0, presented_at=session.created_at) is None
    assert await mgr.find_reused(t0, presented_at=now, race_window=5) is None
    await asyncio.sleep(0.3)
    assert (await mgr.find_reused(t0, presented_at=time.time())).id == session.id  # after its grace
    assert (await mgr.end_reused(await mgr.find_reused(t0, presented_at=time.time()))).id == session.id
    assert await store.get(session.id) is None
    assert await mgr.authenticate(t1) is None


@pytest.mark.gen_test
async def test_manager_remembers_a_bounded_number_of_superseded_tokens(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=0)
    first, session = await mgr.create("u1", "password")
    tokens = [first]
    for _ in range(mgr.KEEP_SUPERSEDED + 3):
        token, session = await mgr.refresh(session)
        tokens.append(token)
    assert len(session.superseded_hashes) == mgr.KEEP_SUPERSEDED
    now = time.time()
    assert await mgr.find_reused(tokens[0], presented_at=now) is None         # too old to remember
    assert (await mgr.find_reused(tokens[-2], presented_at=now)).id == session.id
    assert (await mgr.find_reused(tokens[-1 - mgr.KEEP_SUPERSEDED], presented_at=now)).id == session.id


@pytest.mark.gen_test
async def test_memory_store_sweeps_superseded_tokens_too():
    store = MemorySessionStore()
    rec = record("old")
    await store.create(rec, 0.05, 0)
    await store.rotate(rotated(rec, "old-new"), 0.05, 0.01)
    live = record("live")
    await store.create(live, 60, 0)
    await store.rotate(rotated(live, "live-new"), 60, 5)
    await asyncio.sleep(0.1)
    store.sweep()
    assert list(store._superseded) == [hash_token("tok-live")]


# -- markers: how a token's session ended, without anything that opens it --


@pytest.fixture(params=["memory", "redis"])
def store_with(request, io_loop):
    """``await store_with(retention)`` -> an opened store of each kind."""
    made = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    async def make(retention: float):
        s = MemorySessionStore(retention=retention) if not url else RedisSessionStore(url, retention=retention)
        await s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        io_loop.run_sync(s.close)


@pytest.mark.gen_test
async def test_a_token_is_marked_expired_from_the_start_and_stays_known_past_its_session(store):
    await store.create(record("s1"), 0.3, 0)
    assert await store.ended(hash_token("tok-s1")) == "expired"   # written now, spoken only once it is dead
    assert await store.ended(hash_token("never-issued")) is None
    await asyncio.sleep(0.5)
    assert await store.lookup(hash_token("tok-s1")) is None
    assert await store.ended(hash_token("tok-s1")) == "expired"    # nobody wrote at expiry time


@pytest.mark.gen_test
async def test_a_touch_keeps_the_expired_marker_as_long_as_the_session(store_with):
    store = await store_with(0.3)
    rec = record("s1")
    await store.create(rec, 0.3, 0)
    assert await store.save(rec, 2) is True
    await asyncio.sleep(0.8)                      # past the first TTL plus the retention
    assert (await store.lookup(hash_token("tok-s1")))["id"] == "s1"
    assert await store.ended(hash_token("tok-s1")) == "expired"


@pytest.mark.gen_test
async def test_rotation_marks_the_old_token_superseded_and_deletion_marks_every_token_revoked(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    rec = rotated(rec, "new")
    assert await store.rotate(rec, 60, 0.1) is True
    assert await store.ended(hash_token("tok-s1")) == "superseded"
    assert await store.ended(hash_token("new")) == "expired"
    rec = rotated(rec, "newer")
    assert await store.rotate(rec, 60, 0.1) is True
    assert await store.save(rec, 60) is True      # a touch renews the markers, changing none
    assert [await store.ended(hash_token(t)) for t in ("tok-s1", "new", "newer")] == \
        ["superseded", "superseded", "expired"]
    await store.delete("s1")
    for t in ("tok-s1", "new", "newer"):
        assert await store.ended(hash_token(t)) == "revoked", t


@pytest.mark.gen_test
async def test_evicted_sessions_are_marked_revoked(store):
    base = time.time()
    await store.create(record("s0", created=base), 60, 1)
    await store.create(record("s1", created=base + 1), 60, 1)
    assert await store.ended(hash_token("tok-s0")) == "revoked"
    assert await store.ended(hash_token("tok-s1")) == "expired"


@pytest.mark.gen_test
async def test_markers_last_the_retention_and_none_are_kept_without_one(store_with):
    short = await store_with(0.3)
    await short.create(record("s1"), 60, 0)
    await short.delete("s1")
    assert await short.ended(hash_token("tok-s1")) == "revoked"
    await asyncio.sleep(0.5)
    assert await short.ended(hash_token("tok-s1")) is None

    none = await store_with(0)
    rec = record("s2")
    await none.create(rec, 60, 0)
    assert await none.rotate(rotated(rec, "s2-new"), 60, 5) is True
    assert await none.ended(hash_token("tok-s2")) is None
    await none.delete("s2")
    assert await none.ended(hash_token("s2-new")) is None


@pytest.mark.gen_test
async def test_a_redis_marker_holds_a_reason_only(redis_url, redis_server):
    store = RedisSessionStore(redis_url, retention=100)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=20, absolute_timeout=600, touch_interval=0, rotation_grace=1)
        token, session = await mgr.create("u1", "password")
        key = f"gw:e:{hash_token(token)}"
        assert redis_server.command("GET", key).endswith("expired\r\n")
        pttl = int(redis_server.command("PTTL", key).strip().lstrip(":"))
        assert 115_000 < pttl <= 120_000                               # the session's TTL plus the retention
        await mgr.revoke(session.id, "logout")
        assert redis_server.command("GET", key).endswith("revoked\r\n")
        pttl = int(redis_server.command("PTTL", key).strip().lstrip(":"))
        assert 95_000 < pttl <= 100_000                                # the retention
        # nothing of the session is left, and no key holds the token itself
        keys = redis_server.command("KEYS", "*")
        assert session.id not in keys and token not in keys
        assert "password" not in redis_server.command("GET", key)
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_manager_says_why_a_token_opens_no_session(store):
    mgr = SessionManager(store, idle_timeout=0.3, absolute_timeout=600, touch_interval=0, rotation_grace=0.1)
    expiring, _ = await mgr.create("u1", "password")
    t0, session = await mgr.create("u1", "password")
    t1, session = await mgr.refresh(session)
    revoked, other = await mgr.create("u1", "password")
    await mgr.revoke(other.id, "logout")
    assert await mgr.ended_reason(revoked) == "revoked"
    assert await mgr.ended_reason("gws_never-issued") == "invalid"
    assert await mgr.ended_reason("x" * 600) == "invalid"
    await asyncio.sleep(0.4)
    assert await mgr.authenticate(expiring) is None and await mgr.ended_reason(expiring) == "expired"
    assert await mgr.authenticate(t0) is None and await mgr.ended_reason(t0) == "superseded"


@pytest.mark.gen_test
async def test_manager_remembered_sessions_keep_their_own_timeouts(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=1,
                         remember_idle_timeout=3600, remember_absolute_timeout=86400)
    assert mgr.absolute_timeout == 86400
    _, plain = await mgr.create("u1", "password")
    token, kept = await mgr.create("u1", "password", remember=True)
    assert not plain.remembered and plain.absolute_expires_at - plain.created_at == pytest.approx(600)
    assert kept.remembered and kept.absolute_expires_at - kept.created_at == pytest.approx(86400)
    assert kept.expires_at - kept.created_at == pytest.approx(3600)
    touched = await mgr.authenticate(token)
    assert touched.expires_at - touched.last_seen_at == pytest.approx(3600)
    _, again = await mgr.refresh(touched)
    assert again.remembered and again.expires_at - again.last_seen_at == pytest.approx(3600)
    assert again.absolute_expires_at == kept.absolute_expires_at
    assert (await store.get(kept.id))["remembered"] is True
