"""The reverse proxy, end to end: a real gateway in front of real upstreams.

Requests go to the gateway over HTTP (tornado's client, or raw bytes over a
socket where a well-behaved client would normalise what we want to send);
what the upstream received is read from the recording upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from types import SimpleNamespace
from typing import Any

import pytest
import tornado.httpserver
import tornado.httputil
import tornado.iostream
import tornado.simple_httpclient
import tornado.tcpclient
import tornado.web

import gateway
from gateway.plugins import get_plugin_manager

from gateway.testing import RecordingHandler, Upstream, assert_error, base_config, body, free_port

IDENTITY = {"x-user-id", "x-auth-provider", "x-session-id", "x-auth-scopes"}
LEAK_MARKERS = ("Traceback", "Error(", "HTTPClientError", "CurlError", "HTTPTimeoutError", "StreamClosedError",
                "ConnectionRefused", "errno", "Exception", "pycurl", "File \"")


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


def identity_headers(seen) -> list[tuple[str, str]]:
    """Every header the upstream got whose canonical name is an identity header."""
    return [(k, v) for k, v in seen.headers if canon(k) in IDENTITY]


def canon_names(seen) -> set[str]:
    return {canon(k) for k, _ in seen.headers}


# ---------------------------------------------------------------------------
# Local fixtures and helpers
# ---------------------------------------------------------------------------


def start_recording_upstream() -> tuple[Upstream, tornado.httpserver.HTTPServer]:
    port = free_port()
    up = Upstream(url=f"http://127.0.0.1:{port}", port=port)
    app = tornado.web.Application([(r".*", RecordingHandler, {"upstream": up})])
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    return up, server


@pytest.fixture
def upstream2(io_loop):
    up, server = start_recording_upstream()
    yield up
    server.stop()


class PortRecorder(tornado.web.RequestHandler):
    """Records the client port of the connection each request arrived on."""

    def initialize(self, ports: list[int]) -> None:
        self.ports = ports

    def get(self, *args: Any) -> None:
        self.ports.append(self.request.connection.stream.socket.getpeername()[1])  # type: ignore[union-attr]
        self.finish({"n": len(self.ports)})


class Redirector(tornado.web.RequestHandler):
    def get(self) -> None:
        self.redirect("/elsewhere", status=302)


class ConnectionLister(tornado.web.RequestHandler):
    """Names a header in its Connection header: that one is hop-by-hop too."""

    def get(self) -> None:
        self.set_header("Connection", "X-Internal-Hop")
        self.set_header("X-Internal-Hop", "upstream-secret")
        self.set_header("Keep-Alive", "timeout=99")
        self.set_header("X-Public", "ok")
        self.finish("fine")


@pytest.fixture
def port_upstream(io_loop):
    ports: list[int] = []
    port = free_port()
    app = tornado.web.Application([
        (r"/pool/redirect", Redirector),
        (r"/pool/connection", ConnectionLister),
        (r".*", PortRecorder, {"ports": ports}),
    ])
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", ports=ports)
    server.stop()



@contextlib.contextmanager
def serving(app: tornado.web.Application):
    """A one-off upstream on a free loopback port; yields its URL."""
    port = free_port()
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def raw_upstream(handle):
    """A one-off upstream that writes raw HTTP bytes (``handle(reader, writer)``)."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def start(make_gateway, upstream_url: str, tmp_path, **sections: Any):
    return await make_gateway(base_config(upstream_url, tmp_path, **sections))


async def login(rg) -> dict[str, Any]:
    """Register a user; returns {"token", "user_id", "session_id"}."""
    reg = await rg.client.register()
    r = await rg.client.request("GET", "/auth/session", token=reg["token"])
    assert r.code == 200, r.body
    return {"token": reg["token"], "user_id": reg["user"]["id"], "session_id": body(r)["session"]["id"]}


async def raw_request(port: int, request: bytes) -> tuple[int, tornado.httputil.HTTPHeaders, bytes]:
    """Send ``request`` bytes as they are; parse the response (Content-Length,
    chunked or until close)."""
    stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", port)
    try:
        await stream.write(request)
        head = await stream.read_until(b"\r\n\r\n", max_bytes=1 << 20)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = tornado.httputil.HTTPHeaders.parse("\r\n".join(lines[1:]))
        is_head = request.split(b" ", 1)[0] == b"HEAD"
        if is_head or status in (204, 304):
            data = b""
        elif "Content-Length" in headers:
            data = await stream.read_bytes(int(headers["Content-Length"]))
        elif "chunked" in headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int((await stream.read_until(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await stream.read_bytes(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            data = await stream.read_until_close()
        return status, headers, data
    finally:
        stream.close()


def raw(method: str, path: str, headers: list[tuple[str, str]], payload: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{k}: {v}" for k, v in headers]
    if payload:
        lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_longest_prefix_wins(make_gateway, upstream, upstream2, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/api/", "upstream": upstream.url, "auth": "public"},
        {"prefix": "/api/admin/", "upstream": upstream2.url, "auth": "public"},
        {"prefix": "/a/", "upstream": upstream.url, "auth": "public"},
    ])
    r = await rg.client.request("GET", "/api/admin/x")
    assert r.code == 200, r.body
    assert [s.path for s in upstream2.seen] == ["/api/admin/x"]
    assert upstream.seen == []

    r = await rg.client.request("GET", "/api/x")
    assert r.code == 200
    assert [s.path for s in upstream.seen] == ["/api/x"]

    # A prefix with a trailing slash is a whole path segment: /api/adminx is /api/'s.
    r = await rg.client.request("GET", "/api/adminx")
    assert r.code == 200
    assert upstream.last.path == "/api/adminx"
    assert len(upstream2.seen) == 1

    # The prefix without its slash still belongs to that route.
    r = await rg.client.request("GET", "/api/admin")
    assert r.code == 200
    assert upstream2.last.path == "/api/admin"


@pytest.mark.gen_test
async def test_no_route_is_json_404(gw, upstream):
    for path in ("/nowhere", "/apix", "/", "/publicity/x"):
        r = await gw.client.request("GET", path)
        assert r.code == 404, (path, r.body)
        assert body(r)["error"] == "not_found"
        assert r.headers["Content-Type"].startswith("application/json")
    assert upstream.seen == []


@pytest.mark.gen_test
async def test_strip_prefix(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/keep/", "upstream": upstream.url, "auth": "public", "strip_prefix": False},
        {"prefix": "/strip/", "upstream": upstream.url, "auth": "public", "strip_prefix": True},
        {"prefix": "/based/", "upstream": upstream.url + "/base/", "auth": "public", "strip_prefix": True},
    ])
    cases = [
        ("/keep/a/b?x=1", "/keep/a/b", "x=1"),
        ("/strip/a/b?x=1", "/a/b", "x=1"),
        ("/strip/", "/", ""),
        ("/strip", "/", ""),
        ("/based/c", "/base/c", ""),
    ]
    for sent, path, query in cases:
        r = await rg.client.request("GET", sent)
        assert r.code == 200, (sent, r.body)
        assert (upstream.last.path, upstream.last.query) == (path, query), sent


@pytest.mark.gen_test
async def test_query_string_forwarded_verbatim(gw, upstream):
    query = "b=2&a=1&a=%20x&empty=&flag&enc=%2F%3F%26&plus=a+b&utf=%C3%A9"
    r = await gw.client.request("GET", "/public/q?" + query)
    assert r.code == 200
    assert upstream.last.query == query
    assert body(r)["query"] == query


@pytest.mark.gen_test
async def test_methods_and_bodies_forwarded(gw, upstream):
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        payload = f"{method} payload ✓".encode()
        r = await gw.client.request(method, "/public/m", body=payload, headers={"Content-Type": "text/plain"})
        assert r.code == 200, (method, r.body)
        assert upstream.last.method == method
        assert upstream.last.body == payload
        assert upstream.last.header("Content-Type") == "text/plain"
    binary = bytes(range(256)) * 64 + b"\r\n\r\n\x00"
    r = await gw.client.request("POST", "/public/bin", body=binary,
                                headers={"Content-Type": "application/octet-stream"})
    assert r.code == 200
    assert upstream.last.body == binary
    assert upstream.last.header("Content-Length") == str(len(binary))
    for method in ("GET", "OPTIONS", "DELETE"):
        r = await gw.client.request(method, "/public/nobody")
        assert r.code == 200, (method, r.body)
        assert upstream.last.method == method
        assert upstream.last.body == b""


@pytest.mark.gen_test
async def test_chunked_request_body_forwarded(gw, upstream):
    request = (b"POST /public/chunked HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
               b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n")
    status, _, data = await raw_request(gw.port, request)
    assert status == 200, data
    assert upstream.last.method == "POST"
    assert upstream.last.body == b"hello, world"
    # Streamed as it arrives: the upstream gets it chunked, as it was sent.
    assert upstream.last.header("Content-Length") is None
    assert upstream.last.header("Transfer-Encoding") == "chunked"


@pytest.mark.gen_test
async def test_get_or_head_with_body_is_refused_not_rewritten(gw, upstream):
    """libcurl cannot send a GET body, and sends a HEAD with a body as a PUT:
    such a request must be refused, never turned into another method."""
    for method in ("GET", "HEAD"):
        status, _, data = await raw_request(gw.port, raw(method, "/public/x", [("Connection", "close")], b"payload"))
        assert status == 400, (method, status, data)
        if method == "GET":
            assert json.loads(data)["error"] == "invalid_request"
    assert upstream.seen == []
    # An explicitly empty body is no body.
    status, _, _ = await raw_request(gw.port, raw("GET", "/public/x", [("Connection", "close"),
                                                                       ("Content-Length", "0")]))
    assert status == 200
    assert upstream.last.method == "GET"


# ---------------------------------------------------------------------------
# Request headers
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_ordinary_headers_forwarded(gw, upstream):
    r = await gw.client.request("GET", "/public/h", headers={
        "X-Custom": "one", "Accept": "text/x-special", "User-Agent": "probe/1.0", "Accept-Language": "fr",
    })
    assert r.code == 200
    seen = upstream.last
    assert seen.header("X-Custom") == "one"
    assert seen.header("Accept") == "text/x-special"
    assert seen.header("User-Agent") == "probe/1.0"
    assert seen.header("Accept-Language") == "fr"
    status, _, _ = await raw_request(gw.port, raw("GET", "/public/h", [
        ("Connection", "close"), ("X-Multi", "a"), ("X-Multi", "b")]))
    assert status == 200
    assert [v for k, v in upstream.last.headers if k.lower() == "x-multi"] in (["a", "b"], ["a,b"])
    # Host is the upstream's (preserve_host is off by default).
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


@pytest.mark.gen_test
async def test_preserve_host(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/p/", "upstream": upstream.url, "auth": "public", "preserve_host": True},
    ])
    status, _, _ = await raw_request(rg.port, raw("GET", "/p/x", [("Connection", "close")]))
    assert status == 200
    assert upstream.last.header("Host") == "gateway.test"


@pytest.mark.gen_test
async def test_hop_by_hop_headers_removed(gw, upstream):
    status, _, _ = await raw_request(gw.port, raw("GET", "/public/hop", [
        ("Connection", "close, X-Secret-Hop, x_other_hop"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Secret-Hop", "hop1"),
        ("X-Other-Hop", "hop2"),
        ("X-Kept", "kept"),
    ]))
    assert status == 200
    seen = upstream.last
    names = canon_names(seen)
    for gone in ("keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection", "x-secret-hop",
                 "x-other-hop"):
        assert gone not in names, (gone, seen.headers)
    connection = seen.header("Connection") or ""
    assert "secret" not in connection.lower() and "hop" not in connection.lower()
    values = " ".join(v for _, v in seen.headers)
    assert "hop1" not in values and "hop2" not in values and "cHJveHk6c2VjcmV0" not in values
    assert seen.header("X-Kept") == "kept"


@pytest.mark.gen_test
async def test_forwarded_headers_from_untrusted_peer(gw, upstream):
    r = await gw.client.request("GET", "/public/xff", headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
        "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6",
    })
    assert r.code == 200
    seen = upstream.last
    assert [v for k, v in seen.headers if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{gw.port}"
    assert seen.header("X-Real-IP") is None
    assert seen.header("Forwarded") is None
    assert "6.6.6.6" not in " ".join(v for _, v in seen.headers)


@pytest.mark.gen_test
async def test_forwarded_headers_from_trusted_proxy(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, server={"trusted_proxies": ["127.0.0.1"]})
    r = await rg.client.request("GET", "/public/xff", headers={
        "X-Forwarded-For": "6.6.6.6, 10.0.0.1", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.example",
    })
    assert r.code == 200
    seen = upstream.last
    assert [v for k, v in seen.headers if k.lower() == "x-forwarded-for"] == ["6.6.6.6, 10.0.0.1, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == "app.example"
    # Without a client-sent chain, the chain starts at the peer.
    r = await rg.client.request("GET", "/public/xff")
    assert upstream.last.header("X-Forwarded-For") == "127.0.0.1"
    assert upstream.last.header("X-Forwarded-Proto") == "http"


@pytest.mark.gen_test
async def test_request_id(gw, upstream):
    r = await gw.client.request("GET", "/public/rid")
    assert r.code == 200
    rid = upstream.last.header("X-Request-Id")
    assert rid and len(rid) >= 16
    assert r.headers.get("X-Request-Id") == rid

    r2 = await gw.client.request("GET", "/public/rid")
    assert r2.headers.get("X-Request-Id") not in (None, rid)

    r = await gw.client.request("GET", "/public/rid", headers={"X-Request-Id": "client-abc.123"})
    assert upstream.last.header("X-Request-Id") == "client-abc.123"
    assert r.headers.get("X-Request-Id") == "client-abc.123"
    assert [k for k, _ in upstream.last.headers if k.lower() == "x-request-id"] == ["X-Request-Id"]

    # An unusable id (too long, odd characters) is replaced, not relayed.
    for bad in ("x" * 300, "a b<script>"):
        r = await gw.client.request("GET", "/public/rid", headers={"X-Request-Id": bad})
        got = upstream.last.header("X-Request-Id")
        assert got and got != bad
        assert r.headers.get("X-Request-Id") == got


@pytest.mark.gen_test
async def test_error_responses_carry_the_request_id_too(gw, upstream):
    r = await gw.client.request("GET", "/api/x", headers={"X-Request-Id": "trace-401"})
    assert r.code == 401 and r.headers.get("X-Request-Id") == "trace-401"
    r = await gw.client.request("GET", "/nowhere")
    assert r.code == 404 and r.headers.get("X-Request-Id")
    r = await gw.client.request("GET", "/auth/session", headers={"X-Request-Id": "trace-auth"})
    assert r.code == 401 and r.headers.get("X-Request-Id") == "trace-auth"


@pytest.mark.gen_test
async def test_oversized_chunked_body_is_a_json_413(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path, server={"max_body_size": "8KiB"}))
    chunks = b"".join(b"400\r\n" + b"a" * 1024 + b"\r\n" for _ in range(12)) + b"0\r\n\r\n"
    request = raw("POST", "/public/upload", [("Transfer-Encoding", "chunked"), ("Connection", "close")]) + chunks
    status, _, data = await raw_request(rg.port, request)
    assert status == 413
    assert json.loads(data)["error"] == "payload_too_large"
    assert not any(seen.path == "/public/upload" for seen in upstream.seen)


# ---------------------------------------------------------------------------
# Identity headers
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_identity_headers_sent_upstream(gw, upstream):
    who = await login(gw)
    r = await gw.client.request("GET", "/api/me", token=who["token"])
    assert r.code == 200, r.body
    seen = upstream.last
    assert seen.header("X-User-Id") == who["user_id"]
    assert seen.header("X-Auth-Provider") == "password"
    assert seen.header("X-Session-Id") == who["session_id"]
    assert who["session_id"] != who["token"]
    assert who["token"] not in " ".join(v for _, v in seen.headers)
    # A session principal has no scopes: no X-Auth-Scopes at all.
    assert seen.header("X-Auth-Scopes") is None
    assert sorted(canon(k) for k, _ in identity_headers(seen)) == ["x-auth-provider", "x-session-id", "x-user-id"]


FORGED = [
    ("X-User-Id", "forged-1"),
    ("x-user-id", "forged-2"),
    ("X_User_Id", "forged-3"),
    ("X-USER_ID", "forged-4"),
    ("X-Auth-Provider", "forged-5"),
    ("X_Auth_Provider", "forged-6"),
    ("X-Session-Id", "forged-7"),
    ("X_Session_Id", "forged-8"),
    ("X-Auth-Scopes", "forged-9"),
    ("x_auth_scopes", "forged-10"),
]


@pytest.mark.gen_test
async def test_forged_identity_headers_never_reach_upstream(gw, upstream):
    who = await login(gw)
    cases = [
        ("/public/f", [], None),                                          # public
        ("/opt/f", [], None),                                             # optional, anonymous
        ("/opt/f", [("Authorization", f"Bearer {who['token']}")], who),   # optional, authenticated
        ("/api/f", [("Authorization", f"Bearer {who['token']}")], who),   # required, authenticated
        ("/api/f", [("Cookie", f"gw_session={who['token']}")], who),      # required, cookie
    ]
    for path, auth, expected in cases:
        before = len(upstream.seen)
        status, _, data = await raw_request(gw.port, raw("GET", path, [("Connection", "close"), *auth, *FORGED]))
        assert status == 200, (path, data)
        assert len(upstream.seen) == before + 1
        seen = upstream.last
        # The client really did send them (the gateway got them), and none came through.
        values = " ".join(v for _, v in seen.headers)
        assert "forged" not in values, (path, seen.headers)
        got = identity_headers(seen)
        if expected is None:
            assert got == [], (path, got)
        else:
            assert sorted((canon(k), v) for k, v in got) == sorted([
                ("x-user-id", expected["user_id"]),
                ("x-auth-provider", "password"),
                ("x-session-id", expected["session_id"]),
            ]), (path, got)


@pytest.mark.gen_test
async def test_forged_headers_with_tornado_client(gw, upstream):
    """The same through an ordinary HTTP client (hyphenated names)."""
    r = await gw.client.request("GET", "/public/f", headers={"X-User-Id": "forged", "X-Session-Id": "forged"})
    assert r.code == 200
    assert identity_headers(upstream.last) == []


# ---------------------------------------------------------------------------
# The gateway's credentials are not passed on
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_gateway_cookie_removed_others_kept(gw, upstream):
    who = await login(gw)
    for path in ("/api/c", "/opt/c", "/public/c"):
        r = await gw.client.request("GET", path, headers={"Cookie": f"theme=dark; gw_session={who['token']}; lang=en"})
        assert r.code == 200, (path, r.body)
        seen = upstream.last
        cookies = [v for k, v in seen.headers if k.lower() == "cookie"]
        assert cookies == ["theme=dark; lang=en"], (path, seen.headers)
        assert who["token"] not in " ".join(v for _, v in seen.headers)
    # The cookie authenticated the /api/ request.
    assert upstream.seen[-3].header("X-User-Id") == who["user_id"]
    # Only the gateway's cookie: no Cookie header at all.
    r = await gw.client.request("GET", "/api/c", headers={"Cookie": f"gw_session={who['token']}"})
    assert r.code == 200
    assert upstream.last.header("Cookie") is None


@pytest.mark.gen_test
async def test_custom_cookie_name_removed(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, sessions={"cookie_name": "sid"})
    who = await login(rg)
    r = await rg.client.request("GET", "/api/c", headers={"Cookie": f"gw_session=keep; sid={who['token']}"})
    assert r.code == 200
    assert upstream.last.header("Cookie") == "gw_session=keep"
    assert upstream.last.header("X-User-Id") == who["user_id"]


@pytest.mark.gen_test
async def test_bearer_token_not_forwarded_basic_is(gw, upstream):
    who = await login(gw)
    for path in ("/api/b", "/opt/b", "/public/b"):
        r = await gw.client.request("GET", path, token=who["token"])
        assert r.code == 200
        assert upstream.last.header("Authorization") is None, path
        assert who["token"] not in " ".join(v for _, v in upstream.last.headers)
    r = await gw.client.request("GET", "/public/b", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.code == 200
    assert upstream.last.header("Authorization") == "Basic dXNlcjpwYXNz"
    r = await gw.client.request("GET", "/opt/b", headers={"Authorization": "Bearer upstream-own-token"})
    assert r.code == 200
    assert upstream.last.header("Authorization") == "Bearer upstream-own-token"
    assert identity_headers(upstream.last) == []


# ---------------------------------------------------------------------------
# Auth modes
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_required_route_without_session(gw, upstream):
    for headers in ({}, {"Authorization": "Bearer gws_not-a-real-token"}, {"Cookie": "gw_session=gws_nope"}):
        for method in ("GET", "POST"):
            r = await gw.client.request(method, "/api/x", headers=headers)
            assert r.code == 401, (headers, r.body)
            assert body(r)["error"] == "unauthenticated"
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert upstream.seen == []


@pytest.mark.gen_test
async def test_optional_route(gw, upstream):
    r = await gw.client.request("GET", "/opt/x")
    assert r.code == 200
    assert identity_headers(upstream.last) == []
    seen = len(upstream.seen)
    # A credential that opens no session is refused, not forwarded anonymously.
    r = await gw.client.request("GET", "/opt/x", headers={"Authorization": "Bearer gws_invalid"})
    assert_error(r, 401, "unauthenticated")
    assert len(upstream.seen) == seen
    who = await login(gw)
    r = await gw.client.request("GET", "/opt/x", token=who["token"])
    assert r.code == 200
    assert upstream.last.header("X-User-Id") == who["user_id"]
    assert upstream.last.header("X-Session-Id") == who["session_id"]


@pytest.mark.gen_test
async def test_public_route_ignores_session(gw, upstream):
    r = await gw.client.request("POST", "/public/x", body=b"hi", headers={"Authorization": "Bearer gws_invalid",
                                                                         "Cookie": "gw_session=gws_bogus"})
    assert r.code == 200, r.body
    assert identity_headers(upstream.last) == []
    who = await login(gw)
    r = await gw.client.request("GET", "/public/x", token=who["token"])
    assert r.code == 200
    assert identity_headers(upstream.last) == []
    # A cookie-borne session on an unsafe request is not CSRF-checked either: it is not used.
    r = await gw.client.request("POST", "/public/x", body=b"x", headers={"Cookie": f"gw_session={who['token']}"})
    assert r.code == 200, r.body
    assert identity_headers(upstream.last) == []


# ---------------------------------------------------------------------------
# The upstream's response
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_upstream_status_codes_passed_through(gw, upstream):
    for code in (201, 404, 500, 503):
        r = await gw.client.request("GET", f"/public/status/{code}")
        assert r.code == code, r.body
        # The upstream's own body, not a gateway error.
        assert r.headers.get("X-Upstream") == "yes"
        assert body(r)["path"] == f"/public/status/{code}"
    r = await gw.client.request("DELETE", "/public/status/204")
    assert r.code == 204
    assert r.body == b""
    assert r.headers.get("Content-Length") in (None, "0")


@pytest.mark.gen_test
async def test_upstream_headers_and_body(gw, upstream):
    r = await gw.client.request("GET", "/public/hb")
    assert r.code == 200
    assert r.headers["X-Upstream"] == "yes"
    assert r.headers["Content-Type"] == "application/json"
    assert json.loads(r.body) == {"method": "GET", "path": "/public/hb", "query": "", "body": ""}
    assert r.headers["Content-Length"] == str(len(r.body))


@pytest.mark.gen_test
async def test_multiple_set_cookie_kept(gw, upstream):
    r = await gw.client.request("GET", "/public/cookies")
    assert r.code == 200
    assert sorted(r.headers.get_list("Set-Cookie")) == ["a=1; Path=/", "b=2; Path=/"]


@pytest.mark.gen_test
async def test_streamed_response_complete(gw, upstream):
    r = await gw.client.request("GET", "/public/stream")
    assert r.code == 200
    assert r.body == b"".join(f"chunk{i}\n".encode() for i in range(5))


@pytest.mark.gen_test
async def test_large_response_intact(gw, upstream):
    r = await gw.client.request("GET", "/public/big")
    assert r.code == 200
    assert len(r.body) == 3 * 1024 * 1024
    assert r.body == b"x" * (3 * 1024 * 1024)


@pytest.mark.gen_test
async def test_head(gw, upstream):
    r = await gw.client.request("HEAD", "/public/h")
    assert r.code == 200
    assert r.body == b""
    assert r.headers.get("X-Upstream") == "yes"
    assert upstream.last.method == "HEAD"
    # On the wire: headers only, no body bytes after them.
    status, headers, data = await raw_request(gw.port, raw("HEAD", "/public/h", [("Connection", "close")]))
    assert status == 200 and data == b""


@pytest.mark.gen_test
async def test_redirect_relayed_not_followed(make_gateway, upstream, port_upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/pool/", "upstream": port_upstream.url, "auth": "public"},
    ])
    r = await rg.client.request("GET", "/pool/redirect")
    assert r.code == 302
    assert r.headers["Location"] == "/elsewhere"
    assert port_upstream.ports == []


@pytest.mark.gen_test
async def test_response_hop_by_hop_headers_removed(make_gateway, upstream, port_upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/pool/", "upstream": port_upstream.url, "auth": "public"},
    ])
    r = await rg.client.request("GET", "/pool/connection")
    assert r.code == 200
    assert r.body == b"fine"
    assert r.headers.get("X-Public") == "ok"
    assert r.headers.get("X-Internal-Hop") is None
    assert r.headers.get("Keep-Alive") is None
    assert "x-internal-hop" not in r.headers.get("Connection", "").lower()


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------


def assert_no_leak(r, *extra: str) -> None:
    text = r.body.decode("utf-8", "replace")
    for marker in (*LEAK_MARKERS, *extra):
        assert marker not in text, (marker, text)


@pytest.mark.gen_test
async def test_unreachable_upstream_is_502(make_gateway, upstream, tmp_path):
    dead = free_port()
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/dead/", "upstream": f"http://127.0.0.1:{dead}", "auth": "public"},
    ])
    for method in ("GET", "POST", "HEAD"):
        r = await rg.client.request(method, "/dead/x")
        assert r.code == 502, (method, r.body)
        if method != "HEAD":
            assert body(r)["error"] == "bad_gateway"
            assert r.headers["Content-Type"].startswith("application/json")
            assert_no_leak(r, str(dead), "Couldn't connect", "refused")


@pytest.mark.gen_test
async def test_slow_upstream_is_504(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/slow/", "upstream": upstream.url, "auth": "public", "request_timeout": "0.5s"},
    ])
    r = await rg.client.request("GET", "/slow/slow?s=2")
    assert r.code == 504, r.body
    assert body(r)["error"] == "gateway_timeout"
    assert_no_leak(r, "timed out after", "milliseconds", str(upstream.port))


@pytest.mark.gen_test
async def test_upstream_dying_mid_response(make_gateway, upstream, tmp_path, io_loop):
    """An upstream that promises more than it sends: the client must not get a
    silently complete-looking response."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def serve_once() -> None:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(listener)
        await loop.sock_recv(conn, 65536)
        await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n"
                                      + b"y" * 100)
        conn.close()

    task = asyncio.ensure_future(serve_once())
    try:
        rg = await start(make_gateway, upstream.url, tmp_path, routes=[
            {"prefix": "/die/", "upstream": f"http://127.0.0.1:{port}", "auth": "public"},
        ])
        try:
            r = await rg.client.request("GET", "/die/x")
        except tornado.simple_httpclient.HTTPStreamClosedError:
            pass  # cut short: the client sees the connection close before 1000 bytes
        else:
            # The headers had not gone out yet: a clean 502.
            assert r.code == 502, (r.code, len(r.body))
            assert body(r)["error"] == "bad_gateway"
        await task
    finally:
        task.cancel()
        listener.close()


@pytest.mark.gen_test
async def test_dot_segments_rejected(gw, upstream):
    for path in ("/public/../api/x", "/public/%2e%2e/api/x", "/public/%2E%2E/api/x", "/public/./x",
                 "/public/..%2fapi/x", "/public/..", "/public/%2e",
                 # how servlet containers and backslash-tolerant servers read ..
                 "/public/..;/api/x", "/public/..%3b/api/x", "/public/..;jsessionid=1/api/x",
                 "/public/..%5capi/x", "/public/..\\api/x"):
        status, _, data = await raw_request(gw.port, raw("GET", path, [("Connection", "close")]))
        assert status == 400, (path, status, data)
        assert json.loads(data)["error"] == "invalid_request"
    assert upstream.seen == []
    # Dots that are not whole segments are ordinary.
    status, _, _ = await raw_request(gw.port, raw("GET", "/public/a..b/.x/..y", [("Connection", "close")]))
    assert status == 200
    assert upstream.last.path == "/public/a..b/.x/..y"


@pytest.mark.gen_test
async def test_percent_encoded_prefix_cannot_switch_route(make_gateway, upstream, tmp_path):
    """With a public catch-all in front of the same upstream, /%61pi/x would
    reach the upstream as /api/x without authentication."""
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/", "upstream": upstream.url, "auth": "public"},
        {"prefix": "/api/", "upstream": upstream.url, "auth": "required"},
    ])
    for path in ("/%61pi/x", "/%61%70%69/x", "/api%2Fx"):
        status, _, data = await raw_request(rg.port, raw("GET", path, [("Connection", "close")]))
        assert status in (400, 401), (path, status, data)
    assert upstream.seen == []
    # Encoded characters that keep the request in its route are ordinary.
    who = await login(rg)
    r = await rg.client.request("GET", "/api/a%20b%2Fc", token=who["token"])
    assert r.code == 200, r.body
    assert upstream.last.path == "/api/a%20b%2Fc"
    assert upstream.last.header("X-User-Id") == who["user_id"]
    r = await rg.client.request("GET", "/files/%61pi")
    assert r.code == 200
    assert upstream.last.path == "/files/%61pi"
    assert identity_headers(upstream.last) == []


# ---------------------------------------------------------------------------
# Pooling and plugins
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_upstream_connections_are_pooled(make_gateway, upstream, port_upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/pool/", "upstream": port_upstream.url, "auth": "public"},
    ])
    for i in range(20):
        r = await rg.client.request("GET", f"/pool/{i}")
        assert r.code == 200, r.body
    assert len(port_upstream.ports) == 20
    assert len(set(port_upstream.ports)) <= 2, port_upstream.ports


class TenantPlugin:
    @gateway.hookimpl
    def gateway_upstream_headers(self, principal):
        return {"X-Tenant": "t1", "X-User-Id": "forged", "X_Session_Id": "forged", "X-Forwarded-For": "6.6.6.6",
                "Connection": "forged"}


@pytest.mark.gen_test
async def test_plugin_upstream_headers_cannot_override_identity(make_gateway, upstream, tmp_path):
    pm = get_plugin_manager(extra_plugins=[("test-headers", TenantPlugin())])
    rg = await make_gateway(base_config(upstream.url, tmp_path), pm=pm)
    who = await login(rg)
    r = await rg.client.request("GET", "/api/t", token=who["token"])
    assert r.code == 200, r.body
    seen = upstream.last
    assert seen.header("X-Tenant") == "t1"
    assert [v for k, v in seen.headers if canon(k) == "x-user-id"] == [who["user_id"]]
    assert [v for k, v in seen.headers if canon(k) == "x-session-id"] == [who["session_id"]]
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert "forged" not in " ".join(v for _, v in seen.headers)
    # Anonymous: the hook still runs, but cannot invent an identity.
    r = await rg.client.request("GET", "/public/t")
    assert r.code == 200
    assert upstream.last.header("X-Tenant") == "t1"
    assert identity_headers(upstream.last) == []


# ---------------------------------------------------------------------------
# Hardening found by review
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_raw_hash_and_control_characters_in_the_path_are_refused(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/app/admin/", "upstream": upstream.url, "auth": "required"},
        {"prefix": "/app/", "upstream": upstream.url, "auth": "public"},
    ])
    for path in ("/app/admin#", "/app/admin#/users", "/app/%00x", "/app/a%0d%0aX-User-Id:%20evil"):
        status, _, data = await raw_request(rg.port, raw("GET", path, []))
        assert status == 400, path
        assert json.loads(data)["error"] == "invalid_request"
    assert upstream.seen == []


@pytest.mark.gen_test
async def test_paths_an_upstream_could_read_as_another_route_are_refused(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, routes=[
        {"prefix": "/app/admin/", "upstream": upstream.url, "auth": "required"},
        {"prefix": "/app/", "upstream": upstream.url, "auth": "public"},
    ])
    for path in ("/app//admin/users", "/app/admin\\users", "/app/admin%5cusers", "/app/admin;x/users",
                 "/app/%61dmin/users", "/app/ADMIN/users", "/App/Admin/users"):
        status, _, data = await raw_request(rg.port, raw("GET", path, []))
        assert status == 400, path
        assert "ambiguous" in json.loads(data)["message"]
    assert upstream.seen == []
    # An ordinary public path, with an encoded character that changes no route, still works.
    status, _, _ = await raw_request(rg.port, raw("GET", "/app/files/a%20b", []))
    assert status == 200 and upstream.last.path == "/app/files/a%20b"


@pytest.mark.gen_test
async def test_utf8_paths_and_queries_reach_the_upstream_percent_encoded(gw, upstream):
    status, _, _ = await raw_request(gw.port, "GET /public/caf\u00e9?q=\u4e2d HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200
    assert upstream.last.path == "/public/caf%C3%A9"
    assert upstream.last.query == "q=%E4%B8%AD"


@pytest.mark.gen_test
async def test_upstream_status_line_without_reason_phrase(make_gateway, tmp_path):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 201\r\nContent-Length: 2\r\nX-Bare: 1\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with raw_upstream(handle) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path)
        r = await rg.client.request("GET", "/public/x")
        assert r.code == 201 and r.body == b"ok" and r.headers["X-Bare"] == "1"


@pytest.mark.gen_test
async def test_upstream_cannot_set_the_gateway_cookie(make_gateway, tmp_path):
    class Fixer(tornado.web.RequestHandler):
        def get(self):
            self.add_header("Set-Cookie", "gw_session=attacker-token; Path=/")
            self.add_header("Set-Cookie", "theme=dark; Path=/")
            self.finish("ok")

    with serving(tornado.web.Application([(r".*", Fixer)])) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path)
        r = await rg.client.request("GET", "/public/x")
        cookies = r.headers.get_list("Set-Cookie")
        assert cookies == ["theme=dark; Path=/"]


@pytest.mark.gen_test
async def test_client_facts_pass_only_from_trusted_proxies(make_gateway, upstream, tmp_path):
    facts = [("X-Forwarded-Port", "1"), ("X-Forwarded-Prefix", "/evil"), ("X-Original-URL", "/admin"),
             ("True-Client-IP", "1.2.3.4"), ("X-Real-IP", "1.2.3.4"), ("Forwarded", "for=1.2.3.4")]
    rg = await start(make_gateway, upstream.url, tmp_path)
    await raw_request(rg.port, raw("GET", "/public/x", facts))
    names = {k.lower() for k in upstream.last.names()}
    for name, _ in facts:
        assert name.lower() not in names
    trusted = await start(make_gateway, upstream.url, tmp_path, server={"trusted_proxies": ["127.0.0.1/32"]})
    await raw_request(trusted.port, raw("GET", "/public/x", facts))
    assert upstream.last.header("X-Forwarded-Port") == "1"
    assert upstream.last.header("X-Real-IP") == "1.2.3.4"


@pytest.mark.gen_test
async def test_a_gateway_token_is_never_forwarded_whatever_the_separator(gw, upstream):
    reg = await gw.client.register()
    for value in (f"Bearer\t{reg['token']}", f"bearer  {reg['token']}", f"Token {reg['token']}"):
        status, _, _ = await raw_request(gw.port, raw("GET", "/opt/x", [("Authorization", value)]))
        assert status in (200, 400, 401), value
        for seen in upstream.seen:
            assert reg["token"] not in repr(seen.headers), value


@pytest.mark.gen_test
async def test_cors_preflights_for_protected_routes_are_answered_by_the_gateway(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, sessions={"allowed_origins": ["https://app.example.com"]})
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, x-requested-with"}
    r = await rg.client.request("OPTIONS", "/api/items?id=42", headers=preflight)
    assert r.code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "content-type, x-requested-with"
    r = await rg.client.request("OPTIONS", "/api/items", headers={**preflight, "Origin": "https://evil.example"})
    assert r.code == 403 and "Access-Control-Allow-Origin" not in r.headers
    # Shaped like a preflight, with a body: never reaches the upstream unauthenticated.
    r = await rg.client.request("OPTIONS", "/api/admin/delete?id=42", headers=preflight, body=b"confirm=yes")
    assert r.code in (204, 403)
    assert upstream.seen == []
    # Public routes forward preflights like anything else.
    assert (await rg.client.request("OPTIONS", "/public/x", headers=preflight)).code == 200
    assert upstream.last.method == "OPTIONS"
    # A plain OPTIONS without the preflight headers still needs a session.
    assert (await rg.client.request("OPTIONS", "/api/items")).code == 401


@pytest.mark.gen_test
async def test_allowed_origins_get_cors_headers_on_proxied_responses(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream.url, tmp_path, sessions={"allowed_origins": ["https://app.example.com"]})
    r = await rg.client.request("GET", "/public/x", headers={"Origin": "https://app.example.com"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in r.headers.get_list("Vary")
    r = await rg.client.request("GET", "/public/x", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.gen_test
async def test_nameless_cookies_from_the_upstream_are_dropped(make_gateway, tmp_path):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                     b"Set-Cookie: =gw_session=gws_attacker; Path=/\r\nSet-Cookie: gw_session\r\n"
                     b"Set-Cookie:  =x\r\nSet-Cookie: theme=dark\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with raw_upstream(handle) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path)
        r = await rg.client.request("GET", "/public/x")
        assert r.code == 200
        assert r.headers.get_list("Set-Cookie") == ["theme=dark"]


@pytest.mark.gen_test
async def test_scheme_headers_from_untrusted_clients_are_dropped(gw, upstream):
    await raw_request(gw.port, raw("GET", "/public/x", [("X-Scheme", "https"), ("X-Forwarded", "for=1.2.3.4"),
                                                         ("Front-End-Https", "on"), ("CF-Connecting-IP", "1.2.3.4")]))
    names = {k.lower() for k in upstream.last.names()}
    assert not names & {"x-scheme", "x-forwarded", "front-end-https", "cf-connecting-ip"}


@pytest.mark.gen_test
async def test_upstream_sending_both_content_length_and_chunked(make_gateway, tmp_path):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_upstream(handle) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path)
        r = await rg.client.request("GET", "/public/x")
        # Both framings at once is a response-splitting vector (RFC 9112 §6.3): refused.
        assert_error(r, 502, "bad_gateway")


class BigStream(tornado.web.RequestHandler):
    """Writes 64 MiB in 1 MiB pieces, recording how far it got."""

    def initialize(self, progress: dict) -> None:
        self.progress = progress

    async def get(self):
        self.set_header("Content-Length", str(64 << 20))
        piece = b"z" * (1 << 20)
        try:
            for _ in range(64):
                self.write(piece)
                await self.flush()
                self.progress["sent"] = self.progress.get("sent", 0) + len(piece)
        except tornado.iostream.StreamClosedError:
            self.progress["closed"] = True


async def request_big_download(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Ask the gateway for /public/big on a raw connection, reading nothing yet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /public/big HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    return reader, writer


@pytest.mark.gen_test(timeout=60)
async def test_slow_client_pauses_the_upstream_instead_of_filling_memory(make_gateway, tmp_path):
    progress: dict = {}
    with serving(tornado.web.Application([(r".*", BigStream, {"progress": progress})])) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path)
        reader, writer = await request_big_download(rg.port)
        await asyncio.sleep(1.5)  # the client reads nothing meanwhile
        stalled_at = progress.get("sent", 0)
        assert stalled_at < 32 << 20, f"the upstream could send {stalled_at} bytes to a client that read none"
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        received = 0
        while received < 64 << 20:
            chunk = await reader.read(1 << 20)
            assert chunk, "connection closed early"
            received += len(chunk)
        assert received == 64 << 20
        writer.close()


@pytest.mark.gen_test
async def test_upstream_sees_no_headers_the_client_did_not_send(gw, upstream):
    await raw_request(gw.port, raw("GET", "/public/bare", []))
    names = {k.lower() for k in upstream.last.names()}
    assert "accept" not in names and "user-agent" not in names
    await raw_request(gw.port, raw("GET", "/public/bare", [("Accept", "text/csv"), ("User-Agent", "app/1.0")]))
    assert upstream.last.header("Accept") == "text/csv" and upstream.last.header("User-Agent") == "app/1.0"


@pytest.mark.gen_test(timeout=60)
async def test_a_slow_reader_is_not_cut_off_by_request_timeout(make_gateway, tmp_path):
    """request_timeout bounds the wait for the upstream, not the client's reading."""
    progress: dict = {}
    with serving(tornado.web.Application([(r".*", BigStream, {"progress": progress})])) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path, routes=[
            {"prefix": "/public/", "upstream": upstream_url, "auth": "public", "request_timeout": "1s"}])
        reader, writer = await request_big_download(rg.port)
        await reader.readuntil(b"\r\n\r\n")
        received = 0
        while received < 64 << 20:
            chunk = await reader.read(1 << 20)
            assert chunk, f"cut off after {received} bytes"
            received += len(chunk)
            if received < 8 << 20:
                await asyncio.sleep(0.3)  # a slow start: the whole read takes longer than request_timeout
        writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_departed_client_frees_the_upstream_connection(make_gateway, tmp_path):
    progress: dict = {}
    with serving(tornado.web.Application([(r".*", BigStream, {"progress": progress})])) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path)
        reader, writer = await request_big_download(rg.port)
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(1 << 20)
        writer.close()
        for _ in range(40):
            if progress.get("closed"):
                break
            await asyncio.sleep(0.1)
        assert progress.get("closed"), "the upstream transfer went on after the client left"
        assert progress.get("sent", 0) < 64 << 20


@pytest.mark.gen_test
async def test_an_upstream_doing_its_own_cors_keeps_its_headers(make_gateway, tmp_path):
    class Cors(tornado.web.RequestHandler):
        def get(self):
            self.set_header("Access-Control-Allow-Origin", "*")
            self.finish("ok")

    with serving(tornado.web.Application([(r".*", Cors)])) as upstream_url:
        rg = await start(make_gateway, upstream_url, tmp_path,
                         sessions={"allowed_origins": ["https://app.example.com"]})
        r = await rg.client.request("GET", "/public/x", headers={"Origin": "https://app.example.com"})
        assert r.headers.get_list("Access-Control-Allow-Origin") == ["*"]
        assert "Access-Control-Allow-Credentials" not in r.headers


@pytest.mark.gen_test
async def test_an_oversized_request_head_closes_the_connection_as_documented(gw, upstream):
    # The README: a request head over 64 KiB gets its connection closed
    # without an answer (Tornado's limit); nothing reaches the upstream, and
    # the gateway goes on serving.
    stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", gw.port)
    try:
        await stream.write(b"GET /public/x HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
        answer = await asyncio.wait_for(stream.read_until_close(), 5)
    except tornado.iostream.StreamClosedError:
        answer = b""
    finally:
        stream.close()
    assert answer == b""
    assert upstream.seen == []
    status, _, _ = await raw_request(gw.port, raw("GET", "/public/x", []))
    assert status == 200
