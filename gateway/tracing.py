"""OpenTelemetry traces of the requests a worker serves (``[tracing] enabled``).

Optional: it needs the ``otel`` extra (``pip install
'session-gateway[otel]'``: the OpenTelemetry API, SDK and OTLP/HTTP
exporter), which ``[tracing] enabled = true`` checks for when the
configuration is read.  The SDK is configured by the standard ``OTEL_*``
environment variables (the exporter's endpoint, headers and timeout, the
sampler, the batch processor, the resource), with ``service.name``
``session-gateway`` unless ``OTEL_SERVICE_NAME`` (or
``OTEL_RESOURCE_ATTRIBUTES``) names another.

:func:`start` runs in each worker, after the fork (the batch processor's
export thread is the worker's own; a thread never survives a fork).  Until
it has run, or when tracing is off, every hook here returns at once and the
gateway behaves exactly as without it.

Each request gets one server span, from its arrival to the end of its
response (ended where its access line is written, :func:`request_done`),
named after its method and route label (``GET /api/``); it continues the
client's ``traceparent`` when that is valid (the same rule as
:func:`gateway.proxy.policy.valid_traceparent`), else starts a trace.  A
proxied request's upstream call is a client span under it
(:func:`upstream_headers`, :func:`upstream_answered`,
:func:`upstream_failed`), and the ``traceparent`` sent upstream names that
span, so the upstream's spans nest under the gateway's.

Attributes never hold a secret or a person: the method, the route label,
the path without its query string (redacted as log lines are), the scheme,
the status, the request id, the gateway's error code; no query string,
header, cookie, token or client address, nor the principal's user or
session id (a path may name one, as the access line's does).

A request whose client leaves before its answer has no span, as it has no
access line.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import tornado.web

from gateway import __version__
from gateway.config import TracingConfig
from gateway.errors import GatewayError
from gateway.logs import redact
from gateway.metrics import METHODS, OTHER
from gateway.proxy.policy import canonical, valid_traceparent
from gateway.routing import Route

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["DEFAULT_SERVICE_NAME", "enabled", "request_done", "start", "upstream_answered", "upstream_failed",
           "upstream_headers"]

log = logging.getLogger("gateway.tracing")

#: ``service.name`` when the environment names none
DEFAULT_SERVICE_NAME = "session-gateway"
#: the instrumentation scope of the gateway's spans
SCOPE = "session_gateway"


@dataclass
class _Tracing:
    tracer: Tracer
    propagator: TraceContextTextMapPropagator


@dataclass
class _Spans:
    """The spans of one request."""

    server: Span
    client: Span | None = None


_tracing: _Tracing | None = None
#: the spans of requests in progress, by handler
_requests: weakref.WeakKeyDictionary[tornado.web.RequestHandler, _Spans] = weakref.WeakKeyDictionary()


def enabled() -> bool:
    """Tracing has been started in this process."""
    return _tracing is not None


def start(config: TracingConfig) -> None:
    """With ``config.enabled``, set up this process's tracer provider: the
    resource and sampler from the ``OTEL_*`` environment, a batch processor
    exporting over OTLP/HTTP (flushed when the process exits).  Call it in
    each worker, after the fork; a second call does nothing."""
    global _tracing
    if not config.enabled or _tracing is not None:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    detected = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    attributes = dict(detected.attributes)
    if str(attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    attributes.setdefault(SERVICE_VERSION, __version__)
    attributes.setdefault("process.pid", os.getpid())
    provider = TracerProvider(resource=Resource(attributes, detected.schema_url))  # OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_*, OTEL_BSP_*
    trace.set_tracer_provider(provider)  # plugins' own spans go the same way
    _tracing = _Tracing(provider.get_tracer(SCOPE, __version__), TraceContextTextMapPropagator())
    log.info("tracing: spans of service %s over OTLP/HTTP to %s (pid %d)", attributes[SERVICE_NAME],
             _endpoint(), os.getpid())


def _endpoint() -> str:
    """Where the exporter sends spans, as the ``OTEL_*`` variables say."""
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def _method(handler: tornado.web.RequestHandler) -> str:
    method = handler.request.method or ""
    return method if method in METHODS else "_OTHER"


def _server_span(handler: tornado.web.RequestHandler, tracing: _Tracing) -> _Spans:
    """The request's spans, its server span begun (at the request's arrival) on first use."""
    spans = _requests.get(handler)
    if spans is not None:
        return spans
    from opentelemetry.trace import SpanKind

    request = handler.request
    context = None
    incoming = valid_traceparent(request.headers.get("traceparent"))
    if incoming is not None:
        carrier = {"traceparent": incoming}
        state = request.headers.get("tracestate")
        if state:
            carrier["tracestate"] = state
        context = tracing.propagator.extract(carrier)
    method = _method(handler)
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": redact(request.path),  # never the query string
        "url.scheme": str(getattr(handler, "client_scheme", request.protocol)),
    }
    arrived = time.time_ns() - int(request.request_time() * 1e9)
    span = tracing.tracer.start_span("HTTP" if method == "_OTHER" else method, context=context,
                                     kind=SpanKind.SERVER, attributes=attributes, start_time=arrived)
    spans = _requests[handler] = _Spans(span)
    return spans


def upstream_headers(handler: tornado.web.RequestHandler, route: Route,
                     headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str | None]:
    """The upstream call begins: its client span starts under the request's
    server span, and ``headers`` get the ``traceparent`` (and
    ``tracestate``) that name it.  Returns the headers and the trace id;
    ``(headers, None)`` unchanged while tracing is off."""
    tracing = _tracing
    if tracing is None:
        return headers, None
    from opentelemetry.trace import SpanKind, set_span_in_context

    spans = _server_span(handler, tracing)
    if spans.client is not None:
        spans.client.end()
    target = urlsplit(route.upstream)
    method = _method(handler)
    path = urlsplit(route.upstream_url(handler.request.path, "")).path
    port = target.port or (443 if target.scheme == "https" else 80)
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "server.address": target.hostname or "",
        "server.port": port,
        "url.full": redact(f"{target.scheme}://{target.hostname}:{port}{path}"),  # no userinfo, no query
    }
    spans.client = tracing.tracer.start_span("HTTP" if method == "_OTHER" else method,
                                             context=set_span_in_context(spans.server), kind=SpanKind.CLIENT,
                                             attributes=attributes)
    carrier: dict[str, str] = {}
    tracing.propagator.inject(carrier, context=set_span_in_context(spans.client))
    out = [(n, v) for n, v in headers if canonical(n) not in ("traceparent", "tracestate")]
    out.extend((name, value) for name, value in carrier.items() if name in ("traceparent", "tracestate"))
    return out, format(spans.client.get_span_context().trace_id, "032x")


def upstream_answered(handler: tornado.web.RequestHandler, status: int) -> None:
    """The upstream's response head arrived: its client span ends."""
    spans = _requests.get(handler) if _tracing is not None else None
    if spans is None or spans.client is None:
        return
    from opentelemetry.trace import StatusCode

    spans.client.set_attribute("http.response.status_code", status)
    if status >= 400:
        spans.client.set_attribute("error.type", str(status))
        spans.client.set_status(StatusCode.ERROR)
    spans.client.end()
    spans.client = None


def upstream_failed(handler: tornado.web.RequestHandler, exc: BaseException) -> None:
    """No response came from the upstream: its client span ends with the
    kind of failure (``UpstreamTimeout``, ``UpstreamUnreachable``...)."""
    spans = _requests.get(handler) if _tracing is not None else None
    if spans is None or spans.client is None:
        return
    from opentelemetry.trace import StatusCode

    spans.client.set_attribute("error.type", type(exc).__name__)
    spans.client.set_status(StatusCode.ERROR)
    spans.client.end()
    spans.client = None


def request_done(handler: tornado.web.RequestHandler, label: str, status: int, error: Any) -> None:
    """The response is complete (called with the access line): the server
    span ends, named ``<method> <route label>``, with the status and the
    gateway's error code; an upstream call still open ends with it."""
    tracing = _tracing
    if tracing is None:
        return
    from opentelemetry.trace import StatusCode

    spans = _server_span(handler, tracing)
    _requests.pop(handler, None)
    span = spans.server
    method = _method(handler)
    if label != OTHER:
        span.update_name(f"{'HTTP' if method == '_OTHER' else method} {label}")
        span.set_attribute("http.route", label)
    span.set_attribute("http.response.status_code", status)
    request_id = getattr(handler, "request_id", None)
    if isinstance(request_id, str):
        span.set_attribute("gateway.request_id", request_id)
    if isinstance(error, GatewayError):
        span.set_attribute("error.type", error.code)
    elif status >= 500:
        span.set_attribute("error.type", str(status))
    if status >= 500:
        span.set_status(StatusCode.ERROR)
    if spans.client is not None:
        spans.client.end()
    span.end()

