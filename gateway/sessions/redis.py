"""Redis session store (``redis.asyncio``), for production and several processes.

Keys (``gw:`` prefix): ``s:<id>`` the session JSON, ``t:<sha256 of token>``
the session id, ``r:<sha256 of a superseded token>`` the session id (for
refresh-token reuse detection; as long-lived as the session), ``u:<user id>``
a sorted set of the user's session ids by creation time, ``e:<sha256 of
token>`` the marker saying how that token's session ended or will end
(``expired``, ``revoked``, ``superseded``; see :mod:`gateway.sessions.base`),
``o`` the online index: one sorted set of user ids by the time one of their
sessions was last created or touched, written by the same scripts (no extra
round trip), trimmed of users unseen for :data:`ONLINE_KEEP` seconds at each
login and of users with no live session left when their last one is deleted.
Every key but ``o`` carries a TTL.  (:mod:`gateway.state.redis` keeps counters and shared values on the
same Redis, through this store's client, under ``c:`` and ``v:``.)
Operations that touch several keys run as Lua scripts, so they are atomic and
cost one round trip.

Connection failures surface quickly (short socket timeouts, at most one
retry) as :class:`gateway.errors.StoreUnavailable`; the client reconnects on
its own when Redis is back.  Connections come from a blocking pool of
``max_connections``: a request beyond them waits up to ``pool_timeout`` for a
free one (then StoreUnavailable), so a burst of requests queues instead of
failing while Redis is healthy.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from gateway.errors import StoreUnavailable
from gateway.sessions.base import Record, SessionStore
from gateway.sessions.connection import RedisClient, RedisOptions, connect

log = logging.getLogger("gateway.sessions")
PREFIX = "gw:"

# Marks every token of a decoded session record ``revoked`` for ``ms``
# milliseconds (nothing when ``ms`` is 0); prepended to the scripts that end sessions.
_REVOKE_MARKS = """
local function revoke_marks(p, rec, ms)
  if tonumber(ms) <= 0 then return end
  if type(rec.token_hash) == 'string' then redis.call('SET', p..'e:'..rec.token_hash, 'revoked', 'PX', ms) end
  if type(rec.prev_token_hash) == 'string' then redis.call('SET', p..'e:'..rec.prev_token_hash, 'revoked', 'PX', ms) end
  if type(rec.superseded_hashes) == 'table' then
    for _, h in ipairs(rec.superseded_hashes) do redis.call('SET', p..'e:'..h, 'revoked', 'PX', ms) end
  end
end
"""

_CREATE = _REVOKE_MARKS + """
local p = ARGV[5]
redis.call('SET', p..'s:'..ARGV[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', p..'t:'..ARGV[6], ARGV[1], 'PX', ARGV[3])
-- ARGV[9]: the session's TTL plus the retention; ARGV[10]: the retention (0: no markers)
if tonumber(ARGV[10]) > 0 then redis.call('SET', p..'e:'..ARGV[6], 'expired', 'PX', ARGV[9]) end
local ukey = p..'u:'..ARGV[7]
redis.call('ZADD', ukey, ARGV[8], ARGV[1])
if redis.call('PTTL', ukey) < tonumber(ARGV[3]) then redis.call('PEXPIRE', ukey, ARGV[3]) end
-- the online index (ARGV[11]: forget users unseen since then)
redis.call('ZADD', p..'o', 'GT', ARGV[8], ARGV[7])
redis.call('ZREMRANGEBYSCORE', p..'o', '-inf', '('..ARGV[11])
local live = {}
for _, sid in ipairs(redis.call('ZRANGE', ukey, 0, -1)) do
  if redis.call('EXISTS', p..'s:'..sid) == 1 then table.insert(live, sid) else redis.call('ZREM', ukey, sid) end
end
local evicted = {}
local max = tonumber(ARGV[4])
if max > 0 and #live > max then
  for i = 1, #live - max do
    local sid = live[i]
    local raw = redis.call('GET', p..'s:'..sid)
    redis.call('DEL', p..'s:'..sid)
    redis.call('ZREM', ukey, sid)
    if raw then
      local rec = cjson.decode(raw)
      if type(rec.token_hash) == 'string' then redis.call('DEL', p..'t:'..rec.token_hash) end
      if type(rec.prev_token_hash) == 'string' then redis.call('DEL', p..'t:'..rec.prev_token_hash) end
      if type(rec.superseded_hashes) == 'table' then
        for _, h in ipairs(rec.superseded_hashes) do redis.call('DEL', p..'r:'..h) end
      end
      revoke_marks(p, rec, ARGV[10])
      table.insert(evicted, raw)
    end
  end
end
return evicted
"""

_LOOKUP = """
local sid = redis.call('GET', KEYS[1])
if not sid then return false end
return redis.call('GET', ARGV[1]..'s:'..sid)
"""

_SAVE = """
local p = ARGV[4]
-- compare and set: only over the record whose current token the caller read
local cur = redis.call('GET', p..'s:'..ARGV[1])
if not cur then return 0 end
local old = cjson.decode(cur)
if old.token_hash ~= ARGV[10] then return 0 end
redis.call('SET', p..'s:'..ARGV[1], ARGV[2], 'PX', ARGV[3])
-- superseded tokens stay known as long as the session (reuse detection);
-- those the record no longer lists are forgotten
local keep = {}
local rec = cjson.decode(ARGV[2])
if type(rec.superseded_hashes) == 'table' then
  for _, h in ipairs(rec.superseded_hashes) do
    keep[h] = true
    redis.call('SET', p..'r:'..h, ARGV[1], 'PX', ARGV[3])
  end
end
if type(old.superseded_hashes) == 'table' then
  for _, h in ipairs(old.superseded_hashes) do
    if not keep[h] then redis.call('DEL', p..'r:'..h) end
  end
end
redis.call('SET', p..'t:'..ARGV[5], ARGV[1], 'PX', ARGV[3])
-- the markers: the current token expires with the session, the replaced ones
-- were superseded (ARGV[11]: the TTL plus the retention; ARGV[12]: the retention)
if tonumber(ARGV[12]) > 0 then
  redis.call('SET', p..'e:'..ARGV[5], 'expired', 'PX', ARGV[11])
  if type(rec.prev_token_hash) == 'string' and rec.prev_token_hash ~= ARGV[5] then
    redis.call('SET', p..'e:'..rec.prev_token_hash, 'superseded', 'PX', ARGV[11])
  end
  for h, _ in pairs(keep) do
    if h ~= ARGV[5] then redis.call('SET', p..'e:'..h, 'superseded', 'PX', ARGV[11]) end
  end
end
-- keep the user index alive as long as this session (a touch can outlive its first TTL)
local ukey = p..'u:'..ARGV[8]
redis.call('ZADD', ukey, ARGV[9], ARGV[1])
if redis.call('PTTL', ukey) < tonumber(ARGV[3]) then redis.call('PEXPIRE', ukey, ARGV[3]) end
if type(rec.last_seen_at) == 'number' then redis.call('ZADD', p..'o', 'GT', rec.last_seen_at, ARGV[8]) end
if ARGV[6] ~= '' then
  if tonumber(ARGV[7]) > 0 then
    redis.call('PEXPIRE', p..'t:'..ARGV[6], ARGV[7])
  else
    redis.call('DEL', p..'t:'..ARGV[6])
  end
end
return 1
"""

_DELETE = _REVOKE_MARKS + """
local p = ARGV[1]
local raw = redis.call('GET', p..'s:'..ARGV[2])
if not raw then return false end
redis.call('DEL', p..'s:'..ARGV[2])
local rec = cjson.decode(raw)
if type(rec.token_hash) == 'string' then redis.call('DEL', p..'t:'..rec.token_hash) end
if type(rec.prev_token_hash) == 'string' then redis.call('DEL', p..'t:'..rec.prev_token_hash) end
if type(rec.superseded_hashes) == 'table' then
  for _, h in ipairs(rec.superseded_hashes) do redis.call('DEL', p..'r:'..h) end
end
if type(rec.user_id) == 'string' then
  local ukey = p..'u:'..rec.user_id
  redis.call('ZREM', ukey, ARGV[2])
  -- no live session left: the user leaves the online index
  local live = false
  for _, sid in ipairs(redis.call('ZRANGE', ukey, 0, -1)) do
    if redis.call('EXISTS', p..'s:'..sid) == 1 then live = true break end
  end
  if not live then redis.call('ZREM', p..'o', rec.user_id) end
end
revoke_marks(p, rec, ARGV[3])
return raw
"""


#: the online index forgets a user unseen this long (trimmed at each login)
ONLINE_KEEP = 86400.0


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def store_unavailable(exc: Exception) -> StoreUnavailable:
    """The 503 for a failed Redis call (this store's or the shared state's)."""
    # The exception text names host and port, never the password.
    return StoreUnavailable("session store", log_message=f"redis: {type(exc).__name__}: {exc}")


class RedisSessionStore(SessionStore):
    name = "redis"
    shared = True

    def __init__(self, url: str = "", timeout: float = 0.5, prefix: str = PREFIX, *,
                 max_connections: int = 1000, pool_timeout: float = 1.0, retention: float = 86400.0,
                 options: RedisOptions | None = None) -> None:
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

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        found = self._scripts[script]
        client = self.client
        try:
            try:  # EVALSHA straight away: the cheapest call on the hot path
                return await client.evalsha(found.sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted or flushed Redis: load the script again
                return await found(keys=keys, args=args, client=client)
        except RedisError as exc:
            raise store_unavailable(exc) from None

    async def create(self, record: Record, ttl: float, max_per_user: int) -> list[Record]:
        p = self._prefix
        raw = await self._run(
            "create",
            [f"{p}s:{record['id']}", f"{p}t:{record['token_hash']}", f"{p}u:{record['user_id']}"],
            [record["id"], json.dumps(record), _ms(ttl), max_per_user, p,
             record["token_hash"], record["user_id"], record["created_at"], *self._marking(ttl),
             repr(float(record["created_at"]) - ONLINE_KEEP)],
        )
        return [json.loads(r) for r in raw or []]

    async def lookup(self, token_hash: str) -> Record | None:
        raw = await self._run("lookup", [f"{self._prefix}t:{token_hash}"], [self._prefix])
        return json.loads(raw) if raw else None

    async def lookup_superseded(self, token_hash: str) -> Record | None:
        raw = await self._run("lookup", [f"{self._prefix}r:{token_hash}"], [self._prefix])
        record: Record | None = json.loads(raw) if raw else None
        if record is None or token_hash not in (record.get("superseded_hashes") or []):
            return None
        return record

    async def ended(self, token_hash: str) -> str | None:
        try:
            reason = await self.client.get(f"{self._prefix}e:{token_hash}")
        except RedisError as exc:
            raise store_unavailable(exc) from None
        return str(reason) if reason else None  # (decode_responses: already text)

    def _marking(self, ttl: float) -> list[int]:
        """The scripts' marker arguments: a live token's marker TTL (the
        session's plus the retention) and the retention (0: no markers), in ms."""
        if self.retention <= 0:
            return [0, 0]
        return [_ms(ttl + self.retention), _ms(self.retention)]

    async def get(self, session_id: str) -> Record | None:
        try:
            raw = await self.client.get(f"{self._prefix}s:{session_id}")
        except RedisError as exc:
            raise store_unavailable(exc) from None
        return json.loads(raw) if raw else None

    async def _save(self, record: Record, ttl: float, grace: float | None) -> bool:
        p = self._prefix
        old = record.get("prev_token_hash") or "" if grace is not None else ""
        expected = old if grace is not None else record["token_hash"]
        ok = await self._run(
            "save",
            [f"{p}s:{record['id']}", f"{p}t:{record['token_hash']}", f"{p}u:{record['user_id']}"]
            + ([f"{p}t:{old}"] if old else []),
            [record["id"], json.dumps(record), _ms(ttl), p, record["token_hash"], old,
             _ms(min(grace, ttl)) if grace else 0, record["user_id"], record["created_at"], expected,
             *self._marking(ttl)],
        )
        return bool(ok)

    async def save(self, record: Record, ttl: float) -> bool:
        return await self._save(record, ttl, None)

    async def rotate(self, record: Record, ttl: float, grace: float) -> bool:
        return await self._save(record, ttl, grace)

    async def delete(self, session_id: str) -> Record | None:
        raw = await self._run("delete", [f"{self._prefix}s:{session_id}"],
                              [self._prefix, session_id, _ms(self.retention) if self.retention > 0 else 0])
        return json.loads(raw) if raw else None

    async def list_user(self, user_id: str) -> list[Record]:
        ukey = f"{self._prefix}u:{user_id}"
        try:
            ids: list[Any] = await self.client.zrange(ukey, 0, -1)
            if not ids:
                return []
            raws = await self.client.mget([f"{self._prefix}s:{i}" for i in ids])
            dead = [i for i, r in zip(ids, raws) if r is None]
            if dead:
                await self.client.zrem(ukey, *dead)
        except RedisError as exc:
            raise store_unavailable(exc) from None
        return [json.loads(r) for r in raws if r is not None]

    async def online(self, since: float, limit: int, after: tuple[float, str] | None = None) -> list[tuple[str, float]]:
        key = f"{self._prefix}o"
        found: list[tuple[str, float]] = []
        try:
            await self.client.zremrangebyscore(key, "-inf", f"({since!r}")
            low, offset = (after[0] if after is not None else since), 0
            while len(found) < limit:
                batch: list[Any] = await self.client.zrangebyscore(key, low, "+inf", start=offset, num=limit + 1,
                                                                   withscores=True)
                if not batch:
                    break
                offset += len(batch)
                found += [(str(user), float(score)) for user, score in batch
                          if after is None or (float(score), str(user)) > after]
        except RedisError as exc:
            raise store_unavailable(exc) from None
        return found[:limit]
