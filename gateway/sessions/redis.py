"""Redis session store (``redis.asyncio``), for production and several processes.

Key layout.  Everything of one user lives under one *hash tag*, the user's
slot tag (:func:`gateway.sessions.base.slot_tag`: three hex digits, one of
1024), so that every script touches one Redis Cluster hash slot, and the
same layout serves a single Redis, Sentinel and a cluster alike.  With the
``gw:`` prefix and ``T`` the tag:

- ``gw:{T}:s:<session id>`` the session JSON; a session id is
  ``s_T_<random>``;
- ``gw:{T}:t:<token hash>`` the session id, for each live token (the
  current one, and the previous one during its grace period); a token is
  ``gws_T_<secret>`` and its hash ``T.<sha256 hex of the token>``;
- ``gw:{T}:r:<token hash>`` the session id, for each token ``/refresh``
  replaced that the record still lists in ``superseded_hashes`` (refresh
  token reuse detection), as long-lived as the session;
- ``gw:{T}:e:<token hash>`` the marker saying how that token's session
  ended or will end (``expired``, ``revoked``, ``superseded``; see
  :mod:`gateway.sessions.base`);
- ``gw:{T}:u:<user id>`` a sorted set of the user's session ids by creation time;
- ``gw:{T}:o`` the online index of the users of tag ``T``: a sorted set of
  user ids by the time one of their sessions was last created or touched,
  written by the same scripts (no extra round trip), trimmed of users unseen
  for :data:`ONLINE_KEEP` seconds at each login into that shard and at each
  listing, and of a user with no live session left when their last one is
  deleted.  :meth:`RedisSessionStore.online` reads all 1024 shards, in
  pipelines.

Every key but the ``o`` shards carries a TTL.  A token hash or session id
names its tag, so a lookup, a ``get`` or a ``delete`` is one call on one
slot; a value without a well-formed tag finds nothing.  Operations that touch
several keys run as Lua scripts, so they are atomic and cost one round trip;
each script declares the keys it knows beforehand, and builds every other
(an evicted session's, a superseded token's) on its own tag, so no script
ever leaves the slot of ``KEYS[1]``.  No transaction (MULTI) is used.  The
prefix may not hold ``{`` or ``}``: they would move the hash tag.
(:mod:`gateway.state.redis` keeps counters and shared values on the same
Redis, through this store's client, under ``c:``, ``r:`` and ``v:``, each
one key.)

Migrating from the layout before tags (``gw:s:<id>``, ``gw:t:<hash>``, ...,
one ``gw:o``): nothing to run and no configuration to change.  Tokens
issued before carry no tag and simply open no session any more (their
holders get 401 and log in again); the old keys are never read again and
expire on their own TTLs (the old ``gw:o``, which has none, may be deleted
by hand).

Connection failures surface quickly (short socket timeouts, at most one
retry) as :class:`gateway.errors.StoreUnavailable`; the client reconnects on
its own when Redis is back.  Connections come from a blocking pool of
``max_connections``: a request beyond them waits up to ``pool_timeout`` for a
free one (then StoreUnavailable), so a burst of requests queues instead of
failing while Redis is healthy.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from gateway.errors import StoreUnavailable
from gateway.sessions.base import Record, SessionStore, all_slot_tags, hash_tag, session_tag, slot_tag
from gateway.sessions.connection import RedisClient, RedisOptions, connect

log = logging.getLogger("gateway.sessions")
PREFIX = "gw:"

# In every script, ``b`` (an argument) is the key base of the script's one
# tag, ``<prefix>{<tag>}:``: every key a script builds itself starts with it,
# in the slot of KEYS[1].

# Marks every token of a decoded session record ``revoked`` for ``ms``
# milliseconds (nothing when ``ms`` is 0); prepended to the scripts that end sessions.
_REVOKE_MARKS = """
local function revoke_marks(b, rec, ms)
  if tonumber(ms) <= 0 then return end
  if type(rec.token_hash) == 'string' then redis.call('SET', b..'e:'..rec.token_hash, 'revoked', 'PX', ms) end
  if type(rec.prev_token_hash) == 'string' then redis.call('SET', b..'e:'..rec.prev_token_hash, 'revoked', 'PX', ms) end
  if type(rec.superseded_hashes) == 'table' then
    for _, h in ipairs(rec.superseded_hashes) do redis.call('SET', b..'e:'..h, 'revoked', 'PX', ms) end
  end
end
"""

# KEYS: s:<id>, t:<hash>, e:<hash>, u:<user>, o (the user's shard)
_CREATE = _REVOKE_MARKS + """
local b = ARGV[5]
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
-- ARGV[8]: the session's TTL plus the retention; ARGV[9]: the retention (0: no markers)
if tonumber(ARGV[9]) > 0 then redis.call('SET', KEYS[3], 'expired', 'PX', ARGV[8]) end
local ukey = KEYS[4]
redis.call('ZADD', ukey, ARGV[7], ARGV[1])
if redis.call('PTTL', ukey) < tonumber(ARGV[3]) then redis.call('PEXPIRE', ukey, ARGV[3]) end
-- the online index (ARGV[10]: forget users unseen since then)
redis.call('ZADD', KEYS[5], 'GT', ARGV[7], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '('..ARGV[10])
local live = {}
for _, sid in ipairs(redis.call('ZRANGE', ukey, 0, -1)) do
  if redis.call('EXISTS', b..'s:'..sid) == 1 then table.insert(live, sid) else redis.call('ZREM', ukey, sid) end
end
local evicted = {}
local max = tonumber(ARGV[4])
if max > 0 and #live > max then
  for i = 1, #live - max do
    local sid = live[i]
    local raw = redis.call('GET', b..'s:'..sid)
    redis.call('DEL', b..'s:'..sid)
    redis.call('ZREM', ukey, sid)
    if raw then
      local rec = cjson.decode(raw)
      if type(rec.token_hash) == 'string' then redis.call('DEL', b..'t:'..rec.token_hash) end
      if type(rec.prev_token_hash) == 'string' then redis.call('DEL', b..'t:'..rec.prev_token_hash) end
      if type(rec.superseded_hashes) == 'table' then
        for _, h in ipairs(rec.superseded_hashes) do redis.call('DEL', b..'r:'..h) end
      end
      revoke_marks(b, rec, ARGV[9])
      table.insert(evicted, raw)
    end
  end
end
return evicted
"""

# KEYS: t:<hash> (or r:<hash>); ARGV: the key base
_LOOKUP = """
local sid = redis.call('GET', KEYS[1])
if not sid then return false end
return redis.call('GET', ARGV[1]..'s:'..sid)
"""

# KEYS: s:<id>, t:<hash>, e:<hash>, u:<user>, o (the user's shard)[, t:<previous hash>]
_SAVE = """
local b = ARGV[4]
-- compare and set: only over the record whose current token the caller read
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local old = cjson.decode(cur)
if old.token_hash ~= ARGV[10] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
-- superseded tokens stay known as long as the session (reuse detection);
-- those the record no longer lists are forgotten
local keep = {}
local rec = cjson.decode(ARGV[2])
if type(rec.superseded_hashes) == 'table' then
  for _, h in ipairs(rec.superseded_hashes) do
    keep[h] = true
    redis.call('SET', b..'r:'..h, ARGV[1], 'PX', ARGV[3])
  end
end
if type(old.superseded_hashes) == 'table' then
  for _, h in ipairs(old.superseded_hashes) do
    if not keep[h] then redis.call('DEL', b..'r:'..h) end
  end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
-- the markers: the current token expires with the session, the replaced ones
-- were superseded (ARGV[11]: the TTL plus the retention; ARGV[12]: the retention)
if tonumber(ARGV[12]) > 0 then
  redis.call('SET', KEYS[3], 'expired', 'PX', ARGV[11])
  if type(rec.prev_token_hash) == 'string' and rec.prev_token_hash ~= ARGV[5] then
    redis.call('SET', b..'e:'..rec.prev_token_hash, 'superseded', 'PX', ARGV[11])
  end
  for h, _ in pairs(keep) do
    if h ~= ARGV[5] then redis.call('SET', b..'e:'..h, 'superseded', 'PX', ARGV[11]) end
  end
end
-- keep the user index alive as long as this session (a touch can outlive its first TTL)
local ukey = KEYS[4]
redis.call('ZADD', ukey, ARGV[9], ARGV[1])
if redis.call('PTTL', ukey) < tonumber(ARGV[3]) then redis.call('PEXPIRE', ukey, ARGV[3]) end
if type(rec.last_seen_at) == 'number' then redis.call('ZADD', KEYS[5], 'GT', rec.last_seen_at, ARGV[8]) end
if ARGV[6] ~= '' then
  if tonumber(ARGV[7]) > 0 then
    redis.call('PEXPIRE', KEYS[6], ARGV[7])
  else
    redis.call('DEL', KEYS[6])
  end
end
return 1
"""

# KEYS: s:<id>; ARGV: the key base, the id, the retention in ms
_DELETE = _REVOKE_MARKS + """
local b = ARGV[1]
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
redis.call('DEL', KEYS[1])
local rec = cjson.decode(raw)
if type(rec.token_hash) == 'string' then redis.call('DEL', b..'t:'..rec.token_hash) end
if type(rec.prev_token_hash) == 'string' then redis.call('DEL', b..'t:'..rec.prev_token_hash) end
if type(rec.superseded_hashes) == 'table' then
  for _, h in ipairs(rec.superseded_hashes) do redis.call('DEL', b..'r:'..h) end
end
if type(rec.user_id) == 'string' then
  local ukey = b..'u:'..rec.user_id
  redis.call('ZREM', ukey, ARGV[2])
  -- no live session left: the user leaves the online index
  local live = false
  for _, sid in ipairs(redis.call('ZRANGE', ukey, 0, -1)) do
    if redis.call('EXISTS', b..'s:'..sid) == 1 then live = true break end
  end
  if not live then redis.call('ZREM', b..'o', rec.user_id) end
end
revoke_marks(b, rec, ARGV[3])
return raw
"""


#: how many store deadlines a listing of the online index, which reads every shard, may take
ONLINE_BUDGET = 5.0

#: the online index forgets a user unseen this long (trimmed at each login)
ONLINE_KEEP = 86400.0


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Guard:
    """``async with``: a Redis call that fails, or takes longer than
    ``deadline`` seconds, is the session store's 503 (``StoreUnavailable``)."""

    __slots__ = ("_timeout",)

    def __init__(self, deadline: float) -> None:
        self._timeout = asyncio.timeout(deadline)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError as late:
            raise store_unavailable(late, "no answer in time") from None
        if isinstance(exc, RedisError):
            raise store_unavailable(exc) from None


def store_unavailable(exc: BaseException, what: str = "") -> StoreUnavailable:
    """The 503 for a failed Redis call (this store's or the shared state's)."""
    # The exception text names host and port, never the password.
    return StoreUnavailable("session store", log_message=f"redis: {type(exc).__name__}: {what or exc}")


class RedisSessionStore(SessionStore):
    name = "redis"
    shared = True

    #: shards of the online index per pipeline when listing it
    ONLINE_CHUNK = 256

    def __init__(self, url: str = "", timeout: float = 0.5, prefix: str = PREFIX, *,
                 max_connections: int = 1000, pool_timeout: float = 1.0, retention: float = 86400.0,
                 options: RedisOptions | None = None) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the Redis key prefix {prefix!r} may not hold '{{' or '}}' (they would move the hash tag)")
        self.retention = retention
        self._options = options or RedisOptions(url, timeout=timeout, max_connections=max_connections,
                                                pool_timeout=pool_timeout)
        self._prefix = prefix
        self._client: RedisClient | None = None
        self._scripts: dict[str, Any] = {}

    async def open(self) -> None:
        self._client = connect(self._options)
        for name, src in (("create", _CREATE), ("lookup", _LOOKUP), ("save", _SAVE), ("delete", _DELETE)):
            self._scripts[name] = self._client.register_script(src)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def guard(self, scale: float = 1.0) -> Guard:
        """A fresh :class:`Guard` with this store's deadline (``scale`` times it)."""
        return Guard(self._options.deadline * scale)

    @property
    def client(self) -> RedisClient:
        """The Redis client (``decode_responses``), from :meth:`open` until
        :meth:`close`; :class:`gateway.state.redis.RedisSharedState` shares it."""
        if self._client is None:
            raise StoreUnavailable("session store", log_message="redis store used before open()")
        return self._client

    @property
    def prefix(self) -> str:
        """What every key of this store (and of the state sharing it) starts with."""
        return self._prefix

    def base(self, tag: str) -> str:
        """What every key of slot tag ``tag`` starts with: ``<prefix>{<tag>}:``."""
        return f"{self._prefix}{{{tag}}}:"

    def _tag(self, record: Record) -> str:
        """The slot tag of a record to write: its user's, which its id and
        every token hash of it must carry too (ValueError otherwise: the
        session could not be found from them)."""
        tag = slot_tag(record["user_id"])
        hashes = [record["token_hash"], record.get("prev_token_hash"), *(record.get("superseded_hashes") or [])]
        if session_tag(record["id"]) != tag or any(hash_tag(h) != tag for h in hashes if h):
            raise ValueError(f"session {record['id']!r}: its id and token hashes must carry its user's slot tag {tag}")
        return tag

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        found = self._scripts[script]
        client = self.client
        # (the hot path: Guard's work inlined, one coroutine layer fewer)
        try:
            async with asyncio.timeout(self._options.deadline):
                try:  # EVALSHA straight away: the cheapest call on the hot path
                    return await client.evalsha(found.sha, len(keys), *keys, *args)
                except NoScriptError:  # a restarted or flushed Redis (node): EVAL loads it again, one round trip
                    return await client.eval(found.script, len(keys), *keys, *args)
        except RedisError as exc:
            raise store_unavailable(exc) from None
        except TimeoutError as late:
            raise store_unavailable(late, "no answer in time") from None

    async def create(self, record: Record, ttl: float, max_per_user: int) -> list[Record]:
        b = self.base(self._tag(record))
        token_hash, user_id = record["token_hash"], record["user_id"]
        raw = await self._run(
            "create",
            [f"{b}s:{record['id']}", f"{b}t:{token_hash}", f"{b}e:{token_hash}", f"{b}u:{user_id}", f"{b}o"],
            [record["id"], json.dumps(record), _ms(ttl), max_per_user, b,
             user_id, record["created_at"], *self._marking(ttl),
             repr(float(record["created_at"]) - ONLINE_KEEP)],
        )
        return [json.loads(r) for r in raw or []]

    async def _lookup(self, kind: str, token_hash: str) -> Record | None:
        tag = hash_tag(token_hash)
        if tag is None:  # no tag (a token from before tags, garbage): no session
            return None
        b = self.base(tag)
        raw = await self._run("lookup", [f"{b}{kind}:{token_hash}"], [b])
        return json.loads(raw) if raw else None

    async def lookup(self, token_hash: str) -> Record | None:
        return await self._lookup("t", token_hash)

    async def lookup_superseded(self, token_hash: str) -> Record | None:
        record = await self._lookup("r", token_hash)
        if record is None or token_hash not in (record.get("superseded_hashes") or []):
            return None
        return record

    async def ended(self, token_hash: str) -> str | None:
        tag = hash_tag(token_hash)
        if tag is None:
            return None
        async with self.guard():
            reason = await self.client.get(f"{self.base(tag)}e:{token_hash}")
        return str(reason) if reason else None  # (decode_responses: already text)

    def _marking(self, ttl: float) -> list[int]:
        """The scripts' marker arguments: a live token's marker TTL (the
        session's plus the retention) and the retention (0: no markers), in ms."""
        if self.retention <= 0:
            return [0, 0]
        return [_ms(ttl + self.retention), _ms(self.retention)]

    async def get(self, session_id: str) -> Record | None:
        tag = session_tag(session_id)
        if tag is None:  # not a session id (an old one, garbage from a URL): none
            return None
        async with self.guard():
            raw = await self.client.get(f"{self.base(tag)}s:{session_id}")
        return json.loads(raw) if raw else None

    async def _save(self, record: Record, ttl: float, grace: float | None) -> bool:
        b = self.base(self._tag(record))
        old = record.get("prev_token_hash") or "" if grace is not None else ""
        expected = old if grace is not None else record["token_hash"]
        token_hash, user_id = record["token_hash"], record["user_id"]
        ok = await self._run(
            "save",
            [f"{b}s:{record['id']}", f"{b}t:{token_hash}", f"{b}e:{token_hash}", f"{b}u:{user_id}", f"{b}o"]
            + ([f"{b}t:{old}"] if old else []),
            [record["id"], json.dumps(record), _ms(ttl), b, token_hash, old,
             _ms(min(grace, ttl)) if grace else 0, user_id, record["created_at"], expected,
             *self._marking(ttl)],
        )
        return bool(ok)

    async def save(self, record: Record, ttl: float) -> bool:
        return await self._save(record, ttl, None)

    async def rotate(self, record: Record, ttl: float, grace: float) -> bool:
        return await self._save(record, ttl, grace)

    async def delete(self, session_id: str) -> Record | None:
        tag = session_tag(session_id)
        if tag is None:
            return None
        b = self.base(tag)
        raw = await self._run("delete", [f"{b}s:{session_id}"],
                              [b, session_id, _ms(self.retention) if self.retention > 0 else 0])
        return json.loads(raw) if raw else None

    async def list_user(self, user_id: str) -> list[Record]:
        b = self.base(slot_tag(user_id))
        ukey = f"{b}u:{user_id}"
        async with self.guard():
            ids: list[Any] = await self.client.zrange(ukey, 0, -1)
            if not ids:
                return []
            raws = await self.client.mget([f"{b}s:{i}" for i in ids])  # one tag: one slot
            dead = [i for i, r in zip(ids, raws) if r is None]
            if dead:
                await self.client.zrem(ukey, *dead)
        return [json.loads(r) for r in raws if r is not None]

    async def online(self, since: float, limit: int, after: tuple[float, str] | None = None) -> list[tuple[str, float]]:
        """Merges the 1024 shards: each is trimmed of users unseen since
        ``since`` and read from its lowest entries, a few at a time; only the
        shards that may still hold one of the first ``limit`` entries are
        read further (pipelined, :data:`ONLINE_CHUNK` shards per pipeline,
        which a cluster client splits per node)."""
        if limit <= 0:
            return []
        keys = [f"{self.base(tag)}o" for tag in all_slot_tags()]
        low = after[0] if after is not None else since
        count = max(8, 2 * -(-limit // len(keys)))
        offsets = [0] * len(keys)
        last: list[tuple[float, str] | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        found: list[tuple[float, str]] = []
        trim = True
        async with self.guard(ONLINE_BUDGET):
            while pending:
                replies: list[Any] = []
                for start in range(0, len(pending), self.ONLINE_CHUNK):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for i in pending[start:start + self.ONLINE_CHUNK]:
                            if trim:
                                pipe.zremrangebyscore(keys[i], "-inf", f"({since!r}")
                            pipe.zrangebyscore(keys[i], low, "+inf", start=offsets[i], num=count, withscores=True)
                        replies += (await pipe.execute())[1::2] if trim else await pipe.execute()
                done: set[int] = set()
                for i, batch in zip(pending, replies):
                    entries = [(float(score), str(user)) for user, score in batch]
                    offsets[i] += len(entries)
                    if len(entries) < count:
                        done.add(i)
                    elif entries:
                        last[i] = entries[-1]
                    found += [e for e in entries if after is None or e > after]
                found = sorted(found)[:limit]
                cutoff = found[-1] if len(found) >= limit else None
                # a shard read to its end is done; another may still hold entries below the cutoff
                pending = [i for i in pending if i not in done
                           and (cutoff is None or (last[i] or cutoff) < cutoff)]
                trim, count = False, min(count * 2, limit + 1)
        return [(user, seen) for seen, user in found]
