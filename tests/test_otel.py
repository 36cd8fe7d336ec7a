"""OpenTelemetry tracing (``[tracing] enabled``): a real ``gateway serve``
with two workers exports its spans over OTLP/HTTP to a fake collector (a
Tornado server on loopback decoding ``POST /v1/traces`` with
opentelemetry-proto's own classes).  A request continues the client's
trace; its upstream call is a child span, named in the ``traceparent`` the
upstream receives; no attribute holds a secret.  Without the otel extra,
enabling tracing is a start-up problem."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.testing import assert_error, free_port, until, write_toml
from password_support import GatewayProcess, PasswordClient

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
GIVEN = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
#: sampled (the random-trace-id flag, 02, may be set too)
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]$")
PASSWORD = "a long enough password"
QUERY_SECRET = "q-secret-8c1d0f"
COOKIE_SECRET = "cookie-secret-51ab"


@dataclass
class Received:
    """One span as the collector received it, with its resource's attributes."""

    span: Span
    resource: dict[str, Any]

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: value_of(kv.value) for kv in self.span.attributes}


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


class TracesHandler(tornado.web.RequestHandler):
    """``POST /v1/traces``, as an OTLP/HTTP collector answers it (protobuf)."""

    def initialize(self, received: list[Received], content_types: list[str]) -> None:
        self.received, self.content_types = received, content_types

    def post(self) -> None:
        self.content_types.append(self.request.headers.get("Content-Type", ""))
        export = ExportTraceServiceRequest()
        export.ParseFromString(self.request.body)
        for resource_spans in export.resource_spans:
            resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.received.append(Received(span, resource))
        self.set_header("Content-Type", "application/x-protobuf")
        self.finish(ExportTraceServiceResponse().SerializeToString())


@dataclass
class Collector:
    url: str
    received: list[Received]
    content_types: list[str]

    def in_trace(self, trace_id: str) -> list[Received]:
        return [r for r in self.received if r.trace_id == trace_id]

    def by_id(self, span_id: str) -> Received:
        [found] = [r for r in self.received if r.span_id == span_id]
        return found


@pytest.fixture
def collector(io_loop: Any) -> Iterator[Collector]:
    received: list[Received] = []
    content_types: list[str] = []
    app = tornado.web.Application([(r"/v1/traces", TracesHandler, {"received": received,
                                                                  "content_types": content_types})],
                                  log_function=lambda handler: None)
    server = tornado.httpserver.HTTPServer(app)
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets([sock])
    yield Collector(f"http://127.0.0.1:{sock.getsockname()[1]}", received, content_types)
    server.stop()


def otel_env(collector: Collector) -> dict[str, str]:
    """This environment without any OTEL_* of its own, exporting to the collector at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY="50")
    return env


def routes(upstream_url: str) -> list[dict[str, Any]]:
    return [{"prefix": "/api/", "upstream": upstream_url, "auth": "required"},
            {"prefix": "/public/", "upstream": upstream_url, "auth": "public"},
            {"prefix": "/down/", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public"}]


def server_span(collector: Collector, trace_id: str, name: str, status: int) -> Received:
    [found] = [r for r in collector.in_trace(trace_id) if r.span.kind == Span.SPAN_KIND_SERVER
               and r.span.name == name and r.attributes.get("http.response.status_code") == status]
    return found


@pytest.mark.gen_test(timeout=120)
async def test_spans_continue_the_clients_trace_and_name_the_upstream_call(tmp_path, upstream, redis_url,
                                                                            collector):
    async with GatewayProcess(tmp_path, routes(upstream.url), server={"workers": 2},
                              sessions={"store": "redis", "redis_url": redis_url}, admin={"port": 0},
                              tracing={"enabled": True}, env=otel_env(collector)) as gp:
        client = PasswordClient(gp.url)
        try:
            registered = await client.register("alice", PASSWORD, headers={"traceparent": GIVEN})
            token = registered["token"]
            # a public route, with a secret in the query string and a cookie, in the client's trace
            r = await client.request("GET", f"/public/hello?code={QUERY_SECRET}",
                                     headers={"traceparent": GIVEN, "tracestate": "vendor=1",
                                              "Cookie": f"other={COOKIE_SECRET}"})
            assert r.code == 200, r.body
            public_seen = upstream.last
            # a route that needs the session, with its token
            r = await client.request("GET", "/api/orders", token=token, headers={"traceparent": GIVEN})
            assert r.code == 200, r.body
            api_seen = upstream.last
            # a refusal, and a request without a trace of its own
            assert_error(await client.request("GET", "/api/orders", headers={"traceparent": GIVEN}), 401,
                         "unauthenticated")
            r = await client.request("GET", "/public/fresh")
            assert r.code == 200, r.body
            fresh_seen = upstream.last
            # an upstream answering 503, and one nobody listens for
            failing = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
            assert (await client.request("GET", "/public/status/503", headers=failing)).code == 503
            assert_error(await client.request("GET", "/down/x", headers=failing), 502, "bad_gateway")
        finally:
            client.close()

        # The upstream got the client's trace, with the gateway's client span as its parent.
        sent = TRACEPARENT.match(public_seen.header("traceparent") or "")
        assert sent is not None and sent.group(1) == CLIENT_TRACE, public_seen.headers
        assert sent.group(2) != CLIENT_PARENT
        assert public_seen.header("tracestate") == "vendor=1"
        fresh = TRACEPARENT.match(fresh_seen.header("traceparent") or "")
        assert fresh is not None and fresh.group(1) != CLIENT_TRACE, fresh_seen.header("traceparent")

        # 4 server spans and 2 client spans in the client's trace; 2 more in the fresh one
        await until(lambda: len(collector.in_trace(CLIENT_TRACE)) >= 6 and len(collector.in_trace(fresh.group(1))) >= 2,
                    30, lambda: f"the spans exported; got {[(r.span.name, r.trace_id) for r in collector.received]}")
        assert set(collector.content_types) == {"application/x-protobuf"}

        upstream_call = collector.by_id(sent.group(2))
        assert upstream_call.span.kind == Span.SPAN_KIND_CLIENT and upstream_call.trace_id == CLIENT_TRACE
        public = collector.by_id(upstream_call.parent_id)
        assert public.span.kind == Span.SPAN_KIND_SERVER and public.span.name == "GET /public/"
        assert public.parent_id == CLIENT_PARENT  # under the client's own span
        assert public.attributes == {
            "http.request.method": "GET", "http.route": "/public/", "url.path": "/public/hello", "url.scheme": "http",
            "http.response.status_code": 200, "gateway.request_id": public_seen.header("X-Request-Id")}
        assert upstream_call.attributes["http.response.status_code"] == 200
        assert upstream_call.attributes["server.address"] == "127.0.0.1"
        assert upstream_call.attributes["url.full"] == f"{upstream.url}/public/hello"
        assert public.span.start_time_unix_nano <= upstream_call.span.start_time_unix_nano
        assert upstream_call.span.end_time_unix_nano <= public.span.end_time_unix_nano
        assert public.resource["service.name"] == "session-gateway"

        api = server_span(collector, CLIENT_TRACE, "GET /api/", 200)
        api_call = TRACEPARENT.match(api_seen.header("traceparent") or "")
        assert api_call is not None and collector.by_id(api_call.group(2)).parent_id == api.span_id
        assert api.parent_id == CLIENT_PARENT
        refused = server_span(collector, CLIENT_TRACE, "GET /api/", 401)
        assert refused.attributes["error.type"] == "unauthenticated" and refused.parent_id == CLIENT_PARENT
        assert refused.span.status.code != refused.span.status.STATUS_CODE_ERROR  # a 4xx is the client's
        registration = server_span(collector, CLIENT_TRACE, "POST /auth/password/register", 201)
        assert registration.parent_id == CLIENT_PARENT

        # the fresh trace: a root server span and its upstream call, named upstream
        fresh_server = server_span(collector, fresh.group(1), "GET /public/", 200)
        assert fresh_server.parent_id == ""
        assert collector.by_id(fresh.group(2)).parent_id == fresh_server.span_id

        # Failures: the upstream's 503 and the unreachable one, on both spans.
        await until(lambda: len(collector.in_trace("a" * 32)) >= 4, 30, "the failures' spans exported")
        answered = server_span(collector, "a" * 32, "GET /public/", 503)
        assert answered.span.status.code == answered.span.status.STATUS_CODE_ERROR
        [answered_call] = [r for r in collector.in_trace("a" * 32) if r.parent_id == answered.span_id]
        assert answered_call.attributes["http.response.status_code"] == 503
        assert answered_call.attributes["error.type"] == "503"
        down = server_span(collector, "a" * 32, "GET /down/", 502)
        assert down.attributes["error.type"] == "bad_gateway"
        [down_call] = [r for r in collector.in_trace("a" * 32) if r.parent_id == down.span_id]
        assert down_call.span.kind == Span.SPAN_KIND_CLIENT
        assert down_call.attributes["error.type"] == "UpstreamUnreachable", down_call.attributes
        assert down_call.span.status.code == down_call.span.status.STATUS_CODE_ERROR

        # No secret in any attribute of any span, nor in its resource.
        secrets = [token, PASSWORD, QUERY_SECRET, COOKIE_SECRET, "code="]
        for r in collector.received:
            text = repr(r.attributes) + repr(r.resource) + r.span.name
            assert not [s for s in secrets if s in text], (r.span.name, r.attributes)
            assert "user" not in " ".join(r.attributes) and "session" not in " ".join(r.attributes)


def test_tracing_without_the_otel_extra_is_a_start_up_problem(tmp_path):
    """The extra's modules made unimportable in a process of its own (as
    in an installation without them): serve refuses to start, saying what
    to install, and so does check-config."""
    config = tmp_path / "gateway.toml"
    write_toml(config, {"tracing": {"enabled": True}, "server": {"port": 0}, "admin": {"port": 0},
                        "profiles": {"sqlite_path": str(tmp_path / "profiles.db")}})
    hide = "import sys; sys.modules['opentelemetry.sdk.trace'] = None; from gateway.cli import main; "
    for command in ("serve", "check-config"):
        done = subprocess.run([sys.executable, "-c", hide + f"sys.exit(main(['{command}', '--config', "
                                                           f"{str(config)!r}]))"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "tracing.enabled: needs the otel extra" in done.stderr, done.stderr
        assert "pip install 'session-gateway[otel]'" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.stdout, done.stderr)  # with the extra installed


@pytest.mark.gen_test(timeout=60)
async def test_a_worker_flushes_its_spans_when_it_stops(tmp_path, upstream, collector):
    """Spans still waiting in the batch processor (here for up to a minute)
    are exported as the process stops; the sampler comes from OTEL_*."""
    env = {**otel_env(collector), "OTEL_BSP_SCHEDULE_DELAY": "60000", "OTEL_SERVICE_NAME": "edge-gateway"}
    async with GatewayProcess(tmp_path, routes(upstream.url), admin={"port": 0}, tracing={"enabled": True},
                              env=env) as gp:
        client = PasswordClient(gp.url)
        try:
            assert (await client.request("GET", "/public/last", headers={"traceparent": GIVEN})).code == 200
        finally:
            client.close()
        assert collector.received == []  # not yet: the batch waits
        await gp.stop()
        assert gp.proc is not None and gp.proc.returncode == 0, gp.output()
    spans = collector.in_trace(CLIENT_TRACE)
    assert sorted(r.span.kind for r in spans) == [Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT], spans
    assert {r.resource["service.name"] for r in spans} == {"edge-gateway"}
    assert "tracing: spans of service edge-gateway over OTLP/HTTP to " + collector.url + "/v1/traces" in gp.output()

    # a sampler that samples nothing: the trace still travels upstream, unsampled, and nothing is exported
    env = {**otel_env(collector), "OTEL_TRACES_SAMPLER": "always_off"}
    async with GatewayProcess(tmp_path, routes(upstream.url), admin={"port": 0}, tracing={"enabled": True},
                              env=env) as gp:
        client = PasswordClient(gp.url)
        try:
            assert (await client.request("GET", "/public/unsampled",
                                         headers={"traceparent": f"00-{'c' * 32}-{CLIENT_PARENT}-01"})).code == 200
        finally:
            client.close()
        await gp.stop()
    sent = re.match(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[02]$", upstream.last.header("traceparent") or "")
    assert sent is not None and sent.group(1) == "c" * 32, upstream.last.header("traceparent")
    assert collector.in_trace("c" * 32) == []
