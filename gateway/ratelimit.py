"""Rate limits: ``[[rate_limits]]``, counted in the shared state.

:class:`RateLimiter` is built once per gateway.  It matches the limits to
what they protect at start-up: to each route (by prefix) and to each path of
the gateway's own endpoints, so a request finds its limits with one
dictionary look-up, and a route without a limit costs nothing more.  Each
limit of a request is one atomic :meth:`gateway.state.SharedState.take`
(GCRA), shared by every process and every gateway on one Redis.

Every answer to a limited request carries the IETF ``RateLimit-Policy``
and ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers, structured
fields): ``"<name>";q=<limit>;w=<window>`` and
``"<name>";r=<remaining>;t=<seconds>``.  Over a limit the answer is
429 ``rate_limited`` (:class:`RateLimited`) with ``Retry-After``.

Without ``[[rate_limits]]`` in the configuration, :func:`default_limits`
applies: 20 logins a minute per client address on every provider's login
and on every provider endpoint that answers with a fresh session.  When
the shared state is down, a limit whose ``on_store_error`` is ``deny``
answers 503 ``unavailable``; ``allow`` serves the request uncounted and
logs so at most once a second.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Mapping, Protocol, Sequence

import tornado.httputil

from gateway.api import Principal, client_key
from gateway.config import RateLimitConfig
from gateway.errors import GatewayError, StoreUnavailable, too_many
from gateway.options import ConfigError
from gateway.state.base import SharedState

log = logging.getLogger("gateway.ratelimit")

#: the gateway's own endpoints under ``auth_prefix`` a limit may name (besides the providers')
CORE_ENDPOINTS = ("refresh", "logout", "logout-all", "session", "sessions", "consent", "profile", "openapi.json")

#: the limit applied when the configuration has no ``[[rate_limits]]``
DEFAULT_NAME, DEFAULT_LIMIT, DEFAULT_WINDOW = "login", 20, 60.0


@dataclass(frozen=True)
class Limit:
    """A limit as the limiter applies it."""

    name: str
    key: str
    limit: int
    window: float
    deny_on_store_error: bool

    @property
    def policy(self) -> str:
        """Its ``RateLimit-Policy`` item."""
        return f'"{self.name}";q={self.limit};w={int(self.window)}'

    def state(self, remaining: int, reset_after: float) -> str:
        """Its ``RateLimit`` item."""
        return f'"{self.name}";r={remaining};t={max(0, int(reset_after + 0.999))}'


class RateLimited(GatewayError):
    """429 ``rate_limited``: the request met :attr:`limit` (its name is the
    label of ``gateway_rate_limited_total``, and ``limit`` in the body)."""

    def __init__(self, limit: str, retry_after: float, headers: Mapping[str, str]) -> None:
        base = too_many("rate_limited", "too many requests; try again later", retry_after)
        super().__init__("rate_limited", base.message, headers={**base.headers, **headers},
                         fields={**base.fields, "limit": limit})
        self.limit = limit


class Caller(Protocol):
    """What the limiter needs of a request handler."""

    #: the RateLimit headers of the request, set here; an error answer sets them again
    rate_limit_headers: dict[str, str] | None

    @property
    def client_ip(self) -> str: ...

    @property
    def request(self) -> tornado.httputil.HTTPServerRequest: ...

    def set_header(self, name: str, value: str) -> None: ...


#: resolves the caller when a limit needs one (on the gateway's own endpoints)
ResolvePrincipal = Callable[[], Awaitable[Principal | None]]


def caller_key(kind: str, principal: Principal | None, headers: tornado.httputil.HTTPHeaders) -> str | None:
    """The part of the bucket's key a principal gives (``None``: not counted)."""
    if principal is None:
        return None
    if kind == "user":
        return principal.user_id
    if kind == "session":
        return principal.session_id
    # credential: a caller a provider authenticated itself (no session), by
    # provider, user and the credential (a digest of the headers that carried
    # it, when the principal names them; else by provider and user alone)
    if principal.session is not None:
        return None
    carried = "\n".join(v for name in principal.headers_to_strip for v in headers.get_list(name))
    credential = hashlib.sha256(carried.encode()).hexdigest()[:32] if carried else ""
    return f"{principal.provider}:{principal.user_id}:{credential}"


def default_limits(login_paths: Iterable[str]) -> list[tuple[Limit, tuple[str, ...]]]:
    """The default: 20 logins a minute per client address, on ``login_paths``."""
    paths = tuple(login_paths)
    return [(Limit(DEFAULT_NAME, "ip", DEFAULT_LIMIT, DEFAULT_WINDOW, True), paths)] if paths else []


class RateLimiter:
    """The limits of one gateway, matched to routes and endpoint paths."""

    def __init__(self, state: SharedState, routes: Mapping[str, tuple[Limit, ...]],
                 paths: Mapping[str, tuple[Limit, ...]]) -> None:
        self.state = state
        #: route prefix -> its limits (only routes that have some)
        self.routes = dict(routes)
        #: endpoint path (no trailing "/") -> its limits (only paths that have some)
        self.paths = dict(paths)
        self._last_allow_log = 0.0

    @classmethod
    def build(cls, state: SharedState, configured: Sequence[RateLimitConfig] | None, *, auth_prefix: str,
              route_prefixes: Sequence[str], endpoints: Sequence[str], login_paths: Sequence[str]) -> RateLimiter:
        """Match the limits once: ``configured`` (``None``: the default on
        ``login_paths``) against ``route_prefixes`` and the gateway's own
        ``endpoints`` (full paths).  Raises :class:`ConfigError` for a
        limit naming no endpoint."""
        auth = auth_prefix.rstrip("/")
        known = {e.rstrip("/") for e in endpoints} | {f"{auth}/{name}" for name in CORE_ENDPOINTS}
        routes: dict[str, list[Limit]] = {}
        paths: dict[str, list[Limit]] = {}
        if configured is None:
            for limit, where in default_limits(login_paths):
                for path in where:
                    paths.setdefault(path.rstrip("/"), []).append(limit)
        else:
            problems: list[str] = []
            for i, c in enumerate(configured):
                own = c.match.rstrip("/") == auth or c.match.startswith(auth + "/")
                deny = (c.on_store_error or ("deny" if own else "allow")) == "deny"
                limit = Limit(c.name, c.key, c.limit, c.window, deny)
                if own:
                    path = c.match.rstrip("/")
                    if path not in known:
                        problems.append(f"rate_limits[{i}].match: {c.match!r} is not one of the gateway's "
                                        f"endpoints (such as {sorted(known)[0]!r})")
                    paths.setdefault(path, []).append(limit)
                else:
                    for prefix in route_prefixes:
                        if prefix.startswith(c.match):
                            routes.setdefault(prefix, []).append(limit)
            if problems:
                raise ConfigError(problems)
        return cls(state, {k: tuple(v) for k, v in routes.items()}, {k: tuple(v) for k, v in paths.items()})

    def for_path(self, path: str) -> tuple[Limit, ...] | None:
        """The limits of a gateway endpoint's path (``None``: none)."""
        return self.paths.get(path.rstrip("/")) if self.paths else None

    async def check(self, caller: Caller, limits: Sequence[Limit], principal: Principal | None = None,
                    resolve: ResolvePrincipal | None = None) -> None:
        """Take one request from each of ``limits`` for ``caller`` (whose
        principal is ``principal``, or what ``resolve`` finds when a limit
        keyed by a caller needs it); set the RateLimit headers; raise
        :class:`RateLimited` over a limit, :class:`StoreUnavailable` when the
        state is down and the limit denies then."""
        policies: list[str] = []
        states: list[str] = []
        for limit in limits:
            if limit.key == "ip":
                part: str | None = client_key(caller.client_ip)
            else:
                if resolve is not None:
                    principal, resolve = await self._resolved(limit, resolve), None
                part = caller_key(limit.key, principal, caller.request.headers)
                if part is None:
                    continue  # no such caller: this limit does not count the request
            try:
                allowed, remaining, reset_after = await self.state.take(f"rl:{limit.name}:{limit.key}:{part}",
                                                                        limit.limit, limit.window)
            except StoreUnavailable:
                if limit.deny_on_store_error:
                    raise
                self._log_allowed(limit)
                continue
            policies.append(limit.policy)
            states.append(limit.state(remaining, reset_after))
            if not allowed:
                raise RateLimited(limit.name, reset_after, {"RateLimit-Policy": ", ".join(policies),
                                                            "RateLimit": ", ".join(states)})
        if policies:
            caller.rate_limit_headers = {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
            for name, value in caller.rate_limit_headers.items():
                caller.set_header(name, value)

    async def _resolved(self, limit: Limit, resolve: ResolvePrincipal) -> Principal | None:
        try:
            return await resolve()
        except StoreUnavailable:
            if limit.deny_on_store_error:
                raise
            self._log_allowed(limit)
            return None

    def _log_allowed(self, limit: Limit) -> None:
        now = time.monotonic()
        if now - self._last_allow_log >= 1.0:
            self._last_allow_log = now
            log.warning("rate limit %r: the shared state is unavailable; requests are served uncounted "
                        "(on_store_error = \"allow\")", limit.name)
