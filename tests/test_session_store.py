"""One contract suite for both session stores: memory and a real redis-server.

(Counters and shared values are the shared state's: see test_state.py.)
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import pytest
from redis.crc import key_slot

from gateway.logs import redact
from gateway.proxy.policy import SESSION_TOKENS
from gateway.sessions.base import SLOT_TAGS, all_slot_tags, hash_tag, new_session_id, session_tag, slot_tag
from gateway.sessions.manager import Session, SessionManager, hash_token
from gateway.sessions.memory import MemorySessionStore
from gateway.sessions.redis import RedisSessionStore


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
def store(request, io_loop):
    if request.param == "memory":
        s = MemorySessionStore()
    elif request.param in ("sentinel", "cluster"):  # Redis Sentinel, Redis Cluster (gateway.testing.redis_modes)
        s = RedisSessionStore(options=request.getfixturevalue(f"redis_{request.param}_options"))
    else:
        s = RedisSessionStore(request.getfixturevalue("redis_url"))
    io_loop.run_sync(s.open)
    yield s
    io_loop.run_sync(s.close)


def S(name: str, user: str = "u1") -> str:
    """The id of the test session ``name`` of ``user`` (carrying the user's slot tag)."""
    return new_session_id(slot_tag(user), name)


def T(name: str, user: str = "u1") -> str:
    """The test token ``name`` of a session of ``user``."""
    return f"gws_{slot_tag(user)}_{name}"


def H(name: str, user: str = "u1") -> str:
    """The hash of the test token ``name`` of a session of ``user``."""
    return hash_token(T(name, user))


def redis_key(kind: str, name: str, user: str = "u1") -> str:
    """The Redis key of kind ``kind`` (``s``, ``t``, ``r``, ``e``, ``u``) and ``name`` of ``user``."""
    return f"gw:{{{slot_tag(user)}}}:{kind}:{name}"


def record(sid: str, user: str = "u1", token: str | None = None, created: float | None = None) -> dict:
    now = created or time.time()
    return Session(id=S(sid, user), user_id=user, provider="password", created_at=now, last_seen_at=now,
                   expires_at=now + 60, absolute_expires_at=now + 600,
                   token_hash=H(token or f"tok-{sid}", user)).to_record()


@pytest.mark.gen_test
async def test_create_lookup_get_delete(store):
    await store.create(record("s1"), 60, 0)
    assert (await store.lookup(H("tok-s1")))["id"] == S("s1")
    assert (await store.get(S("s1")))["user_id"] == "u1"
    assert await store.lookup(H("other")) is None
    gone = await store.delete(S("s1"))
    assert gone["id"] == S("s1")
    assert await store.lookup(H("tok-s1")) is None
    assert await store.get(S("s1")) is None
    assert await store.delete(S("s1")) is None


@pytest.mark.gen_test
async def test_ttl_makes_sessions_vanish(store):
    await store.create(record("s1"), 0.3, 0)
    await asyncio.sleep(0.5)
    assert await store.lookup(H("tok-s1")) is None
    assert await store.get(S("s1")) is None
    assert await store.list_user("u1") == []


@pytest.mark.gen_test
async def test_save_extends_but_never_resurrects(store):
    rec = record("s1")
    await store.create(rec, 0.4, 0)
    rec["last_seen_at"] = 123.0
    assert await store.save(rec, 60) is True
    await asyncio.sleep(0.5)
    assert (await store.get(S("s1")))["last_seen_at"] == 123.0
    assert await store.lookup(H("tok-s1")) is not None  # the token's TTL moved too
    await store.delete(S("s1"))
    assert await store.save(rec, 60) is False
    assert await store.get(S("s1")) is None


@pytest.mark.gen_test
async def test_rotate_keeps_old_token_for_grace_only(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    rec["prev_token_hash"] = rec["token_hash"]
    rec["token_hash"] = H("new")
    assert await store.rotate(rec, 60, 0.3) is True
    assert (await store.lookup(H("new")))["id"] == S("s1")
    assert (await store.lookup(H("tok-s1")))["id"] == S("s1")
    await asyncio.sleep(0.5)
    assert await store.lookup(H("tok-s1")) is None
    assert (await store.lookup(H("new")))["id"] == S("s1")


@pytest.mark.gen_test
async def test_list_user_oldest_first_and_per_user(store):
    base = time.time()
    for i, sid in enumerate(["a", "b", "c"]):
        await store.create(record(sid, created=base + i), 60, 0)
    await store.create(record("x", user="u2"), 60, 0)
    assert [r["id"] for r in await store.list_user("u1")] == [S("a"), S("b"), S("c")]
    assert [r["id"] for r in await store.list_user("u2")] == [S("x", "u2")]
    await store.delete(S("b"))
    assert [r["id"] for r in await store.list_user("u1")] == [S("a"), S("c")]


@pytest.mark.gen_test
async def test_max_per_user_evicts_oldest(store):
    base = time.time()
    for i in range(3):
        evicted = await store.create(record(f"s{i}", created=base + i), 60, 2)
    assert [r["id"] for r in evicted] == [S("s0")]
    assert await store.lookup(H("tok-s0")) is None
    assert [r["id"] for r in await store.list_user("u1")] == [S("s1"), S("s2")]


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
        pttl = int(redis_server.command("PTTL", redis_key("s", session.id)).strip().lstrip(":"))
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
    assert set(store._sessions) == {S("live")}
    assert list(store._tokens) == [H("tok-live")]
    assert list(store._users["u1"]) == [S("live")]


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
        assert (await store.lookup(H("tok-s1")))["id"] == S("s1")
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
    rotated = dict(rec, prev_token_hash=rec["token_hash"], token_hash=H("new"))
    assert await store.rotate(rotated, 60, 5) is True
    assert await store.save(stale, 60) is False                      # the touch loses
    assert (await store.get(S("s1")))["token_hash"] == H("new")
    assert await store.rotate(dict(rotated, token_hash=H("newer")), 60, 5) is False  # a second refresh too


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
    return dict(rec, prev_token_hash=rec["token_hash"], token_hash=H(new_token, rec["user_id"]),
                superseded_hashes=(list(rec.get("superseded_hashes") or []) + [rec["token_hash"]])[-keep:])


@pytest.mark.gen_test
async def test_superseded_tokens_outlive_their_grace(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    assert await store.lookup_superseded(H("tok-s1")) is None  # still the current token
    rec = rotated(rec, "new")
    assert await store.rotate(rec, 60, 0.2) is True
    assert (await store.lookup_superseded(H("tok-s1")))["id"] == S("s1")
    await asyncio.sleep(0.3)
    assert await store.lookup(H("tok-s1")) is None               # no longer opens the session...
    assert (await store.lookup_superseded(H("tok-s1")))["id"] == S("s1")  # ...but is remembered
    assert await store.lookup_superseded(H("new")) is None
    assert await store.lookup_superseded(H("never-issued")) is None


@pytest.mark.gen_test
async def test_a_touch_keeps_superseded_tokens_as_long_as_the_session(store):
    rec = record("s1")
    await store.create(rec, 0.4, 0)
    rec = rotated(rec, "new")
    assert await store.rotate(rec, 0.4, 0.1) is True
    assert await store.save(rec, 60) is True
    await asyncio.sleep(0.5)
    assert (await store.lookup_superseded(H("tok-s1")))["id"] == S("s1")


@pytest.mark.gen_test
async def test_superseded_tokens_vanish_with_their_session(store):
    rec = record("s1")
    await store.create(rec, 0.3, 0)
    assert await store.rotate(rotated(rec, "new"), 0.3, 0.1) is True
    await asyncio.sleep(0.4)
    assert await store.lookup_superseded(H("tok-s1")) is None

    rec = record("s2")
    await store.create(rec, 60, 0)
    assert await store.rotate(rotated(rec, "new2"), 60, 5) is True
    await store.delete(S("s2"))
    assert await store.lookup_superseded(H("tok-s2")) is None


@pytest.mark.gen_test
async def test_superseded_tokens_the_record_drops_are_forgotten(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    for i in range(4):
        rec = rotated(rec, f"t{i}", keep=2)
        assert await store.rotate(rec, 60, 5) is True
    # kept: the last two replaced tokens (t1, t2); t3 is current
    assert rec["superseded_hashes"] == [H("t1"), H("t2")]
    for gone in ("tok-s1", "t0"):
        assert await store.lookup_superseded(H(gone)) is None
    for kept in ("t1", "t2"):
        assert (await store.lookup_superseded(H(kept)))["id"] == S("s1")


@pytest.mark.gen_test
async def test_evicted_sessions_forget_their_superseded_tokens(store):
    base = time.time()
    first = record("s0", created=base)
    await store.create(first, 60, 1)
    assert await store.rotate(rotated(first, "s0-new"), 60, 5) is True
    await store.create(record("s1", created=base + 1), 60, 1)   # evicts s0
    assert await store.get(S("s0")) is None
    assert await store.lookup_superseded(H("tok-s0")) is None


@pytest.mark.gen_test
async def test_redis_keeps_no_superseded_key_beyond_its_session(redis_url, redis_server):
    store = RedisSessionStore(redis_url)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=100, absolute_timeout=20, touch_interval=0, rotation_grace=1)
        token, session = await mgr.create("u1", "password")
        await mgr.refresh(session)
        key = redis_key("r", hash_token(token))
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
    assert list(store._superseded) == [H("tok-live")]


# -- markers: how a token's session ended, without anything that opens it --


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
def store_with(request, io_loop):
    """``await store_with(retention)`` -> an opened store of each kind."""
    made = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    options = request.getfixturevalue(f"redis_{request.param}_options") if request.param in ("sentinel", "cluster") \
        else None

    async def make(retention: float):
        s = MemorySessionStore(retention=retention) if not (url or options) else \
            RedisSessionStore(url, retention=retention, options=options)
        await s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        io_loop.run_sync(s.close)


@pytest.mark.gen_test
async def test_a_token_is_marked_expired_from_the_start_and_stays_known_past_its_session(store):
    await store.create(record("s1"), 0.3, 0)
    assert await store.ended(H("tok-s1")) == "expired"   # written now, spoken only once it is dead
    assert await store.ended(H("never-issued")) is None
    await asyncio.sleep(0.5)
    assert await store.lookup(H("tok-s1")) is None
    assert await store.ended(H("tok-s1")) == "expired"    # nobody wrote at expiry time


@pytest.mark.gen_test
async def test_a_touch_keeps_the_expired_marker_as_long_as_the_session(store_with):
    store = await store_with(0.3)
    rec = record("s1")
    await store.create(rec, 0.3, 0)
    assert await store.save(rec, 2) is True
    await asyncio.sleep(0.8)                      # past the first TTL plus the retention
    assert (await store.lookup(H("tok-s1")))["id"] == S("s1")
    assert await store.ended(H("tok-s1")) == "expired"


@pytest.mark.gen_test
async def test_rotation_marks_the_old_token_superseded_and_deletion_marks_every_token_revoked(store):
    rec = record("s1")
    await store.create(rec, 60, 0)
    rec = rotated(rec, "new")
    assert await store.rotate(rec, 60, 0.1) is True
    assert await store.ended(H("tok-s1")) == "superseded"
    assert await store.ended(H("new")) == "expired"
    rec = rotated(rec, "newer")
    assert await store.rotate(rec, 60, 0.1) is True
    assert await store.save(rec, 60) is True      # a touch renews the markers, changing none
    assert [await store.ended(H(t)) for t in ("tok-s1", "new", "newer")] == \
        ["superseded", "superseded", "expired"]
    await store.delete(S("s1"))
    for t in ("tok-s1", "new", "newer"):
        assert await store.ended(H(t)) == "revoked", t


@pytest.mark.gen_test
async def test_evicted_sessions_are_marked_revoked(store):
    base = time.time()
    await store.create(record("s0", created=base), 60, 1)
    await store.create(record("s1", created=base + 1), 60, 1)
    assert await store.ended(H("tok-s0")) == "revoked"
    assert await store.ended(H("tok-s1")) == "expired"


@pytest.mark.gen_test
async def test_markers_last_the_retention_and_none_are_kept_without_one(store_with):
    short = await store_with(0.3)
    await short.create(record("s1"), 60, 0)
    await short.delete(S("s1"))
    assert await short.ended(H("tok-s1")) == "revoked"
    await asyncio.sleep(0.5)
    assert await short.ended(H("tok-s1")) is None

    none = await store_with(0)
    rec = record("s2")
    await none.create(rec, 60, 0)
    assert await none.rotate(rotated(rec, "s2-new"), 60, 5) is True
    assert await none.ended(H("tok-s2")) is None
    await none.delete(S("s2"))
    assert await none.ended(H("s2-new")) is None


@pytest.mark.gen_test
async def test_a_redis_marker_holds_a_reason_only(redis_url, redis_server):
    store = RedisSessionStore(redis_url, retention=100)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=20, absolute_timeout=600, touch_interval=0, rotation_grace=1)
        token, session = await mgr.create("u1", "password")
        key = redis_key("e", hash_token(token))
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


# -- the key layout: everything of one user under one hash tag (Redis Cluster ready) --


def tagged_users(tag: str, n: int) -> list[str]:
    """``n`` user ids whose slot tag is ``tag``."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        if slot_tag(f"user-{i}") == tag:
            found.append(f"user-{i}")
        i += 1
    return found


def test_slot_tags_are_three_hex_digits_spread_over_1024_buckets():
    tags = {slot_tag(f"user-{i}") for i in range(20_000)}
    assert all(re.fullmatch(r"[0-3][0-9a-f]{2}", t) for t in tags)
    assert len(tags) == SLOT_TAGS == len(all_slot_tags()) == len(set(all_slot_tags()))
    assert slot_tag("alice") == slot_tag("alice")
    assert slot_tag("\udcff-not-utf-8") in all_slot_tags()


@pytest.mark.gen_test
async def test_tokens_and_session_ids_carry_the_users_slot_tag(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=5)
    token, session = await mgr.create("alice", "password")
    tag = slot_tag("alice")
    assert re.fullmatch(rf"gws_{tag}_[A-Za-z0-9_\-]{{43}}", token)
    assert re.fullmatch(rf"s_{tag}_[A-Za-z0-9_\-]{{16}}", session.id) and session_tag(session.id) == tag
    assert session.token_hash == hash_token(token) == f"{tag}." + hashlib.sha256(token.encode()).hexdigest()
    assert hash_tag(session.token_hash) == tag
    new, session = await mgr.refresh(session)
    assert new.startswith(f"gws_{tag}_") and hash_tag(session.token_hash) == tag
    # the shapes the rest of the gateway relies on: a credential, a session id in a URL path
    assert SESSION_TOKENS.within(f"/x?t={new}") and re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", session.id)
    assert redact(f"Authorization: Bearer {new}.") == "Authorization: Bearer gws_[redacted]."


GARBAGE = ["", "s1", "s_", "s_zzz_abc", "s_400_abc", "s_3FF_abc", "s_000", "s_000_", "s_000_a/b", "s_000_{x}",
           "{000}", "gw:{000}:s:x", "s_000_" + "a" * 65, "s_000_é", "\udcff", "x" * 600,
           hashlib.sha256(b"x").hexdigest(), "000." + "a" * 63, "000." + "A" * 64, "400." + "a" * 64,
           "000." + "a" * 64 + "}", "{000}." + "a" * 64]


@pytest.mark.gen_test
async def test_malformed_session_ids_and_token_hashes_find_nothing(store):
    await store.create(record("s1"), 60, 0)
    for value in GARBAGE:
        assert await store.get(value) is None, value
        assert await store.delete(value) is None, value
        assert await store.lookup(value) is None, value
        assert await store.lookup_superseded(value) is None, value
        assert await store.ended(value) is None, value
    assert await store.get(S("s1")) is not None


@pytest.mark.gen_test
async def test_a_token_without_a_tag_opens_nothing_and_is_invalid(store):
    mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=5)
    token, session = await mgr.create("alice", "password")
    untagged = "gws_" + token[len("gws_xxx_"):]  # the shape of a token from before tags
    forged = token[:4] + ("000" if token[4:7] != "000" else "001") + token[7:]  # another tag
    for other in (untagged, forged, "gws_" + "A" * 43, "gws_3ff_"):
        assert await mgr.authenticate(other) is None, other
        assert await mgr.ended_reason(other) == "invalid", other
        assert await mgr.find_reused(other, presented_at=time.time()) is None, other
    assert (await mgr.authenticate(token)).id == session.id


@pytest.mark.gen_test
async def test_redis_puts_every_key_of_a_user_in_one_hash_slot(redis_url):
    store = RedisSessionStore(redis_url, retention=100)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=5,
                             max_per_user=2)
        users = ["alice", "bob", "用户-3", "{braces}", "a:b"]
        for user in users:
            await mgr.create(user, "password")
            token, session = await mgr.create(user, "password")
            await mgr.authenticate(token)                       # a touch
            token, session = await mgr.refresh(session)         # a rotation: t:, r:, e: of the old token
            _, ended = await mgr.create(user, "password")       # evicts the first (max_per_user)
            await mgr.revoke(ended.id, "logout")                 # a deletion leaves revoked markers
            assert [s.id for s in await mgr.list_user(user)] == [session.id]
        keys = await store.client.keys("*")
        for user in users:
            tag = slot_tag(user)
            mine = sorted(k for k in keys if k.startswith(f"gw:{{{tag}}}:"))
            kinds = {k.split(":", 2)[2].split(":", 1)[0] for k in mine}
            assert kinds == {"s", "t", "r", "e", "u", "o"}, mine
            assert f"gw:{{{tag}}}:u:{user}" in mine and f"gw:{{{tag}}}:o" in mine
            assert {key_slot(k.encode()) for k in mine} == {key_slot(f"gw:{{{tag}}}:o".encode())}
            for session in await mgr.list_user(user):
                assert f"gw:{{{tag}}}:s:{session.id}" in mine
                assert f"gw:{{{tag}}}:t:{session.token_hash}" in mine
                assert f"gw:{{{tag}}}:e:{session.token_hash}" in mine
        # nothing outside the tagged layout
        assert all(re.match(r"gw:\{[0-3][0-9a-f]{2}\}:[strueo]", k) for k in keys), keys
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_redis_store_uses_scripts_and_no_transaction(redis_url, redis_server):
    """What Redis saw (INFO commandstats): scripts and plain one-key commands, never MULTI."""
    store = RedisSessionStore(redis_url)
    await store.open()
    try:
        mgr = SessionManager(store, idle_timeout=60, absolute_timeout=600, touch_interval=0, rotation_grace=5)
        token, session = await mgr.create("alice", "password")
        redis_server.command("CONFIG", "RESETSTAT")
        assert (await mgr.authenticate(token)).id == session.id   # lookup + touch
        stats = redis_server.command("INFO", "commandstats")
        assert re.findall(r"cmdstat_evalsha:calls=(\d+)", stats) == ["2"], stats   # two scripts, one slot each
        token, session = await mgr.refresh(session)
        await mgr.list_user("alice")
        await store.online(0, 10)
        await mgr.revoke(session.id, "logout")
        await mgr.ended_reason(token)
        stats = redis_server.command("INFO", "commandstats")
        assert "cmdstat_multi" not in stats and "cmdstat_exec" not in stats, stats
    finally:
        await store.close()


def test_the_redis_prefix_may_not_hold_braces():
    for prefix in ("gw{", "gw}:", "{gw}:"):
        with pytest.raises(ValueError, match="prefix"):
            RedisSessionStore("redis://127.0.0.1:6379/0", prefix=prefix)
    assert RedisSessionStore("redis://127.0.0.1:6379/0", prefix="app1:").prefix == "app1:"


@pytest.mark.gen_test
async def test_redis_refuses_a_record_whose_id_or_tokens_lack_its_users_tag(redis_url):
    store = RedisSessionStore(redis_url)
    await store.open()
    try:
        other = next(u for u in (f"x{i}" for i in range(100)) if slot_tag(u) != slot_tag("u1"))
        for bad in (dict(record("s1"), id="s1"), dict(record("s1"), token_hash=hash_token("tok")),
                    dict(record("s1"), token_hash=H("tok", other)), dict(record("s1", user=other), user_id="u1")):
            with pytest.raises(ValueError, match="slot tag"):
                await store.create(bad, 60, 0)
        rec = record("s1")
        await store.create(rec, 60, 0)
        with pytest.raises(ValueError, match="slot tag"):
            await store.rotate(dict(rotated(rec, "new"), token_hash=H("new", other)), 60, 5)
        assert (await store.get(S("s1")))["token_hash"] == rec["token_hash"]
    finally:
        await store.close()


@pytest.mark.gen_test(timeout=60)
async def test_online_pages_in_order_across_shards(store):
    """Users of one crowded shard and of many, many of them seen at the same
    time: every page continues exactly where the cursor left off."""
    base = time.time() - 1000
    crowded = tagged_users("000", 30)           # one shard holding many users
    spread = [f"user-{i}" for i in range(200_000, 200_090)]
    users = crowded + spread
    seen: dict[str, float] = {}
    for i, user in enumerate(users):
        at = base + (i % 25) * 0.25                 # many users share a last-seen time
        await store.create(record(f"s{i}", user=user, created=at), 60, 0)
        seen[user] = at
    stale = tagged_users("000", 31)[-1]
    await store.create(record("stale", user=stale, created=base - 500), 60, 0)   # seen before `since`
    expected = sorted((at, user) for user, at in seen.items())
    assert await store.online(base - 1, 0) == []
    assert await store.online(base - 1, 1000) == [(u, at) for at, u in expected]
    for limit in (9, 50, 120):
        got, after = [], None
        while True:
            page = await store.online(base - 1, limit, after)
            assert len(page) <= limit
            if not page:
                break
            got += page
            after = (page[-1][1], page[-1][0])
        assert got == [(u, at) for at, u in expected], limit
    for i in (0, 29, 30, 61, 100):
        assert await store.online(base - 1, 1, expected[i]) == [(expected[i + 1][1], expected[i + 1][0])]
    assert await store.online(base - 1, 1, expected[-1]) == []
    assert await store.online(base + 5, 1000) == [(u, at) for at, u in expected if at >= base + 5]
