"""The Tornado application of a gateway.

Routes, in order: the gateway's own endpoints under ``auth_prefix``, the
providers' logins and endpoints, the routes plugins contribute
(``gateway_handlers``), a JSON 404 for anything else under ``auth_prefix``,
then the proxy: WebSocket upgrades, and the catch-all.
"""

from __future__ import annotations

import logging
from typing import Any

import tornado.routing
import tornado.web

from gateway.app import Gateway
from gateway.handlers import auth as auth_handlers
from gateway.plugins import build_time_hook
from gateway.proxy.handler import ProxyHandler
from gateway.proxy.websocket import UpgradeMatcher, WebSocketProxyHandler


def make_app(gateway: Gateway, **settings: Any) -> tornado.web.Application:
    handlers: list[Any] = auth_handlers.routes(gateway) + auth_handlers.provider_routes(gateway)
    for _, contributed in build_time_hook(gateway.pm, "gateway_handlers", gateway=gateway):
        handlers.extend(contributed)  # after the gateway's own: a plugin cannot shadow /refresh
    handlers += auth_handlers.fallback_routes(gateway)
    handlers += [tornado.routing.Rule(UpgradeMatcher(), WebSocketProxyHandler), (r".*", ProxyHandler)]
    return tornado.web.Application(
        handlers, gateway=gateway, default_handler_class=auth_handlers.AuthNotFoundHandler,
        log_function=log_request, compress_response=False, **settings,
    )


def log_request(handler: tornado.web.RequestHandler) -> None:
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    # The path only: query strings may carry secrets (codes, tokens).
    logging.getLogger("gateway.access").log(
        level, "%d %s %s %.1fms", status, handler.request.method, handler.request.path,
        1000.0 * handler.request.request_time(),
    )
