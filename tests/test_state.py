"""One contract suite for both shared-state backends: memory and a real redis-server.

The Redis state runs on a session store's client, as in the gateway; two
stores on one Redis stand for two processes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import RedisServer
from gateway.config import load_config
from gateway.errors import StoreUnavailable
from gateway.sessions import SessionStore, open_session_store
from gateway.sessions.memory import MemorySessionStore
from gateway.sessions.redis import RedisSessionStore
from gateway.state import SharedState, open_shared_state
from gateway.state.memory import MemorySharedState
from gateway.state.redis import RedisSharedState


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
def state(request: pytest.FixtureRequest, io_loop: Any) -> Iterator[SharedState]:
    store: RedisSessionStore | None = None
    s: SharedState
    if request.param == "memory":
        s = MemorySharedState()
    else:
        # Redis Sentinel and Redis Cluster: gateway.testing.redis_modes
        options = request.getfixturevalue(f"redis_{request.param}_options") if request.param != "redis" else None
        store = RedisSessionStore(request.getfixturevalue("redis_url") if options is None else "", options=options)
        io_loop.run_sync(store.open)
        s = RedisSharedState(store)
    io_loop.run_sync(s.open)
    yield s
    io_loop.run_sync(s.close)
    if store is not None:
        io_loop.run_sync(store.close)


async def opened(url: str) -> tuple[RedisSessionStore, RedisSharedState]:
    """A session store on ``url`` and the state sharing its client: one "process"."""
    store = RedisSessionStore(url)
    await store.open()
    state = RedisSharedState(store)
    await state.open()
    return store, state


async def closed(store: RedisSessionStore, state: RedisSharedState) -> None:
    await state.close()
    await store.close()


# -- the contract, on both backends ---------------------------------------


@pytest.mark.gen_test
async def test_counters_window(state: SharedState) -> None:
    assert await state.peek("k") == (0, 0.0)
    assert (await state.hit("k", 0.5))[0] == 1
    count, left = await state.hit("k", 0.5)
    assert count == 2 and 0 < left <= 0.5
    assert (await state.peek("k"))[0] == 2
    await asyncio.sleep(0.6)
    assert await state.peek("k") == (0, 0.0)  # the window ended
    assert (await state.hit("k", 10))[0] == 1  # a new one starts
    await state.clear("k")
    assert (await state.peek("k"))[0] == 0


@pytest.mark.gen_test
async def test_the_first_hit_fixes_the_window(state: SharedState) -> None:
    await state.hit("k", 0.4)
    await asyncio.sleep(0.2)
    count, left = await state.hit("k", 10)  # a later, longer window does not extend it
    assert count == 2 and left <= 0.2
    assert (await state.peek("other"))[0] == 0  # counters are per key


@pytest.mark.gen_test
async def test_shared_values_with_ttl(state: SharedState) -> None:
    assert await state.get_value("k") is None
    await state.set_value("k", "v1", 0.3)
    assert await state.get_value("k") == "v1"
    assert await state.add_value("k", "other", 5) is False  # held: not replaced
    assert await state.get_value("k") == "v1"
    await state.set_value("k", "v2", 0.3)  # set replaces
    assert await state.get_value("k") == "v2"
    await asyncio.sleep(0.4)
    assert await state.get_value("k") is None  # expired
    assert await state.add_value("k", "v3", 5) is True
    assert await state.delete_value("k", expected="not-it") is False
    assert await state.get_value("k") == "v3"
    assert await state.delete_value("k", expected="v3") is True
    assert await state.get_value("k") is None
    assert await state.delete_value("k") is False
    assert await state.delete_value("k", expected="v3") is False
    await state.set_value("k", "v4", 5)
    assert await state.delete_value("k") is True
    assert await state.get_value("k") is None


@pytest.mark.gen_test
async def test_add_value_is_a_lock_only_one_caller_gets(state: SharedState) -> None:
    results = await asyncio.gather(*(state.add_value("lock", str(i), 5) for i in range(20)))
    assert results.count(True) == 1
    owner = str(results.index(True))
    assert await state.get_value("lock") == owner
    assert await state.delete_value("lock", expected="someone-else") is False  # only the owner releases
    assert await state.delete_value("lock", expected=owner) is True
    assert await state.add_value("lock", "next", 5) is True


@pytest.mark.gen_test
async def test_an_expired_lock_can_be_taken_again(state: SharedState) -> None:
    assert await state.add_value("lock", "a", 0.2) is True
    await asyncio.sleep(0.3)
    assert await state.add_value("lock", "b", 5) is True
    assert await state.delete_value("lock", expected="a") is False  # the first holder's release is a no-op
    assert await state.get_value("lock") == "b"


@pytest.mark.gen_test
async def test_counters_and_values_are_apart(state: SharedState) -> None:
    await state.hit("k", 5)
    assert await state.get_value("k") is None
    await state.set_value("k", "v", 5)
    await state.clear("k")
    assert await state.get_value("k") == "v"


@pytest.mark.gen_test
async def test_take_allows_a_burst_of_limit_then_refuses(state: SharedState) -> None:
    taken = [await state.take("k", 3, 60) for _ in range(3)]
    assert [(allowed, remaining) for allowed, remaining, _ in taken] == [(True, 2), (True, 1), (True, 0)]
    assert all(0 < reset <= 60 for _, _, reset in taken)
    assert 40 < taken[-1][2] <= 60  # the whole quota is back once the burst has drained
    allowed, remaining, retry = await state.take("k", 3, 60)
    assert (allowed, remaining) == (False, 0)
    assert 10 < retry <= 20  # one request back every window / limit
    assert (await state.take("k", 3, 60))[0] is False  # a refusal takes nothing, and frees nothing
    assert await state.take("other", 3, 60) == (True, 2, pytest.approx(20, abs=5))  # buckets are per key
    assert (await state.peek("k"))[0] == 0  # apart from hit()'s counters


@pytest.mark.gen_test
async def test_take_gives_back_one_request_per_interval(state: SharedState) -> None:
    assert [(await state.take("k", 2, 1))[0] for _ in range(3)] == [True, True, False]
    await asyncio.sleep(0.6)  # 1 s / 2: one request back
    allowed, remaining, _ = await state.take("k", 2, 1)
    assert allowed and remaining == 0


@pytest.mark.gen_test
async def test_take_is_atomic_under_concurrent_callers(state: SharedState) -> None:
    results = await asyncio.gather(*(state.take("k", 5, 60) for _ in range(20)))
    assert [allowed for allowed, _, _ in results].count(True) == 5
    assert sorted(remaining for allowed, remaining, _ in results if allowed) == [0, 1, 2, 3, 4]


# -- the memory backend ------------------------------------------------------


@pytest.mark.gen_test
async def test_memory_state_sweeps_what_expired() -> None:
    state = MemorySharedState()
    await state.hit("old", 0.05)
    await state.set_value("old", "v", 0.05)
    await state.hit("live", 60)
    await state.set_value("live", "v", 60)
    await asyncio.sleep(0.1)
    state.sweep()
    assert list(state._counters) == ["live"]
    assert list(state._values) == ["live"]


# -- the Redis backend ---------------------------------------------------------


@pytest.mark.gen_test
async def test_two_processes_share_counters_values_and_locks(redis_url: str) -> None:
    a_store, a = await opened(redis_url)
    b_store, b = await opened(redis_url)
    try:
        assert a_store.client is not b_store.client
        assert (await a.hit("login:alice", 5))[0] == 1
        assert (await b.hit("login:alice", 5))[0] == 2
        count, left = await a.peek("login:alice")
        assert count == 2 and 0 < left <= 5
        await b.clear("login:alice")
        assert (await a.peek("login:alice"))[0] == 0

        await a.set_value("token", "t1", 5)
        assert await b.get_value("token") == "t1"

        results = await asyncio.gather(*(s.add_value("lock", f"{name}{i}", 5)
                                         for i in range(10) for name, s in (("a", a), ("b", b))))
        assert results.count(True) == 1
        owner = await a.get_value("lock")
        assert owner is not None and await b.get_value("lock") == owner
        other = b if owner.startswith("a") else a
        assert await other.delete_value("lock", expected="not-the-owner") is False
        assert await other.delete_value("lock", expected=owner) is True
        assert await a.get_value("lock") is None

        assert (await a.take("rl:ip", 3, 60))[:2] == (True, 2)
        assert (await b.take("rl:ip", 3, 60))[:2] == (True, 1)
        assert (await a.take("rl:ip", 3, 60))[:2] == (True, 0)
        assert (await b.take("rl:ip", 3, 60))[0] is False
    finally:
        await closed(a_store, a)
        await closed(b_store, b)


@pytest.mark.gen_test
async def test_redis_keys_are_those_the_session_store_used(redis_url: str, redis_server: RedisServer) -> None:
    """Counters under ``gw:c:``, values under ``gw:v:``, each with its TTL:
    what was stored before the state had a module of its own is still read."""
    store, state = await opened(redis_url)
    try:
        await state.hit("k", 20)
        assert redis_server.command("GET", "gw:c:k").split("\r\n")[1] == "1"
        assert 15_000 < int(redis_server.command("PTTL", "gw:c:k").strip().lstrip(":")) <= 20_000
        await state.set_value("k", "v", 20)
        assert redis_server.command("GET", "gw:v:k").split("\r\n")[1] == "v"
        assert 15_000 < int(redis_server.command("PTTL", "gw:v:k").strip().lstrip(":")) <= 20_000
        await state.take("k", 4, 20)  # a bucket under gw:r:, expiring once full again (20 s / 4 later)
        assert 4_000 < int(redis_server.command("PTTL", "gw:r:k").strip().lstrip(":")) <= 5_000

        redis_server.command("SET", "gw:c:old", "3", "PX", "20000")  # as an earlier version left them
        redis_server.command("SET", "gw:v:old", "cached", "PX", "20000")
        assert (await state.peek("old"))[0] == 3
        assert (await state.hit("old", 1))[0] == 4
        assert int(redis_server.command("PTTL", "gw:c:old").strip().lstrip(":")) > 15_000  # its window stays
        assert await state.get_value("old") == "cached"
        assert await state.delete_value("old", expected="cached") is True
    finally:
        await closed(store, state)


@pytest.mark.gen_test
async def test_redis_state_keys_are_one_key_per_call_apart_from_the_sessions(
        redis_url: str, redis_server: RedisServer) -> None:
    """Every operation is one command or one script on one key (what Redis
    saw: INFO commandstats), never a transaction, so that it runs alike on a
    Redis Cluster; and no state key is ever a session key (those carry a hash tag)."""
    store, state = await opened(redis_url)
    try:
        redis_server.command("CONFIG", "RESETSTAT")
        await state.hit("k", 20)
        assert (await state.peek("k"))[0] == 1
        assert 15 < (await state.peek("k"))[1] <= 20
        assert await state.peek("none") == (0, 0.0)
        await state.take("k", 4, 20)
        await state.set_value("k", "v", 20)
        assert await state.add_value("lock", "me", 20) is True
        assert await state.delete_value("lock", expected="me") is True
        await state.clear("k")
        stats = redis_server.command("INFO", "commandstats")
        assert "cmdstat_multi" not in stats and "cmdstat_exec" not in stats, stats
        calls = dict(re.findall(r"cmdstat_(evalsha|eval):calls=(\d+)", stats))
        assert calls == {"evalsha": "6"}, stats       # hit, 3 peeks, take, delete_value(expected)
        redis_server.command("SET", "gw:c:{tagged}", "7", "PX", "20000")   # a name with braces: still one key
        assert (await state.peek("{tagged}"))[0] == 7
        keys = redis_server.command("KEYS", "gw:*")
        assert "gw:v:k" in keys and "{" not in keys.replace("gw:c:{tagged}", "")
    finally:
        await closed(store, state)


@pytest.mark.gen_test
async def test_closing_the_state_leaves_the_store_client_open(redis_url: str) -> None:
    store, state = await opened(redis_url)
    try:
        await state.set_value("k", "v", 5)
        await state.close()
        assert await store.get("no-such-session") is None  # the store still works...
        assert await state.get_value("k") == "v"            # ...and so does a state on it
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_redis_state_before_the_store_is_open_is_unavailable(redis_url: str) -> None:
    store = RedisSessionStore(redis_url)
    state = RedisSharedState(store)
    await state.open()
    with pytest.raises(StoreUnavailable):
        await state.hit("k", 5)
    await store.open()
    try:
        assert (await state.hit("k", 5))[0] == 1  # the client is read on each call
    finally:
        await store.close()
    with pytest.raises(StoreUnavailable):
        await state.get_value("k")


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_is_store_unavailable_within_a_second(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store, state = await opened(server.url)
    try:
        assert (await state.hit("k", 60))[0] == 1
        server.stop()
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "hit": lambda: state.hit("k", 60),
            "take": lambda: state.take("k", 5, 60),
            "peek": lambda: state.peek("k"),
            "clear": lambda: state.clear("k"),
            "get_value": lambda: state.get_value("k"),
            "set_value": lambda: state.set_value("k", "v", 60),
            "add_value": lambda: state.add_value("k", "v", 60),
            "delete_value": lambda: state.delete_value("k"),
            "delete_value(expected)": lambda: state.delete_value("k", expected="v"),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await call()
            assert time.monotonic() - started < 1.5, name
            error = caught.value
            assert error.status == 503 and error.code == "unavailable", name
            assert error.message == "the session store is unavailable, try again shortly", name
            assert error.headers == {"Retry-After": "1"}, name

        server.start()  # back on the same port, without the scripts it had loaded
        assert (await state.hit("k", 60))[0] == 1
        assert (await state.take("k", 5, 60))[0] is True
        assert await state.add_value("lock", "me", 60) is True
        assert await state.delete_value("lock", expected="me") is True
    finally:
        await closed(store, state)
        server.stop()


# -- open_shared_state ---------------------------------------------------------


@pytest.fixture
def opened_pair(session_section: dict[str, Any], io_loop: Any) -> Iterator[tuple[SessionStore, SharedState]]:
    """The session store and shared state the [sessions] section builds, opened in order."""
    settings = load_config(data={"sessions": session_section}, environ={}).sessions
    store = open_session_store(settings)
    state = open_shared_state(settings, store)
    io_loop.run_sync(store.open)
    io_loop.run_sync(state.open)
    yield store, state
    io_loop.run_sync(state.close)
    io_loop.run_sync(store.close)


@pytest.mark.gen_test
async def test_open_shared_state_goes_with_the_session_store(opened_pair: tuple[SessionStore, SharedState]) -> None:
    store, state = opened_pair
    expected = RedisSharedState if isinstance(store, RedisSessionStore) else MemorySharedState
    assert type(state) is expected
    assert (state.name, state.shared) == (store.name, store.shared)
    assert (await state.hit("k", 5))[0] == 1
    await state.set_value("k", "v", 5)
    assert await state.get_value("k") == "v"


def test_open_shared_state_refuses_a_redis_setting_without_a_redis_store() -> None:
    settings = load_config(data={"sessions": {"store": "redis"}}, environ={}).sessions
    with pytest.raises(TypeError, match="redis"):
        open_shared_state(settings, MemorySessionStore())
