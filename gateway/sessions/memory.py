"""In-memory session store: for a one-process trial and for tests.

Same contract as the Redis store (one contract test suite runs on both);
state lives in this process only, so it is a configuration error to use it
with more than one worker.
"""

from __future__ import annotations

import copy
import time

from gateway.sessions.base import Record, SessionStore


def _hashes(record: Record) -> list[str]:
    """Every token hash of a session: current, previous, superseded."""
    found = [record.get("token_hash"), record.get("prev_token_hash"), *(record.get("superseded_hashes") or [])]
    return list(dict.fromkeys(h for h in found if isinstance(h, str) and h))


class MemorySessionStore(SessionStore):
    name = "memory"
    shared = False

    #: every this many writes, expired entries are swept (Redis does this with TTLs)
    SWEEP_EVERY = 1000

    def __init__(self, *, retention: float = 86400.0) -> None:
        self.retention = retention
        self._sessions: dict[str, tuple[Record, float]] = {}
        self._tokens: dict[str, tuple[str, float]] = {}
        #: hash of a token /refresh replaced -> (session id, deadline)
        self._superseded: dict[str, tuple[str, float]] = {}
        self._users: dict[str, dict[str, float]] = {}
        #: token hash -> (reason, deadline): how its session ended (or will)
        self._ended: dict[str, tuple[str, float]] = {}
        #: the online index: user id -> when one of their sessions was last created or touched
        self._online: dict[str, float] = {}
        self._writes = 0

    def _count_write(self) -> None:
        self._writes += 1
        if self._writes % self.SWEEP_EVERY == 0:
            self.sweep()

    def sweep(self) -> None:
        """Forget expired sessions and token entries."""
        now = time.time()
        for session_id in [sid for sid, (_, deadline) in self._sessions.items() if deadline <= now]:
            self._live_session(session_id)
        for token_hash in [h for h, (_, deadline) in self._tokens.items() if deadline <= now]:
            self._tokens.pop(token_hash, None)
        for token_hash in [h for h, (_, deadline) in self._superseded.items() if deadline <= now]:
            self._superseded.pop(token_hash, None)
        for token_hash in [h for h, (_, deadline) in self._ended.items() if deadline <= now]:
            self._ended.pop(token_hash, None)

    def _mark(self, hashes: list[str], reason: str, ttl: float) -> None:
        if self.retention > 0:
            deadline = time.time() + ttl
            for h in hashes:
                self._ended[h] = (reason, deadline)

    def _mark_live(self, record: Record, ttl: float) -> None:
        """The markers of a live session's tokens (see the store contract)."""
        current = record["token_hash"]
        self._mark([current], "expired", ttl + self.retention)
        self._mark([h for h in _hashes(record) if h != current], "superseded", ttl + self.retention)

    def _live_session(self, session_id: str) -> Record | None:
        item = self._sessions.get(session_id)
        if item is None:
            return None
        record, deadline = item
        if deadline <= time.time():
            self._drop(record)
            return None
        return record

    def _drop(self, record: Record) -> None:
        self._sessions.pop(record["id"], None)
        for key in ("token_hash", "prev_token_hash"):
            h = record.get(key)
            if h and self._tokens.get(h, ("",))[0] == record["id"]:
                self._tokens.pop(h, None)
        for h in record.get("superseded_hashes") or []:
            if self._superseded.get(h, ("",))[0] == record["id"]:
                self._superseded.pop(h, None)
        users = self._users.get(record["user_id"])
        if users is not None:
            users.pop(record["id"], None)
            if not users:
                self._users.pop(record["user_id"], None)

    async def create(self, record: Record, ttl: float, max_per_user: int) -> list[Record]:
        self._count_write()
        deadline = time.time() + ttl
        self._sessions[record["id"]] = (copy.deepcopy(record), deadline)
        self._tokens[record["token_hash"]] = (record["id"], deadline)
        self._users.setdefault(record["user_id"], {})[record["id"]] = record["created_at"]
        self._seen(record["user_id"], record["created_at"])
        self._mark_live(record, ttl)
        evicted: list[Record] = []
        if max_per_user > 0:
            live = await self.list_user(record["user_id"])
            for old in live[: max(0, len(live) - max_per_user)]:
                gone = await self.delete(old["id"])
                if gone is not None:
                    evicted.append(gone)
        return evicted

    async def lookup(self, token_hash: str) -> Record | None:
        item = self._tokens.get(token_hash)
        if item is None:
            return None
        session_id, deadline = item
        if deadline <= time.time():
            self._tokens.pop(token_hash, None)
            return None
        record = self._live_session(session_id)
        return copy.deepcopy(record) if record is not None else None

    async def lookup_superseded(self, token_hash: str) -> Record | None:
        item = self._superseded.get(token_hash)
        if item is None:
            return None
        session_id, deadline = item
        if deadline <= time.time():
            self._superseded.pop(token_hash, None)
            return None
        record = self._live_session(session_id)
        if record is None or token_hash not in (record.get("superseded_hashes") or []):
            return None
        return copy.deepcopy(record)

    async def ended(self, token_hash: str) -> str | None:
        item = self._ended.get(token_hash)
        if item is None:
            return None
        reason, deadline = item
        if deadline <= time.time():
            self._ended.pop(token_hash, None)
            return None
        return reason

    async def get(self, session_id: str) -> Record | None:
        record = self._live_session(session_id)
        return copy.deepcopy(record) if record is not None else None

    async def save(self, record: Record, ttl: float) -> bool:
        return self._write(record, ttl, expected=record["token_hash"])

    def _write(self, record: Record, ttl: float, expected: str | None) -> bool:
        current = self._live_session(record["id"])
        if current is None or current["token_hash"] != expected:
            return False
        deadline = time.time() + ttl
        self._sessions[record["id"]] = (copy.deepcopy(record), deadline)
        self._tokens[record["token_hash"]] = (record["id"], deadline)
        keep = set(record.get("superseded_hashes") or [])
        for h in keep:
            self._superseded[h] = (record["id"], deadline)
        for h in current.get("superseded_hashes") or []:
            if h not in keep and self._superseded.get(h, ("",))[0] == record["id"]:
                self._superseded.pop(h, None)
        self._mark_live(record, ttl)
        if isinstance(record.get("last_seen_at"), (int, float)):
            self._seen(record["user_id"], record["last_seen_at"])
        return True

    async def rotate(self, record: Record, ttl: float, grace: float) -> bool:
        if not self._write(record, ttl, expected=record.get("prev_token_hash")):
            return False
        old = record.get("prev_token_hash")
        if old:
            if grace > 0:
                self._tokens[old] = (record["id"], time.time() + min(grace, ttl))
            else:
                self._tokens.pop(old, None)
        return True

    async def delete(self, session_id: str) -> Record | None:
        record = self._live_session(session_id)
        if record is None:
            return None
        self._drop(record)
        self._mark(_hashes(record), "revoked", self.retention)
        if not await self.list_user(record["user_id"]):
            self._online.pop(record["user_id"], None)
        return copy.deepcopy(record)

    async def list_user(self, user_id: str) -> list[Record]:
        ids = sorted(self._users.get(user_id, {}).items(), key=lambda kv: kv[1])
        out = []
        for session_id, _ in ids:
            record = self._live_session(session_id)
            if record is not None:
                out.append(copy.deepcopy(record))
        return out

    def _seen(self, user_id: str, when: float) -> None:
        self._online[user_id] = max(when, self._online.get(user_id, when))

    async def online(self, since: float, limit: int, after: tuple[float, str] | None = None) -> list[tuple[str, float]]:
        for user_id in [u for u, seen in self._online.items() if seen < since]:
            del self._online[user_id]
        found = sorted((seen, user_id) for user_id, seen in self._online.items()
                       if after is None or (seen, user_id) > after)
        return [(user_id, seen) for seen, user_id in found[:limit]]
