"""The Tornado application of a gateway.

Routes, in order: the gateway's own endpoints under ``auth_prefix``, the
providers' logins and endpoints, the routes plugins contribute
(``gateway_handlers``), a JSON 404 for anything else under ``auth_prefix``,
then the proxy: WebSocket upgrades, and the catch-all.

Every answered request is logged (``gateway.access``: one line with its
status, route, timings, caller and, for an error, its code and reason) and
counted (:mod:`gateway.metrics`) by :func:`log_request`, under a bounded route
label: a proxied request's ``[[routes]]`` prefix, else the pattern of the
gateway's own route that served it (``/auth/refresh``,
``/auth/sessions/*``, ``/auth/<provider>/login``), else ``"other"``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import tornado.routing
import tornado.web

from gateway import audit, metrics, tracing
from gateway.app import Gateway
from gateway.errors import GatewayError
from gateway.handlers import auth as auth_handlers
from gateway.handlers.base import BaseHandler
from gateway.handlers import verify
from gateway.logs import ACCESS_FIELDS, redact
from gateway.plugins import build_time_hook
from gateway.proxy.handler import ProxyHandler
from gateway.proxy.websocket import UpgradeMatcher, WebSocketProxyHandler
from gateway.routing import Route

access_log = logging.getLogger("gateway.access")


def make_app(gateway: Gateway, **settings: Any) -> tornado.web.Application:
    handlers: list[Any] = auth_handlers.routes(gateway) + auth_handlers.provider_routes(gateway)
    if gateway.config.server.forward_auth:  # off: /auth/verify is as unknown as any other path there
        # forward auth, for a proxy in front (nginx, Traefik; Envoy's ext_authz under verify/envoy/)
        handlers += verify.routes(gateway.auth_path("verify"), gateway.config.server.auth_prefix)
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
    """Count the request, write its access line (unless ``[logging]
    access_log = false``) and audit a lockout it answered."""
    status = handler.get_status()
    request = handler.request
    seconds = request.request_time()
    label = route_label(handler)
    metrics.request_done(label, request.method, status, seconds)
    error = getattr(handler, "rendered_error", None)
    tracing.request_done(handler, label, status, error)  # its server span ends ([tracing] enabled)
    if isinstance(error, GatewayError) and error.code == "locked_out" and isinstance(handler, BaseHandler):
        provider = getattr(handler, "provider", None)
        audit.record("lockout", request_id=handler.request_id, ip=handler.client_ip, path=request.path,
                     provider=getattr(provider, "name", None), retry_after=error.fields.get("retry_after"))
    gateway = handler.application.settings.get("gateway")
    if isinstance(gateway, Gateway) and not gateway.config.logging.access_log:
        return
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    fields = access_fields(handler, status, label, seconds, error if isinstance(error, GatewayError) else None)
    access_log.log(level, "%s", _access_text(fields), extra={ACCESS_FIELDS: fields})


#: the longest ``detail`` an access line carries
DETAIL_MAX = 300


def access_fields(handler: tornado.web.RequestHandler, status: int, label: str, seconds: float,
                  error: GatewayError | None) -> dict[str, Any]:
    """The fields of a request's access line (see docs/operations.md, Logs)."""
    request = handler.request
    base = handler if isinstance(handler, BaseHandler) else None
    principal = base.resolved_principal if base is not None else None
    upstream = getattr(handler, "upstream_seconds", None)
    detail = None
    if error is not None:
        # The message for people, or the log-only detail, which holds no
        # secret by contract: redacted all the same.
        detail = redact(error.detail or error.message)
        if len(detail) > DETAIL_MAX:
            detail = detail[:DETAIL_MAX - 3] + "..."
    return {
        "request_id": base.request_id if base is not None else None,
        "trace_id": getattr(handler, "trace_id", None),
        "method": request.method,
        "route": label,
        # The path only: query strings may carry secrets (codes, tokens).
        "path": redact(request.path),
        "status": status,
        "bytes": base.bytes_sent if base is not None else None,
        "duration_ms": round(1000.0 * seconds, 1),
        "upstream_ms": round(1000.0 * upstream, 1) if isinstance(upstream, float) else None,
        "user_id": principal.user_id if principal is not None else None,
        "session_id": principal.session_id if principal is not None else None,
        "provider": principal.provider if principal is not None else None,
        "ip": base.client_ip if base is not None else request.remote_ip,
        "error": error.code if error is not None else None,
        "reason": error.fields.get("reason") if error is not None else None,
        "detail": detail,
    }


def _access_text(f: dict[str, Any]) -> str:
    """``401 GET /api/x route=/api/ 0.8ms rid=... user=... error=unauthenticated reason=expired``."""
    out = [f"{f['status']} {f['method']} {f['path']} route={f['route']} {f['duration_ms']}ms"]
    if f["upstream_ms"] is not None:
        out.append(f"upstream={f['upstream_ms']}ms")
    for key, name in (("bytes", "bytes"), ("request_id", "rid"), ("trace_id", "trace"), ("ip", "ip"), ("user_id", "user"),
                      ("session_id", "session"), ("provider", "provider"), ("error", "error"),
                      ("reason", "reason")):
        if f[key] is not None:
            out.append(f"{name}={f[key]}")
    if f["detail"] is not None:
        out.append("detail=" + json.dumps(f["detail"], ensure_ascii=False))
    return " ".join(out)
