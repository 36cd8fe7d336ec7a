"""Redis shared state, on the Redis of the session store.

It opens no connections of its own: every call takes the client of the
:class:`~gateway.sessions.redis.RedisSessionStore` it was given (read anew
each time, since the store creates it in ``open()`` and drops it in
``close()``), and it never closes that client.  Open the store before using
the state; close the state before the store.

Keys (the store's prefix, ``gw:`` by default, beside the session keys):
``c:<name>`` counters, ``r:<name>`` rate-limit buckets (the theoretical
arrival time, in milliseconds of the Redis clock, so that every gateway
agrees on the time), ``v:<name>`` small shared values.  Every key carries
a TTL.  These are the names and scripts the session store used when it held
counters and values itself, so whatever was stored before carries over.
(The session store's own keys all carry a hash tag, ``<prefix>{<tag>}:``,
so none of them is ever one of these.)

Every operation is one command or one Lua script on one key, so it runs
alike on a single Redis, behind Sentinel and on a Redis Cluster: no
transaction (MULTI), no script touching a second key.

A Redis failure surfaces as the session store's own
:class:`gateway.errors.StoreUnavailable` (the same 503 message): it is the
same Redis.
"""

from __future__ import annotations

import hashlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.sessions.redis import RedisSessionStore, store_unavailable
from gateway.state.base import SharedState

#: count one hit; the first one starts the window (a key left without a TTL gets one)
_HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""

#: one GCRA step (gateway.state.base.gcra, in milliseconds of Redis's own clock):
#: ARGV = window ms, limit; returns {allowed, remaining, reset_after ms}
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = tonumber(ARGV[1])
local interval = window / tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at - now > 0.001 then return {0, 0, math.ceil(allow_at - now)} end
local ttl = math.ceil(new_tat - now)
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', ttl)
return {1, math.floor((window - (new_tat - now)) / interval + 0.000001), ttl}
"""

#: a counter and its TTL in ms, without counting (false when there is none)
_PEEK = """
local n = redis.call('GET', KEYS[1])
if not n then return false end
return {n, redis.call('PTTL', KEYS[1])}
"""

#: delete the key only while it holds ARGV[1] (release a lock one still owns)
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class _Script:
    """A Lua script run by its SHA-1, and sent again when Redis lost it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:  # EVALSHA straight away: one round trip on the usual path
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed Redis: EVAL loads it again
            return await client.eval(self.source, len(keys), *keys, *args)


_SCRIPTS = {"hit": _Script(_HIT), "take": _Script(_TAKE), "peek": _Script(_PEEK), "delete_if": _Script(_DELETE_IF)}


class RedisSharedState(SharedState):
    name = "redis"
    shared = True

    def __init__(self, store: RedisSessionStore) -> None:
        self._store = store
        self._counter = f"{store.prefix}c:"
        self._value = f"{store.prefix}v:"
        self._bucket = f"{store.prefix}r:"

    async def close(self) -> None:
        """Nothing to release: the session store owns the client."""

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._store.client  # StoreUnavailable before the store is open
        async with self._store.guard():
            return await _SCRIPTS[script].run(client, keys, args)

    async def hit(self, key: str, window: float) -> tuple[int, float]:
        count, pttl = await self._run("hit", [self._counter + key], [_ms(window)])
        return int(count), max(0, int(pttl)) / 1000

    async def take(self, key: str, limit: int, window: float) -> tuple[bool, int, float]:
        allowed, remaining, ms = await self._run("take", [self._bucket + key], [_ms(window), int(limit)])
        return bool(allowed), max(0, int(remaining)), max(0, int(ms)) / 1000

    async def peek(self, key: str) -> tuple[int, float]:
        found = await self._run("peek", [self._counter + key], [])
        if not found:
            return 0, 0.0
        count, pttl = found
        return int(count), max(0, int(pttl)) / 1000

    async def clear(self, key: str) -> None:
        client = self._store.client
        async with self._store.guard():
            await client.delete(self._counter + key)

    async def get_value(self, key: str) -> str | None:
        client = self._store.client
        async with self._store.guard():
            value = await client.get(self._value + key)
        return None if value is None else str(value)  # the client decodes responses

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        client = self._store.client
        async with self._store.guard():
            await client.set(self._value + key, value, px=_ms(ttl))

    async def add_value(self, key: str, value: str, ttl: float) -> bool:
        client = self._store.client
        async with self._store.guard():
            return bool(await client.set(self._value + key, value, px=_ms(ttl), nx=True))

    async def delete_value(self, key: str, expected: str | None = None) -> bool:
        k = self._value + key
        if expected is not None:
            return bool(await self._run("delete_if", [k], [expected]))
        client = self._store.client
        async with self._store.guard():
            return bool(await client.delete(k))
