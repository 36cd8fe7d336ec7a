"""The Tornado application of a gateway.

Routes, in order: the gateway's own endpoints under ``auth_prefix``, the
providers' logins and endpoints, the routes plugins contribute
(``gateway_handlers``), a JSON 404 for anything else under ``auth_prefix``,
then the proxy: WebSocket upgrades, and the catch-all.

Every answered request is logged (``gateway.access``) and counted
(:mod:`gateway.metrics`) by :func:`log_request`, under a bounded route
label: a proxied request's ``[[routes]]`` prefix, else the pattern of the
gateway's own route that served it (``/auth/refresh``,
``/auth/sessions/*``, ``/auth/<provider>/login``), else ``"other"``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import tornado.routing
import tornado.web

from gateway import metrics
from gateway.app import Gateway
from gateway.handlers import auth as auth_handlers
from gateway.plugins import build_time_hook
from gateway.proxy.handler import ProxyHandler
from gateway.proxy.websocket import UpgradeMatcher, WebSocketProxyHandler
from gateway.routing import Route

access_log = logging.getLogger("gateway.access")


def make_app(gateway: Gateway, **settings: Any) -> tornado.web.Application:
    handlers: list[Any] = auth_handlers.routes(gateway) + auth_handlers.provider_routes(gateway)
    for _, contributed in build_time_hook(gateway.pm, "gateway_handlers", gateway=gateway):
        handlers.extend(contributed)  # after the gateway's own: a plugin cannot shadow /refresh
    labels = metrics.RouteLabels(_patterns(handlers))
    handlers += auth_handlers.fallback_routes(gateway)
    handlers += [tornado.routing.Rule(UpgradeMatcher(), WebSocketProxyHandler), (r".*", ProxyHandler)]
    return tornado.web.Application(
        handlers, gateway=gateway, default_handler_class=auth_handlers.AuthNotFoundHandler,
        log_function=log_request, compress_response=False, route_labels=labels, **settings,
    )


def _patterns(rules: Iterable[Any]) -> list[str]:
    """The path patterns of routing rules given as ``(pattern, handler, ...)``
    or as rules matching a path pattern (others have no pattern: their
    requests are labelled ``"other"``)."""
    out: list[str] = []
    for rule in rules:
        if isinstance(rule, (tuple, list)) and rule and isinstance(rule[0], str):
            out.append(rule[0])
        elif isinstance(rule, tornado.routing.Rule) and isinstance(rule.matcher, tornado.routing.PathMatches):
            out.append(rule.matcher.regex.pattern)
    return out


def route_label(handler: tornado.web.RequestHandler) -> str:
    """The request's route label (see the module docstring)."""
    route = getattr(handler, "route", None)  # the proxy's matched [[routes]] entry
    if isinstance(route, Route):
        return route.prefix
    labels = handler.application.settings.get("route_labels")
    return labels.label(handler.request.path) if isinstance(labels, metrics.RouteLabels) else metrics.OTHER


def log_request(handler: tornado.web.RequestHandler) -> None:
    status = handler.get_status()
    request = handler.request
    seconds = request.request_time()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    # The path only: query strings may carry secrets (codes, tokens).
    access_log.log(level, "%d %s %s %.1fms", status, request.method, request.path, 1000.0 * seconds)
    metrics.request_done(route_label(handler), request.method, status, seconds)
