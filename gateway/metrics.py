"""The gateway's Prometheus metrics, and the few functions that count them.

Every metric is declared here, once, and counted by a call from the one
place that sees its event: the access log function (requests and their
durations), the proxy's upstream exchange, the session manager's events,
the login handler, the rendering of errors (store errors, 429s) and the
WebSocket relay.  The admin listener (:mod:`gateway.admin`) serves them.

Labels are bounded whatever the traffic: a route label is a ``[[routes]]``
prefix or a pattern of the gateway's own endpoints (:class:`RouteLabels`),
never a raw path; a method outside :data:`METHODS` is ``"other"``; a
result, reason or store name that is not a short lowercase word is
``"other"``.  No label ever holds a user id or a token.

With several workers each process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (``prometheus_client``'s multiprocess mode),
which the supervisor makes before it forks; the admin listener sums them.
The choice between that mode and in-memory values is made when
``prometheus_client`` is first imported, so this module must not be
imported by the supervisor before the directory is set (see
:func:`gateway.server.serve`).

This module imports no Tornado.
"""

from __future__ import annotations

import re
from typing import Iterable

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "METHODS", "OTHER", "RouteLabels", "error_rendered", "login", "pattern_label", "request_done",
    "session_event", "upstream_answered", "websocket_closed", "websocket_opened",
]

#: methods counted by name; any other is "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: the label of whatever has no label of its own
OTHER = "other"
#: what a result, a reason or a store name may be to be a label value
_WORD = re.compile(r"^[a-z][a-z0-9_ ]{0,39}$")

REQUESTS = Counter("gateway_http_requests", "HTTP requests answered, by route, method and status",
                   ("route", "method", "status"))
REQUEST_DURATION = Histogram("gateway_http_request_duration_seconds",
                             "Time from a request's arrival to the end of its response, by route", ("route",))
UPSTREAM_DURATION = Histogram("gateway_upstream_duration_seconds",
                              "Time from sending a request upstream to the upstream's response head, by route",
                              ("route",))
LOGINS = Counter("gateway_logins", "Login attempts through a provider's login endpoint, by provider and result "
                 "(ok, or the error code of the refusal)", ("provider", "result"))
SESSIONS_CREATED = Counter("gateway_sessions_created", "Sessions created, by provider", ("provider",))
SESSIONS_ENDED = Counter("gateway_sessions_ended", "Sessions ended before their expiry, by reason", ("reason",))
STORE_ERRORS = Counter("gateway_store_errors", "Requests answered 503 because a store was unavailable, by store",
                       ("store",))
RATE_LIMITED = Counter("gateway_rate_limited", "Requests answered 429, by the limit they met (the error code)",
                       ("limit",))
WEBSOCKETS = Gauge("gateway_websocket_connections", "WebSocket connections open now, by route", ("route",),
                   multiprocess_mode="livesum")


def _word(value: str | None) -> str:
    return value if value is not None and _WORD.match(value) else OTHER


# -- requests -------------------------------------------------------------------------


def request_done(route: str, method: str | None, status: int, seconds: float) -> None:
    """A response is complete (called by the access log function)."""
    REQUESTS.labels(route, method if method in METHODS else OTHER, str(status)).inc()
    REQUEST_DURATION.labels(route).observe(seconds)


def upstream_answered(route: str, seconds: float) -> None:
    """The upstream's response head arrived ``seconds`` after the request was sent."""
    UPSTREAM_DURATION.labels(route).observe(seconds)


def pattern_label(pattern: str) -> str:
    """A route pattern as a label: its groups as ``*``, its escapes undone,
    a trailing ``/?`` or ``$`` dropped (``/auth/sessions/([A-Za-z0-9_\\-]{1,64})/?``
    is ``/auth/sessions/*``)."""
    text = pattern.removesuffix("$").removesuffix("/?")
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            if depth == 0:
                out.append(text[i + 1])
            i += 2
            continue
        if char == "(":
            if depth == 0:
                out.append("*")
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(char)
        i += 1
    return "".join(out)


class RouteLabels:
    """The labels of the paths the gateway answers itself: each route
    pattern (of the endpoints under ``auth_prefix``, the providers' and the
    plugins' routes) is its own label, matched in order; a path none of
    them matches is ``"other"``.  Proxied requests are labelled by their
    ``[[routes]]`` prefix instead, without a lookup here."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._rules = [(re.compile(p if p.endswith("$") else p + "$"), pattern_label(p)) for p in patterns]

    def label(self, path: str) -> str:
        for regex, label in self._rules:
            if regex.match(path):
                return label
        return OTHER

    def labels(self) -> list[str]:
        """Every label, in matching order."""
        return [label for _, label in self._rules]


# -- logins and sessions -----------------------------------------------------------------


def login(provider: str, result: str) -> None:
    """A login through ``provider``'s login endpoint: ``"ok"`` or the refusal's error code."""
    LOGINS.labels(provider, _word(result)).inc()


def session_event(hook: str, provider: str | None = None, reason: str | None = None) -> None:
    """A session event, by its hook's name (``gateway_session_created``,
    ``gateway_session_revoked``); other hooks count nothing."""
    if hook == "gateway_session_created":
        SESSIONS_CREATED.labels(_word(provider)).inc()
    elif hook == "gateway_session_revoked":
        SESSIONS_ENDED.labels(_word(reason)).inc()


# -- errors ---------------------------------------------------------------------------------

def error_rendered(status: int, code: str, store: str | None = None) -> None:
    """An error response went out with this ``status`` and error ``code``
    (a 429's code names its limit: ``rate_limited``, ``locked_out``);
    ``store``: the store whose unavailability caused it."""
    if store is not None:
        STORE_ERRORS.labels(_word(store)).inc()
    if status == 429:
        RATE_LIMITED.labels(_word(code)).inc()


# -- WebSockets --------------------------------------------------------------------------------


def websocket_opened(route: str) -> None:
    WEBSOCKETS.labels(route).inc()


def websocket_closed(route: str) -> None:
    WEBSOCKETS.labels(route).dec()
