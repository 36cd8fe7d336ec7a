"""Hook specifications: the contract between the gateway and its plugins.

A plugin is a module (or object) with functions decorated by
:data:`gateway.hookimpl`, named after the hooks below, found through the
``gateway.plugins`` entry-point group; the built-in providers in
``plugins/`` are registered through that same group.  Hooks are for what
cuts across providers; what one provider does is a method of its
:class:`gateway.api.Provider` class.

Hooks are called with keyword arguments, so an implementation may ask for
any subset of a hook's arguments.  Any hook may return a plain value or an
awaitable, except those called while the gateway or the command line is
built (``gateway_providers``, ``gateway_handlers``, ``gateway_commands``),
which answer synchronously.  Hook wrappers are not supported.  Every hook
name starts with ``gateway_``; a misspelt implementation is a start-up error.
The contracts are documented, with examples, in docs/plugins.md.
"""

from __future__ import annotations

from typing import Any, Awaitable, Iterable

import pluggy
import tornado.httputil

from gateway.api import Command, Principal, Provider, RouteView, Services, SessionView

PROJECT = "gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gateway_providers() -> "Iterable[type[Provider]] | None":
    """Identity provider classes (:class:`gateway.api.Provider` subclasses)."""


@hookspec
def gateway_commands() -> "Iterable[Command] | None":
    """``gateway <name> ...`` subcommands (:class:`gateway.api.Command`)."""


@hookspec(firstresult=True)
def gateway_authenticate(
    request: tornado.httputil.HTTPServerRequest, gateway: Services
) -> "Principal | Awaitable[Principal | None] | None":
    """Authenticate a request no session and no provider accepted; the first
    non-``None`` :class:`gateway.api.Principal` wins."""


@hookspec
def gateway_session_created(session: SessionView, gateway: Services) -> "Awaitable[None] | None":
    """A login created a session."""


@hookspec
def gateway_session_refreshed(
    session: SessionView, previous_session: SessionView, gateway: Services
) -> "Awaitable[None] | None":
    """``/refresh`` rotated a session's token."""


@hookspec
def gateway_session_revoked(session: SessionView, reason: str, gateway: Services) -> "Awaitable[None] | None":
    """A session ended before its expiry, for ``reason``."""


@hookspec
def gateway_upstream_headers(
    request: tornado.httputil.HTTPServerRequest,
    principal: Principal | None,
    route: RouteView,
    gateway: Services,
) -> "dict[str, str] | Awaitable[dict[str, str] | None] | None":
    """Extra headers for every proxied request."""


@hookspec
def gateway_handlers(gateway: Services) -> "list[tuple[Any, ...]] | None":
    """Extra Tornado ``(pattern, handler_class[, kwargs])`` routes."""


@hookspec
def gateway_openapi(gateway: Services) -> "dict[str, Any] | Awaitable[dict[str, Any] | None] | None":
    """OpenAPI path items of a plugin's own routes, keyed by path (a key not
    beginning with ``/`` lies under ``auth_prefix``), for the gateway's
    document; every plugin's are merged, the gateway's own paths win."""


@hookspec
def gateway_startup(gateway: Services) -> "Awaitable[None] | None":
    """The stores are open and the gateway is about to listen."""
