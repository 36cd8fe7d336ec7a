"""Hook specifications: the contract between the gateway and its plugins.

A plugin is a module (or object) with functions decorated by
:data:`gateway.hookimpl`, named after the hooks below, found through the
``gateway.plugins`` setuptools entry-point group.  The built-in providers in
``plugins/`` are registered through that same group.

Hooks are always called with keyword arguments, so an implementation may ask
for any subset of a hook's arguments, and a hook can gain arguments later
without breaking plugins.  Any hook may return a plain value or an awaitable,
except the two called while the gateway is built (``gateway_providers``,
``gateway_handlers``), which answer synchronously.  Hook wrappers are not
supported.
Every hook name starts with ``gateway_``; a misspelt implementation is a
start-up error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Iterable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from gateway.app import Gateway
    from gateway.providers import Provider
    from gateway.routing import Route
    from gateway.sessions.manager import Session
    from gateway.requestinfo import Principal
    import tornado.httputil

PROJECT = "gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------
# Identity providers
# ---------------------------------------------------------------------------


@hookspec
def gateway_providers(gateway: "Gateway") -> "Iterable[Provider] | None":
    """Contribute identity providers.

    Return a list of :class:`gateway.providers.Provider` *subclasses*
    (synchronously: this is called while the gateway is built).  Each is
    configured by the ``[providers.<name>]`` table, validated against
    ``cls.options``, instantiated each time a gateway is built (keep side
    effects in ``Provider.setup``) and served at
    ``POST {auth_prefix}/{cls.name}/login``.  Two providers with the same
    name are a start-up error.
    """


@hookspec(firstresult=True)
def gateway_authenticate(
    request: "tornado.httputil.HTTPServerRequest", gateway: "Gateway"
) -> "Principal | Awaitable[Principal | None] | None":
    """Authenticate a request that carries no valid session (an API key, say).

    Called when the request presents no live gateway session: no token, or a
    stale cookie (a request with a stale *Bearer* gateway token is not offered
    to plugins); and first, before the session, when a provider's
    ``credential_headers`` names a header of this request that also carries
    a session cookie (the explicit credential speaks for the request).
    Return a
    :class:`gateway.requestinfo.Principal` to accept it, ``None`` to pass, or
    raise :class:`gateway.errors.GatewayError` to refuse it.  Stops at the
    first non-``None`` result.
    """


# ---------------------------------------------------------------------------
# Session lifecycle events
# ---------------------------------------------------------------------------


@hookspec
def gateway_session_created(session: "Session", gateway: "Gateway") -> "Awaitable[None] | None":
    """A session was created by a login.  Every implementation is called;
    a failing one is logged and does not undo the login."""


@hookspec
def gateway_session_refreshed(
    session: "Session", previous_session: "Session", gateway: "Gateway"
) -> "Awaitable[None] | None":
    """A session's token was rotated by ``/refresh``.  ``session.id`` is
    unchanged; ``previous_session`` is the record before the rotation."""


@hookspec
def gateway_session_revoked(
    session: "Session", reason: str, gateway: "Gateway"
) -> "Awaitable[None] | None":
    """A session ended before its expiry.  ``reason`` is one of ``logout``,
    ``logout_all``, ``revoked`` (``DELETE /sessions/{id}``, or a replaced
    token presented to ``/refresh`` again),
    ``password_changed``, ``max_per_user``."""


# ---------------------------------------------------------------------------
# Proxying
# ---------------------------------------------------------------------------


@hookspec
def gateway_upstream_headers(
    request: "tornado.httputil.HTTPServerRequest",
    principal: "Principal | None",
    route: "Route",
    gateway: "Gateway",
) -> "dict[str, str] | Awaitable[dict[str, str] | None] | None":
    """Contribute headers for the upstream request.

    Called for every proxied request; ``principal`` is ``None`` for an
    anonymous one.  Return a dict of header name to value, or ``None``.
    Headers the gateway sets itself (the identity headers,
    ``X-Forwarded-For``/``-Proto``/``-Host``, ``X-Request-Id``) and
    hop-by-hop headers cannot be set this way.
    """


# ---------------------------------------------------------------------------
# Extra endpoints
# ---------------------------------------------------------------------------


@hookspec
def gateway_handlers(gateway: "Gateway") -> "list[tuple[Any, ...]] | None":
    """Contribute Tornado handlers.

    Return a list of ``(pattern, handler_class[, kwargs])`` tuples
    (synchronously: this is called while the application is built).  Patterns
    are matched before the proxy catch-all; use ``gateway.auth_path(...)`` to
    place an endpoint under the gateway's ``auth_prefix``.  Handlers should
    subclass :class:`gateway.handlers.base.BaseHandler` to get JSON errors,
    body parsing and session lookup.
    """


@hookspec
def gateway_startup(gateway: "Gateway") -> "Awaitable[None] | None":
    """The gateway has opened its stores and is about to listen.  A plugin
    that raises here stops start-up with its name in the error."""
