"""The operator API's operations, apart from HTTP: served under ``/admin/``
by the admin listener (:mod:`gateway.admin`) and run by the ``gateway
sessions`` and ``gateway unlock`` commands (:mod:`gateway.cli`).

Every call needs ``admin.token`` (``token_env``): :func:`check_token`
compares the ``Authorization: Bearer`` value with it in constant time.
Without a configured token the API is off and its paths answer 404, as
unknown paths do; with one, a missing or wrong token is 401
``unauthenticated``.  Every call is audited (:func:`audit`) with the
operator's *token id* (:mod:`gateway.audit`), :func:`token_id`: the first 8 hex digits of the
token's SHA-256, which names the token without giving it away.

A user view never holds an identity's ``data`` (provider secrets such as
a password hash).  Unlocking goes through the provider
(:meth:`gateway.api.Provider.unlock`): the shared-state keys of a lockout
are the provider's own.

Presence reads what the session touch already writes (``last_seen_at``,
and the store's online index, kept by the same store call): it costs no
write per request.  A user is *online* while one of their live sessions
was used within :func:`presence_window`: ``admin.presence_window``, but
never less than what ``last_seen_at`` can tell (``sessions.touch_interval``,
plus the interval at which open WebSockets' sessions are touched and a
second of slack, so that an open socket keeps its user online).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncContextManager, AsyncIterator, Callable, Mapping, Protocol, Sequence

from gateway import audit as audit_log
from gateway.errors import GatewayError, invalid_request, not_found
from gateway.sessions.manager import Session, iso

if TYPE_CHECKING:
    from gateway.api import Identity, Provider, User
    from gateway.config import Config
    from gateway.profiles.base import ProfileStore
    from gateway.sessions.base import SessionStore
    from gateway.sessions.manager import SessionManager
    from gateway.state import SharedState

__all__ = [
    "MAX_PRESENCE_USERS", "ONLINE_LIMIT", "REASON", "Operator", "OperatorServices", "audit", "check_token",
    "presence_window", "token_id",
]

log = logging.getLogger("gateway.operator")

#: the ``reason`` of sessions an operator ends
REASON = "operator"
#: users one ``GET /admin/presence`` may ask about
MAX_PRESENCE_USERS = 100
#: ``GET /admin/presence/online``: the default and the largest ``limit``
ONLINE_LIMIT = (100, 1000)
#: how often the sessions of open WebSockets are checked and touched
#: (:data:`gateway.proxy.websocket.WATCH_INTERVAL`; a test keeps them equal)
SOCKET_TOUCH_INTERVAL = 2.0
#: what the window allows beyond the two for a touch under way (a socket's check takes time too)
PRESENCE_SLACK = 1.0


class OperatorServices(Protocol):
    """What the operations use: a :class:`gateway.app.Gateway` (started, or
    at least with its stores open)."""

    @property
    def config(self) -> Config: ...
    @property
    def sessions(self) -> SessionManager: ...
    @property
    def session_store(self) -> SessionStore: ...
    @property
    def state(self) -> SharedState: ...
    @property
    def profiles(self) -> ProfileStore: ...
    @property
    def providers(self) -> Mapping[str, Provider]: ...


# -- the token ----------------------------------------------------------------------------


def token_id(token: str) -> str:
    """A non-secret name of a token: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _bearer(header: str | None) -> str:
    parts = (header or "").split(None, 1)
    return parts[1].strip() if len(parts) == 2 and parts[0].lower() == "bearer" else ""


def check_token(configured: str, authorization: str | None) -> str:
    """The token id of the request's bearer token when it is ``configured``
    (compared in constant time); 404 when no token is configured (the API is
    off), 401 when the request's is missing or wrong."""
    if not configured:
        raise not_found()
    presented = _bearer(authorization)
    if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), configured.encode()):
        raise GatewayError("unauthenticated", "the operator API needs Authorization: Bearer <admin token>",
                           headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
                           log_message=f"operator API: {'a wrong' if presented else 'no'} admin token")
    return token_id(configured)


def audit(event: str, **fields: Any) -> None:
    """The audit line of an operator call (:func:`gateway.audit.record`;
    ``operator`` is the token id, never the token)."""
    audit_log.record(event, **fields)


def presence_window(config: Config) -> float:
    """Seconds within which a use of a session counts as online (see the
    module docstring)."""
    return max(config.admin.presence_window,
               config.sessions.touch_interval + SOCKET_TOUCH_INTERVAL + PRESENCE_SLACK)


# -- cursors of the online listing ---------------------------------------------------------


def _cursor(seen: float, user_id: str) -> str:
    return base64.urlsafe_b64encode(f"{seen!r}:{user_id}".encode()).decode().rstrip("=")


def _after(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        seen, user_id = raw.split(":", 1)
        return float(seen), user_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise invalid_request("cursor: not a cursor this listing gave") from None


# -- the operations ------------------------------------------------------------------------


def _identity(identity: Identity) -> dict[str, Any]:
    """An identity as operators see it: never its ``data``."""
    return {"provider": identity.provider, "subject": identity.subject,
            "created_at": identity.created_at.isoformat().replace("+00:00", "Z")}


def _user(user: User, identities: Sequence[Identity]) -> dict[str, Any]:
    return {"id": user.id, "profile": user.profile,
            "created_at": user.created_at.isoformat().replace("+00:00", "Z"),
            "updated_at": user.updated_at.isoformat().replace("+00:00", "Z"),
            "identities": [_identity(i) for i in identities]}


def _listing(session: Session) -> dict[str, Any]:
    entry = session.listing(None)
    entry.pop("current", None)  # nobody's current session: the operator holds none
    return entry


def parse_identity(value: str) -> tuple[str, str]:
    """``provider:subject`` (the subject may hold ``:``)."""
    provider, sep, subject = value.partition(":")
    if not sep or not provider or not subject:
        raise invalid_request("identity: expected provider:subject")
    return provider, subject


@dataclass
class Operator:
    """The operations on a gateway's stores; ``use()`` lends the services
    for one call (in the supervisor of several workers, its own clients,
    opened on demand and closed around every fork)."""

    use: Callable[[], AsyncContextManager[OperatorServices]]

    @classmethod
    def of(cls, gateway: OperatorServices) -> Operator:
        """The operations on a started gateway (one process, a command)."""

        @contextlib.asynccontextmanager
        async def lend() -> AsyncIterator[OperatorServices]:
            yield gateway

        return cls(lend)

    async def _known_user(self, gw: OperatorServices, user_id: str) -> User:
        user = await gw.profiles.get_user(user_id)
        if user is None:
            raise not_found("no such user")
        return user

    async def user_sessions(self, user_id: str) -> dict[str, Any]:
        """``GET /admin/users/{id}/sessions``: the user's live sessions."""
        async with self.use() as gw:
            await self._known_user(gw, user_id)
            sessions = await gw.sessions.list_user(user_id)
        return {"user_id": user_id, "sessions": [_listing(s) for s in sessions]}

    async def revoke_user_sessions(self, user_id: str) -> dict[str, Any]:
        """``DELETE /admin/users/{id}/sessions``: every session, reason ``operator``."""
        async with self.use() as gw:
            await self._known_user(gw, user_id)
            with audit_log.acting("operator"):
                revoked = await gw.sessions.revoke_user(user_id, REASON)
        return {"user_id": user_id, "revoked": [s.id for s in revoked]}

    async def revoke_session(self, session_id: str) -> dict[str, Any]:
        """``DELETE /admin/sessions/{id}``, reason ``operator``."""
        async with self.use() as gw:
            with audit_log.acting("operator"):
                session = await gw.sessions.revoke(session_id, REASON)
        if session is None:
            raise not_found("no such session")
        return {"id": session.id, "user_id": session.user_id, "revoked": True}

    async def unlock(self, provider_name: str, subject: str) -> dict[str, Any]:
        """``DELETE /admin/lockouts/{provider}/{subject}``, through the provider."""
        async with self.use() as gw:
            provider = gw.providers.get(provider_name)
            if provider is None:
                raise not_found("no such provider")
            unlocked = await provider.unlock(subject)
        return {"provider": provider_name, "subject": subject, "unlocked": bool(unlocked)}

    async def user(self, user_id: str) -> dict[str, Any]:
        """``GET /admin/users/{id}``: the profile and linked identities."""
        async with self.use() as gw:
            user = await self._known_user(gw, user_id)
            identities = await gw.profiles.list_identities(user_id)
        return _user(user, identities)

    async def find_user(self, identity: str) -> dict[str, Any]:
        """``GET /admin/users?identity=provider:subject``."""
        provider, subject = parse_identity(identity)
        async with self.use() as gw:
            found = await gw.profiles.get_identity(provider, subject)
            user = await gw.profiles.get_user(found.user_id) if found is not None else None
            if found is None or user is None:
                raise not_found("no user has this identity")
            identities = await gw.profiles.list_identities(user.id)
        return _user(user, identities)

    async def presence(self, user_ids: Sequence[str]) -> dict[str, Any]:
        """``GET /admin/presence?user=ID...``: per user, ``online`` and
        ``last_seen_at`` (the latest use of a live session; ``null`` with none)."""
        if not user_ids:
            raise invalid_request("user: at least one")
        if len(user_ids) > MAX_PRESENCE_USERS:
            raise invalid_request(f"user: at most {MAX_PRESENCE_USERS}")
        async with self.use() as gw:
            window = presence_window(gw.config)
            asked = list(dict.fromkeys(user_ids))
            listings = await asyncio.gather(*(gw.sessions.list_user(user_id) for user_id in asked))
        since = time.time() - window
        users = []
        for user_id, sessions in zip(asked, listings):
            seen = max((s.last_seen_at for s in sessions), default=None)
            users.append({"user_id": user_id, "online": seen is not None and seen >= since, "last_seen_at": iso(seen)})
        return {"window": window, "users": users}

    async def online(self, limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        """``GET /admin/presence/online``: a page of the users online now,
        oldest use first; ``next_cursor`` (``null`` at the end) gives the next."""
        default, largest = ONLINE_LIMIT
        limit = default if limit is None else limit
        if not 1 <= limit <= largest:
            raise invalid_request(f"limit: from 1 to {largest}")
        after = _after(cursor) if cursor else None
        async with self.use() as gw:
            window = presence_window(gw.config)
            found = await gw.session_store.online(time.time() - window, limit + 1, after)
        page = found[:limit]
        more = len(found) > limit and page
        return {"window": window,
                "users": [{"user_id": user_id, "last_seen_at": iso(seen)} for user_id, seen in page],
                "next_cursor": _cursor(page[-1][1], page[-1][0]) if more else None}
