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

Plugins count their own events through :class:`PluginMetrics`
(``Services.metrics``, :class:`gateway.api.Metrics`): counters named
``gateway_<name>``, declared once per name, in the same registry and the
same multiprocess files as the core's, each label's distinct values capped
(:data:`MAX_LABEL_VALUES`; beyond it a value counts as ``"other"``).

This module imports no Tornado.
"""

from __future__ import annotations

import re
import threading
from typing import Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "MAX_LABEL_VALUES", "METHODS", "OTHER", "PLUGIN_METRICS", "PluginCounter", "PluginMetrics", "RouteLabels",
    "error_rendered", "login", "pattern_label", "request_done", "session_event", "upstream_answered",
    "websocket_closed", "websocket_opened",
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


#: the series of each (route, method, status) and each route, found once: every label is bounded,
#: and ``.labels()`` gives the same series each time (it only costs a lock and a look-up)
_request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
_upstream_series: dict[str, Histogram] = {}


def request_done(route: str, method: str | None, status: int, seconds: float) -> None:
    """A response is complete (called by the access log function)."""
    key = (route, method if method in METHODS else OTHER, status)  # (a method of the client's own is "other")
    series = _request_series.get(key)
    if series is None:
        series = _request_series[key] = (REQUESTS.labels(key[0], key[1], str(status)), REQUEST_DURATION.labels(route))
    series[0].inc()
    series[1].observe(seconds)


def upstream_answered(route: str, seconds: float) -> None:
    """The upstream's response head arrived ``seconds`` after the request was sent."""
    series = _upstream_series.get(route)
    if series is None:
        series = _upstream_series[route] = UPSTREAM_DURATION.labels(route)
    series.observe(seconds)


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


# -- plugins' own counters -----------------------------------------------------------------

#: distinct values a label of a plugin's counter takes in one process; any further value is "other"
MAX_LABEL_VALUES = 50
#: the longest label value kept as it is (a longer one is "other")
MAX_LABEL_VALUE_LENGTH = 64
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_LABEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
#: label names the exposition format or the gateway keeps for themselves
_RESERVED_LABELS = frozenset({"le", "quantile"})


class PluginCounter:
    """A plugin's counter (:meth:`PluginMetrics.counter`).  With labels,
    ``.labels(...)`` gives the series to :meth:`_Series.inc`; without,
    :meth:`inc` counts on the counter itself."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.label_names = labels
        self._counter = Counter(name, documentation, labels)
        self._seen: list[set[str]] = [set() for _ in labels]
        self._lock = threading.Lock()

    def labels(self, *values: str | int, **named: str | int) -> "_Series":
        """The series of these label values, given in order or by name (all
        of them).  A value is text or an integer; one that is not, is longer
        than 64 characters, or would be its label's 51st distinct value in
        this process is counted as ``"other"``."""
        if not self.label_names:
            raise ValueError(f"counter {self.name} has no labels: call inc() on it")
        if values and named:
            raise ValueError("give the label values in order or by name, not both")
        if named:
            if set(named) != set(self.label_names):
                raise ValueError(f"counter {self.name} takes the labels {', '.join(self.label_names)}")
            values = tuple(named[n] for n in self.label_names)
        if len(values) != len(self.label_names):
            raise ValueError(f"counter {self.name} takes {len(self.label_names)} label value(s): "
                             + ", ".join(self.label_names))
        return _Series(self._counter.labels(*(self._bounded(i, v) for i, v in enumerate(values))))

    def inc(self, amount: float = 1.0) -> None:
        """Count ``amount`` (at least 0) on a counter without labels."""
        if self.label_names:
            raise ValueError(f"counter {self.name} has labels ({', '.join(self.label_names)}): "
                             "call labels(...).inc()")
        _Series(self._counter).inc(amount)

    def _bounded(self, index: int, value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return OTHER
        text = str(value)
        if not text or len(text) > MAX_LABEL_VALUE_LENGTH or text == OTHER:
            return OTHER
        seen = self._seen[index]
        if text in seen:
            return text
        with self._lock:
            if len(seen) >= MAX_LABEL_VALUES:
                return OTHER
            seen.add(text)
        return text


class _Series:
    """One series of a plugin's counter."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def inc(self, amount: float = 1.0) -> None:
        """Count ``amount`` (at least 0: a counter never goes down)."""
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not amount >= 0:
            raise ValueError("a counter is increased by a number of at least 0")
        self._counter.inc(amount)


class PluginMetrics:
    """The counters plugins declare (:class:`gateway.api.Metrics`), one
    registry per process: the same name declared again with the same
    labels is the same counter (every gateway of the process shares it);
    with other labels it is an error, as is a name of the gateway's own."""

    def __init__(self) -> None:
        self._counters: dict[str, PluginCounter] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> PluginCounter:
        """The counter ``gateway_<name>_total`` (``name``: lowercase letters,
        digits and ``_``, beginning with a letter; a trailing ``_total`` is
        implied), created on first declaration."""
        if not isinstance(name, str) or not _METRIC_NAME.match(name):
            raise ValueError(f"metric name {name!r}: expected lowercase letters, digits and _, "
                             "beginning with a letter (the gateway adds gateway_)")
        base = name.removesuffix("_total")
        if not base or base.startswith("gateway_"):
            raise ValueError(f"metric name {name!r}: give it without gateway_ (the gateway adds it) or _total")
        if not isinstance(documentation, str) or not documentation.strip():
            raise ValueError(f"metric {name}: documentation is required (Prometheus shows it as HELP)")
        names = tuple(labels)
        for label in names:
            if not isinstance(label, str) or not _LABEL_NAME.match(label) or label in _RESERVED_LABELS:
                raise ValueError(f"metric {name}: label {label!r}: expected lowercase letters, digits and _, "
                                 "beginning with a letter (not le or quantile)")
        if len(set(names)) != len(names):
            raise ValueError(f"metric {name}: a label is named twice")
        full = "gateway_" + base
        with self._lock:
            found = self._counters.get(full)
            if found is not None:
                if found.label_names != names:
                    raise ValueError(f"metric {full} is already declared with the labels "
                                     f"({', '.join(found.label_names)}), not ({', '.join(names)})")
                return found
            try:
                counter = PluginCounter(full, documentation.strip(), names)
            except ValueError:  # the registry has that name: one of the gateway's own
                raise ValueError(f"metric {full} is one of the gateway's own; choose another name") from None
            self._counters[full] = counter
            return counter


#: the one registry of plugins' counters in this process
PLUGIN_METRICS = PluginMetrics()
