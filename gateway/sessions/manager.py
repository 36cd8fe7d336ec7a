"""Session lifecycle: creation, lookup with idle/absolute timeouts, touch,
token rotation, revocation and listing, and why a token opens no session.

A session is *remembered* ("remember me") or not, for good: a remembered one
lives by the remember timeouts and keeps them (its ``idle_timeout`` is in
its record, its absolute deadline is fixed at creation), through touches
and ``/refresh`` alike.

A token is 256 bits from :mod:`secrets`; the store only ever sees its
SHA-256, so a dump of the store holds no usable token.  Each session also has
a non-secret id, used in listings and upstream headers.

Tokens and session ids carry their user's slot tag
(:func:`gateway.sessions.base.slot_tag`): a token is
``gws_<tag>_<secret>`` and its hash ``<tag>.<sha256 hex of the token>``,
a session id ``s_<tag>_<random>``, so that a store spread over several
places finds a session from its token or id alone.  A token without a tag
(one from before tags, or a forged one) hashes to its bare digest, which
no store holds a session for.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping

from gateway.errors import Conflict
from gateway.sessions.base import TAG, Record, SessionStore, new_session_id, slot_tag, tagged_hash

log = logging.getLogger("gateway.sessions")

TOKEN_PREFIX = "gws_"
#: a token's shape: the prefix, the slot tag, ``_``, the secret
_TOKEN = re.compile(rf"{re.escape(TOKEN_PREFIX)}({TAG})_[A-Za-z0-9_\-]+")

EventSink = Callable[..., Awaitable[None]]


def new_token(tag: str) -> str:
    """A new token of a session whose slot tag is ``tag``."""
    return f"{TOKEN_PREFIX}{tag}_{secrets.token_urlsafe(32)}"


def token_tag(token: str) -> str | None:
    """The slot tag a token carries; ``None`` when it has none."""
    found = _TOKEN.fullmatch(token)
    return found.group(1) if found else None


def hash_token(token: str) -> str:
    """What the store knows a token by: ``<tag>.<sha256 hex>``, or the bare
    digest for a token without a tag (which opens nothing)."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    tag = token_tag(token)
    return tagged_hash(tag, digest) if tag is not None else digest


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Session:
    id: str
    user_id: str
    provider: str
    created_at: float
    last_seen_at: float
    expires_at: float
    absolute_expires_at: float
    token_hash: str
    ip: str = ""
    user_agent: str = ""
    prev_token_hash: str | None = None
    prev_token_expires_at: float = 0.0
    #: when /refresh last replaced the token
    rotated_at: float = 0.0
    #: SHA-256 of the tokens /refresh replaced, oldest first (at most
    #: SessionManager.KEEP_SUPERSEDED): presenting one to /refresh again ends the session
    superseded_hashes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    #: a "remember me" session (a persistent cookie, the remember timeouts)
    remembered: bool = False
    #: this session's idle timeout (0: a record older than the field, the manager's own)
    idle_timeout: float = 0.0

    @classmethod
    def from_record(cls, record: Record) -> "Session":
        known = _SESSION_FIELDS if cls is Session else frozenset(cls.__dataclass_fields__)
        if record.keys() <= known:  # a record this version wrote: every key is a field
            return cls(**record)
        return cls(**{k: v for k, v in record.items() if k in known})

    def to_record(self) -> Record:
        return asdict(self)

    def public(self) -> dict[str, Any]:
        """What ``GET /session`` shows."""
        return {
            "id": self.id,
            "provider": self.provider,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "absolute_expires_at": iso(self.absolute_expires_at),
            "remembered": self.remembered,
        }

    def listing(self, current_id: str | None) -> dict[str, Any]:
        """What ``GET /sessions`` shows for one entry."""
        return {
            "id": self.id,
            "provider": self.provider,
            "created_at": iso(self.created_at),
            "last_seen_at": iso(self.last_seen_at),
            "expires_at": iso(self.expires_at),
            "remembered": self.remembered,
            "ip": self.ip,
            "user_agent": self.user_agent,
            "current": self.id == current_id,
        }


#: the fields of a :class:`Session` (what :meth:`Session.from_record` keeps of a record)
_SESSION_FIELDS = frozenset(Session.__dataclass_fields__)


class SupersededToken(Exception):
    """The token was replaced by ``/refresh`` (still in its grace period)."""


@dataclass(frozen=True)
class Lifetime:
    """The timeouts of one kind of session (remembered or not), in seconds."""

    idle: float
    absolute: float


class SessionManager:
    #: superseded token hashes remembered per session for reuse detection
    #: (bounded, so a client refreshing in a loop cannot grow the store)
    KEEP_SUPERSEDED = 16

    def __init__(
        self,
        store: SessionStore,
        *,
        idle_timeout: float,
        absolute_timeout: float,
        touch_interval: float,
        rotation_grace: float,
        max_per_user: int = 0,
        events: EventSink | None = None,
        remember_idle_timeout: float | None = None,
        remember_absolute_timeout: float | None = None,
    ) -> None:
        self.store = store
        #: the idle timeout of a session that is not remembered
        self.idle_timeout = idle_timeout
        #: by ``remembered``: the timeouts of each kind of session
        self.lifetimes = {
            False: Lifetime(idle_timeout, absolute_timeout),
            True: Lifetime(remember_idle_timeout or idle_timeout, remember_absolute_timeout or absolute_timeout),
        }
        self.touch_interval = touch_interval
        self.rotation_grace = rotation_grace
        self.max_per_user = max_per_user
        self._events = events

    async def _emit(self, hook: str, **kwargs: Any) -> None:
        if self._events is not None:
            await self._events(hook, **kwargs)

    @property
    def absolute_timeout(self) -> float:
        """Seconds a session lives at most (a remembered one, if longer)."""
        return max(lifetime.absolute for lifetime in self.lifetimes.values())

    def idle_timeout_of(self, session: Session) -> float:
        """The session's own idle timeout."""
        return session.idle_timeout or self.lifetimes[session.remembered].idle

    def idle_deadline(self, session: Session, now: float) -> float:
        """When ``session`` goes idle if used at ``now`` (never past its absolute deadline)."""
        return min(now + self.idle_timeout_of(session), session.absolute_expires_at)

    def _ttl(self, s: Session, now: float) -> float:
        return max(0.001, min(s.expires_at, s.absolute_expires_at) - now)

    async def create(
        self, user_id: str, provider: str, *, ip: str = "", user_agent: str = "", data: dict[str, Any] | None = None,
        remember: bool = False,
    ) -> tuple[str, Session]:
        """A brand-new session (never a reused one) and its token; a
        ``remember`` one lives by the remember timeouts."""
        now = time.time()
        tag = slot_tag(user_id)
        token = new_token(tag)
        lifetime = self.lifetimes[remember]
        absolute = now + lifetime.absolute
        session = Session(
            id=new_session_id(tag, secrets.token_urlsafe(12)),
            user_id=user_id,
            provider=provider,
            created_at=now,
            last_seen_at=now,
            expires_at=min(now + lifetime.idle, absolute),
            absolute_expires_at=absolute,
            token_hash=hash_token(token),
            ip=ip,
            user_agent=user_agent[:512],
            data=data or {},
            remembered=remember,
            idle_timeout=lifetime.idle,
        )
        evicted = await self.store.create(session.to_record(), self._ttl(session, now), self.max_per_user)
        await self._emit("gateway_session_created", session=session)
        for record in evicted:
            await self._emit("gateway_session_revoked", session=Session.from_record(record), reason="max_per_user")
        return token, session

    async def authenticate(self, token: str, *, ip: str | None = None, allow_superseded: bool = True) -> Session | None:
        """The live session this token opens, touched if due; else ``None``.

        Raises :class:`SupersededToken` for a token in its rotation grace
        period when ``allow_superseded`` is false.
        """
        if not token or len(token) > 512:
            return None
        token_hash = hash_token(token)
        record = await self.store.lookup(token_hash)
        now = time.time()
        session = self._valid(record, token_hash, now, allow_superseded)
        if session is None:
            return None
        if now - session.last_seen_at >= self.touch_interval:
            session.last_seen_at = now
            session.expires_at = self.idle_deadline(session, now)
            if ip:
                session.ip = ip
            if not await self.store.save(session.to_record(), self._ttl(session, now)):
                # Revoked, or rotated by a concurrent /refresh since we read
                # it: judge the token against what is stored now.
                record = await self.store.lookup(token_hash)
                return self._valid(record, token_hash, time.time(), allow_superseded)
        return session

    async def ended_reason(self, token: str) -> str:
        """Why ``token`` opens no session, once :meth:`authenticate` said it
        does not (the ``reason`` of the 401): ``expired``, ``revoked`` or
        ``superseded`` while the store still recognises it
        (``sessions.ended_retention``), else ``invalid``.  One store read,
        on the failure path only."""
        if not token or len(token) > 512:
            return "invalid"
        return await self.store.ended(hash_token(token)) or "invalid"

    @staticmethod
    def _valid(record: Record | None, token_hash: str, now: float, allow_superseded: bool) -> Session | None:
        """The session if ``token_hash`` opens it now (current token, or the
        previous one within its grace period)."""
        if record is None:
            return None
        session = Session.from_record(record)
        if now >= session.expires_at or now >= session.absolute_expires_at:
            return None
        if not hmac.compare_digest(session.token_hash, token_hash):
            previous = session.prev_token_hash or ""
            if not (hmac.compare_digest(previous, token_hash) and now < session.prev_token_expires_at):
                return None
            if not allow_superseded:
                raise SupersededToken()
        return session

    async def refresh(self, session: Session) -> tuple[str, Session]:
        """Rotate the token; the old one keeps working ``rotation_grace``
        seconds.  The absolute deadline does not move.  Raises
        :class:`SupersededToken` if another refresh rotated it first and
        ``LookupError`` if the session has ended."""
        previous = Session.from_record(session.to_record())
        now = time.time()
        token = new_token(slot_tag(session.user_id))
        session.prev_token_hash = session.token_hash
        session.prev_token_expires_at = now + self.rotation_grace
        session.rotated_at = now
        session.superseded_hashes = (list(session.superseded_hashes) + [session.token_hash])[-self.KEEP_SUPERSEDED:]
        session.token_hash = hash_token(token)
        session.last_seen_at = now
        session.expires_at = self.idle_deadline(session, now)
        if not await self.store.rotate(session.to_record(), self._ttl(session, now), self.rotation_grace):
            if await self.store.get(session.id) is None:
                raise LookupError("session ended")
            raise SupersededToken()  # a concurrent /refresh with the same token won
        await self._emit("gateway_session_refreshed", session=session, previous_session=previous)
        return token, session

    async def find_reused(self, token: str, *, presented_at: float, race_window: float = 0.0) -> Session | None:
        """Refresh-token reuse detection (OAuth 2.0 Security BCP): the session
        that ``token`` was a token of before ``/refresh`` replaced it, in its
        grace period or long after; ``None`` for any other token.  Whoever
        presents such a token to ``/refresh`` replays an old token (it may
        have been stolen): end that session with :meth:`end_reused`.

        The token replaced last, presented (the request arrived at
        ``presented_at``) no later than ``race_window`` seconds after its
        replacement, is no reuse: a concurrent ``/refresh`` with the same
        token merely won the race."""
        if not token or len(token) > 512:
            return None
        token_hash = hash_token(token)
        record = await self.store.lookup_superseded(token_hash)
        if record is None or hmac.compare_digest(record.get("token_hash") or "", token_hash):
            return None
        if not any(hmac.compare_digest(h, token_hash) for h in record.get("superseded_hashes") or []):
            return None
        session = Session.from_record(record)
        if hmac.compare_digest(session.prev_token_hash or "", token_hash) \
                and presented_at <= session.rotated_at + race_window:
            return None
        return session

    async def end_reused(self, session: Session) -> Session | None:
        """End a session whose replaced token was presented again (reason ``revoked``)."""
        log.warning("a superseded token of session %s was presented to refresh again: the session is ended",
                    session.id)
        return await self.revoke(session.id, "revoked")

    async def revoke(self, session_id: str, reason: str) -> Session | None:
        record = await self.store.delete(session_id)
        if record is None:
            return None
        session = Session.from_record(record)
        await self._emit("gateway_session_revoked", session=session, reason=reason)
        return session

    async def update_data(self, session_id: str, changes: Mapping[str, Any]) -> Session | None:
        """Set these keys of a live session's ``data``, its token and
        deadlines kept: a compare-and-set save, read again and retried when
        a concurrent ``/refresh`` rotated the token.  The session as saved,
        or ``None`` when it has ended."""
        for _ in range(3):
            record = await self.store.get(session_id)
            now = time.time()
            if record is None:
                return None
            session = Session.from_record(record)
            if now >= session.expires_at or now >= session.absolute_expires_at:
                return None
            session.data = {**session.data, **changes}
            if await self.store.save(session.to_record(), self._ttl(session, now)):
                return session
        raise Conflict("the session changed while its data was being saved; try again")

    async def list_user(self, user_id: str) -> list[Session]:
        now = time.time()
        sessions = [Session.from_record(r) for r in await self.store.list_user(user_id)]
        return [s for s in sessions if now < s.expires_at and now < s.absolute_expires_at]

    async def revoke_user(self, user_id: str, reason: str, *, keep: str | None = None) -> list[Session]:
        """Revoke every session of the user except ``keep``."""
        revoked = []
        for record in await self.store.list_user(user_id):
            if record["id"] != keep:
                gone = await self.revoke(record["id"], reason)
                if gone is not None:
                    revoked.append(gone)
        return revoked
