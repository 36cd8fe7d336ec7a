"""Forward auth: ``GET /auth/verify`` for nginx ``auth_request`` (and
Traefik ``ForwardAuth``), and the shipped nginx configuration.

The first tests run the core contract through a real nginx started with
``conf/nginx-forward-auth.example.conf`` itself (its placeholders replaced
with real ports and directories), a real gateway and a real recording
upstream, all on loopback.  The others ask ``/auth/verify`` directly, as a
proxy would: who is believed, which route judges, the proxy's refusals.
The last section asks ``/auth/verify/envoy/<original path>`` as Envoy's HTTP
``ext_authz`` does.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.web
import tornado.websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import REGISTRY

from gateway import hookimpl
from gateway.api import GatewayError, Principal
from gateway.plugins import get_plugin_manager
from gateway.proxy import policy
from gateway.testing import (RedisServer, RunningGateway, Upstream, assert_error, base_config, body, cookie_header,
                             cookie_value, free_port)
from gateway.testing.nginx import Nginx, NginxMissing, find_nginx
from password_support import PasswordClient
from test_route_policy import KEY, load_recording_plugin

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "nginx-forward-auth.example.conf"
VERIFY = "/auth/verify"
#: the origin the gateways of these tests allow (CORS)
ORIGIN = "https://app.example.net"
#: how nginx marks its second question, the one whose answer the client gets
REASK = {"X-Gateway-Verify": "refusal"}
#: every header /auth/verify may answer for the upstream (with the test plugin's)
IDENTITY = ("X-User-Id", "X-Auth-Provider", "X-Session-Id", "X-Auth-Scopes", "X-Gateway-Assertion", "X-Consent",
            "X-WeChat-AppId", "X-WeChat-OpenId", "X-WeChat-UnionId")
FORGED = {"X-User-Id": "u_forged", "x-auth-provider": "forged", "X-Auth-Scopes": "admin",
          "X-Gateway-Assertion": "forged.jwt.value", "x-gateway-assertion": "forged2", "X-Consent": "terms=9",
          "X-WeChat-OpenId": "o-forged", "X_User_Id": "u_underscore", "X-Forwarded-Uri": "/public/x",
          "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"}


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


def values(seen: Any, name: str) -> list[str]:
    """Every value of header ``name`` (any case, ``_`` or ``-``) the upstream received."""
    return [v for k, v in seen.headers if canon(k) == canon(name)]


def ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def routes(url: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/api/", "upstream": url, "auth": "required"},
        {"prefix": "/opt/", "upstream": url, "auth": "optional"},
        {"prefix": "/public/", "upstream": url, "auth": "public"},
        {"prefix": "/read/", "upstream": url, "scopes": ["read"]},
        {"prefix": "/admin/", "upstream": url, "scopes": ["read", "admin"]},
        {"prefix": "/keys-only/", "upstream": url, "allow_sessions": False},
        {"prefix": "/signed/", "upstream": url, "assertion": True},
        {"prefix": "/limited/", "upstream": url},
    ]


def config(upstream: Upstream, where: Path, trusted: list[str] | None = None, **sections: Any) -> dict[str, Any]:
    return base_config(
        upstream.url, where, routes=routes(upstream.url),
        server={"trusted_proxies": ["127.0.0.1"] if trusted is None else trusted, "forward_auth": True},
        assertion={"keys": [{"kid": "k1", "algorithm": "ES256", "private_key_env": "KEY"}]},
        rate_limits=[{"name": "lim", "match": "/limited/", "limit": 2, "window": "1m", "key": "user"}],
        **sections)


class FlakyKey:
    """A plugin: the key ``X-Test-Key: flaky`` fails once (503, as a store
    outage would), then opens; what a proxy that asks twice sees when the
    second answer differs from the first."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def gateway_authenticate(self, request: Any) -> Principal | None:
        if request.headers.get("X-Test-Key") != "flaky":
            return None
        self.calls += 1
        if self.calls % 2:
            raise GatewayError("unavailable", "the key store did not answer")
        return Principal(user_id="u_flaky", provider="testkey", scopes=["read"], headers_to_strip=("X-Test-Key",))


async def start(make_gateway: Any, upstream: Upstream, where: Path, **kw: Any) -> RunningGateway:
    pm = get_plugin_manager(extra_plugins=[("recording", load_recording_plugin()), ("flaky", FlakyKey())])
    return await make_gateway(config(upstream, where, **kw), environ={"KEY": ec_pem()}, pm=pm)


def original(method: str, uri: str, **headers: str) -> dict[str, str]:
    return {"X-Original-Method": method, "X-Original-URI": uri, **headers}


@pytest.fixture
def nginx_binary() -> str:
    try:
        return find_nginx()
    except NginxMissing as exc:
        pytest.skip(str(exc))


def shipped_nginx(work: Path, gateway_port: int, upstream_port: int) -> Nginx:
    """nginx running the shipped file, its placeholders replaced with these ports and ``work``."""
    port = free_port()
    return Nginx(work, CONF.read_text(), {
        "__LISTEN__": f"127.0.0.1:{port}",
        "__GATEWAY__": f"127.0.0.1:{gateway_port}",
        "__UPSTREAM__": f"127.0.0.1:{upstream_port}",
        "__TEMP_DIR__": str(work),
        "__LOG_DIR__": str(work),
    }, port=port)


@pytest.fixture
def edge(nginx_binary: str, make_gateway: Any, upstream: Upstream, tmp_path: Path,
         io_loop: Any) -> Iterator[tuple[Nginx, RunningGateway, PasswordClient]]:
    """nginx with the shipped configuration in front of a gateway and the upstream."""
    rg = io_loop.run_sync(lambda: start(make_gateway, upstream, tmp_path / "gw", sessions={"allowed_origins": [ORIGIN]}))
    with shipped_nginx(tmp_path / "nginx", rg.port, upstream.port) as nginx:
        client = PasswordClient(nginx.url)
        try:
            yield nginx, rg, client
        finally:
            client.close()


# -- through nginx ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_through_nginx_a_session_opens_the_route_and_the_upstream_gets_its_identity(edge, upstream):
    nginx, rg, client = edge
    r = await client.request("GET", "/api/x")
    data = assert_error(r, 401, "unauthenticated", fields={"reason": "missing"})  # the gateway's own JSON
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert upstream.seen == []
    login = await client.register()  # /auth/ proxied to the gateway
    token, user_id = login["token"], login["user"]["id"]
    r = await client.request("GET", "/api/x?q=1", token=token, headers={"X-API-Key": "someone-elses"})
    assert r.code == 200, (r.code, r.body, nginx.log_tail())
    seen = upstream.last
    assert (seen.path, seen.query) == ("/api/x", "q=1")
    assert values(seen, "X-User-Id") == [user_id]
    assert values(seen, "X-Auth-Provider") == ["password"]
    assert values(seen, "X-Session-Id") == [login["session"]["id"]]
    assert values(seen, "X-Auth-Scopes") == [] and values(seen, "X-Gateway-Assertion") == []
    assert values(seen, "Authorization") == [] and values(seen, "X-API-Key") == []  # no credential
    assert values(seen, "X-Request-Id") == [r.headers["X-Request-Id"]]
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.gen_test
async def test_through_nginx_forged_identity_headers_and_the_session_cookie_never_reach_the_upstream(edge, upstream):
    nginx, rg, client = edge
    login = await client.register()
    cookie = f"theme=dark; gw_session={login['token']}; lang=en"
    r = await client.request("GET", "/api/x", headers={**FORGED, "Cookie": cookie})
    assert r.code == 200, (r.code, r.body)
    seen = upstream.last
    assert values(seen, "X-User-Id") == [login["user"]["id"]]
    assert values(seen, "X-Auth-Provider") == ["password"]
    for name in ("X-Auth-Scopes", "X-Gateway-Assertion", "X-Consent", "X-WeChat-OpenId", "X-Forwarded-Uri",
                 "Forwarded", "X-Real-IP"):
        assert values(seen, name) == [], name
    assert values(seen, "Cookie") == ["theme=dark; lang=en"]
    assert "gws_" not in repr(seen.headers)
    t = login["token"]
    for sent, left in ((f"gw_session={t}; theme=dark", ["theme=dark"]), (f"gw_session={t}", []),
                       (f"a=1; gw_session={t}; gw_session={t}", ["a=1"]),
                       ("gw_session=old;gw_session=" + t + "; my_gw_session=kept", ["my_gw_session=kept"])):
        r = await client.request("GET", "/api/x", headers={"Cookie": sent})
        assert r.code == 200, (sent, r.code)
        assert values(upstream.last, "Cookie") == left, sent
    # a public route: the gateway says who no one is, and nothing forged goes up either
    r = await client.request("GET", "/public/x", headers={**FORGED, "Cookie": f"gw_session={login['token']}"})
    assert r.code == 200
    seen = upstream.last
    assert values(seen, "X-User-Id") == [] and values(seen, "X-Gateway-Assertion") == []
    assert values(seen, "Cookie") == []


@pytest.mark.gen_test
async def test_through_nginx_a_route_with_assertion_sends_the_signed_identity(edge, upstream):
    nginx, rg, client = edge
    login = await client.register()
    r = await client.request("GET", "/signed/x", token=login["token"],
                             headers={"X-Gateway-Assertion": "forged"})
    assert r.code == 200
    [assertion] = values(upstream.last, "X-Gateway-Assertion")
    assert assertion != "forged" and assertion.count(".") == 2


@pytest.mark.gen_test
async def test_through_nginx_logout_takes_effect_at_once(edge, upstream):
    nginx, rg, client = edge
    login = await client.register()
    token = login["token"]
    assert (await client.request("GET", "/api/x", token=token)).code == 200
    r = await client.request("POST", "/auth/logout", token=token)
    assert r.code == 204
    before = len(upstream.seen)
    r = await client.request("GET", "/api/x", token=token)
    assert_error(r, 401, "unauthenticated", fields={"reason": "revoked"})
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    # by cookie: the dead cookie is cleared, as the gateway's proxy clears it
    r = await client.request("GET", "/api/x", headers={"Cookie": f"gw_session={token}"})
    assert_error(r, 401, "unauthenticated", fields={"reason": "revoked"})
    cleared = cookie_header(r)
    assert cleared is not None and cookie_value(r) in ("", '""') and "expires=" in cleared.lower()
    assert len(upstream.seen) == before


@pytest.mark.gen_test(timeout=60)
async def test_through_nginx_a_hung_session_store_is_one_503_within_about_a_second(
        nginx_binary, make_gateway, upstream, tmp_path):
    """nginx asks twice about a refusal: the second question must not wait
    for the hung store again (the client would wait two deadlines)."""
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as redis:
        rg = await start(make_gateway, upstream, tmp_path / "gw", sessions={"store": "redis", "redis_url": redis.url})
        with shipped_nginx(tmp_path / "nginx", rg.port, upstream.port) as nginx:
            client = PasswordClient(nginx.url)
            try:
                token = (await client.register())["token"]
                assert (await client.request("GET", "/api/x", token=token)).code == 200
                assert redis.proc is not None
                redis.proc.send_signal(signal.SIGSTOP)  # accepts, never answers
                try:
                    for _ in range(3):
                        began = time.monotonic()
                        r = await client.request("GET", "/api/x", token=token)
                        took = time.monotonic() - began
                        assert_error(r, 503, "unavailable")
                        assert took < 1.8, f"{took:.2f} s: the hung store was waited for twice"
                finally:
                    redis.proc.send_signal(signal.SIGCONT)
                assert (await client.request("GET", "/api/x", token=token)).code == 200  # and back at once
            finally:
                client.close()


@pytest.mark.gen_test
async def test_through_nginx_every_refusal_is_the_gateways_json(edge, upstream):
    nginx, rg, client = edge
    login = await client.register()
    token = login["token"]
    assert_error(await client.request("GET", "/nowhere"), 404, "not_found")
    assert_error(await client.request("GET", "/keys-only/x", token=token), 403, "forbidden")
    assert_error(await client.request("GET", "/public/..%2fapi/x"), 400, "invalid_request")
    # CSRF: a cookie-authenticated POST needs the gateway's own (here: nginx's) origin
    cookie = {"Cookie": f"gw_session={token}"}
    assert_error(await client.request("POST", "/api/x", body=b"{}", headers={**cookie, "Origin": "https://evil.example"}),
                 403, "csrf")
    r = await client.request("POST", "/api/x", body=b'{"a": 1}', headers={**cookie, "Origin": nginx.url})
    assert r.code == 200 and upstream.last.method == "POST" and upstream.last.body == b'{"a": 1}'
    # a rate limit: 429 with Retry-After (auth_request alone would make it a 500)
    for left in (1, 0):
        r = await client.request("GET", "/limited/x", token=token)
        assert r.code == 200 and r.headers["RateLimit-Policy"] == '"lim";q=2;w=60'
        assert f"r={left}" in r.headers["RateLimit"]
    r = await client.request("GET", "/limited/x", token=token)
    data = assert_error(r, 429, "rate_limited")
    assert data["limit"] == "lim" and int(r.headers["Retry-After"]) >= 1
    assert "RateLimit" in r.headers


class Echo(tornado.websocket.WebSocketHandler):
    """A WebSocket upstream: echoes, and keeps each handshake's headers."""

    def initialize(self, handshakes: list[list[tuple[str, str]]]) -> None:
        self.handshakes = handshakes

    def check_origin(self, origin: str) -> bool:
        return True  # the gateway decides about origins

    def open(self, *args: Any) -> None:
        self.handshakes.append(list(self.request.headers.get_all()))

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


async def ws_connect(url: str, **headers: str) -> tornado.websocket.WebSocketClientConnection:
    request = tornado.httpclient.HTTPRequest(url.replace("http://", "ws://"), headers=headers,
                                             connect_timeout=10, request_timeout=10)
    return await tornado.websocket.websocket_connect(request)


@pytest.mark.gen_test
async def test_through_nginx_a_websocket_is_judged_as_the_gateway_judges_its_handshake(
        nginx_binary, make_gateway, upstream, tmp_path):
    handshakes: list[list[tuple[str, str]]] = []
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r".*", Echo, {"handshakes": handshakes})]))
    ws_port = free_port()
    server.listen(ws_port, "127.0.0.1")
    ws_routes = [{"prefix": "/ws/", "upstream": f"http://127.0.0.1:{ws_port}", "websocket": True},
                 {"prefix": "/api/", "upstream": f"http://127.0.0.1:{ws_port}"}]
    rg = await make_gateway(base_config(upstream.url, tmp_path, routes=ws_routes,
                                        server={"trusted_proxies": ["127.0.0.1"], "forward_auth": True}))
    try:
        with shipped_nginx(tmp_path / "nginx", rg.port, ws_port) as nginx:
            login = await PasswordClient(nginx.url).register()
            conn = await ws_connect(nginx.url + "/ws/chat", Authorization=f"Bearer {login['token']}")
            await conn.write_message("hello")
            assert await conn.read_message() == "hello"
            conn.close()
            [seen] = handshakes
            assert [v for k, v in seen if canon(k) == "x-user-id"] == [login["user"]["id"]]
            assert not [v for k, v in seen if canon(k) == "authorization"]
            for headers, status in (({}, 401),  # no session
                                    ({"Cookie": f"gw_session={login['token']}", "Origin": "https://evil.example"}, 403),
                                    ({"Authorization": f"Bearer {login['token']}"}, 400)):  # /api/: no WebSockets
                path = "/api/chat" if status == 400 else "/ws/chat"
                with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
                    await ws_connect(nginx.url + path, **headers)
                assert refused.value.code == status, (path, headers)
            assert len(handshakes) == 1
    finally:
        server.stop()


# -- /auth/verify, asked directly --------------------------------------------------------


@pytest.mark.gen_test
async def test_an_untrusted_peer_is_refused_whatever_it_says(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, trusted=["10.0.0.0/8"])
    token = (await rg.client.register())["token"]
    for headers in (original("GET", "/api/x"), {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/public/x"}, {}):
        r = await rg.client.request("GET", VERIFY, token=token, headers=headers)
        assert_error(r, 403, "forbidden", contains="server.trusted_proxies")
        assert "X-User-Id" not in r.headers


@pytest.mark.gen_test
async def test_the_original_request_must_be_named_once_and_consistently(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    bad = [
        ({}, "X-Original-URI"),
        ({"X-Original-URI": "/api/x"}, "X-Original-Method"),
        ({**original("GET", "/api/x"), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/public/x"}, "disagree"),
        (original("GET", "http://elsewhere/api/x"), "path"),
        (original("TRACE", "/api/x"), "method"),
        (original("GET", "/auth/session"), "/auth/"),
    ]
    for headers, words in bad:
        r = await rg.client.request("GET", VERIFY, token=token, headers=headers)
        assert_error(r, 400, "invalid_request", contains=words)
        assert "X-User-Id" not in r.headers
    # Traefik's pair alone, or both pairs agreeing
    for headers in ({"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/x"},
                    {**original("GET", "/api/x"), "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/x"}):
        r = await rg.client.request("GET", VERIFY, token=token, headers=headers)
        assert r.code == 200 and r.headers["X-Auth-Provider"] == "password"
    r = await rg.client.request("POST", VERIFY, token=token, headers=original("GET", "/api/x"))
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "GET"


@pytest.mark.gen_test
async def test_the_original_uri_picks_the_route_whose_rules_apply(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    login = await rg.client.register()
    token = login["token"]

    async def verify(uri: str, method: str = "GET", **kw: Any) -> Any:
        return await rg.client.request("GET", VERIFY, headers={**original(method, uri), **kw.pop("headers", {})}, **kw)

    r = await verify("/api/x?a=1", token=token)
    assert r.code == 200 and r.body == b""
    assert r.headers["X-User-Id"] == login["user"]["id"] and r.headers["X-Session-Id"] == login["session"]["id"]
    assert r.headers["X-Route-Prefix"] == "/api/"  # what the proxy would add (a plugin's), and no forged X-Session-Id
    assert "X-Auth-Scopes" not in r.headers and "X-Gateway-Assertion" not in r.headers
    assert_error(await verify("/api/x"), 401, "unauthenticated", fields={"reason": "missing"})
    # scopes: a plugin principal holding read and write
    r = await verify("/read/x", headers=KEY)
    assert r.code == 200 and r.headers["X-Auth-Scopes"] == "read write" and r.headers["X-User-Id"] == "u_key"
    assert_error(await verify("/admin/x", headers=KEY), 403, "forbidden", contains="admin")
    # allow_sessions = false
    assert_error(await verify("/keys-only/x", token=token), 403, "forbidden")
    assert (await verify("/keys-only/x", headers=KEY)).code == 200
    # optional and public: anonymous passes with no identity
    for uri in ("/opt/x", "/public/x"):
        r = await verify(uri)
        assert r.code == 200 and "X-User-Id" not in r.headers
    # assertion = true
    r = await verify("/signed/x", token=token)
    assert r.code == 200 and r.headers["X-Gateway-Assertion"].count(".") == 2
    assert_error(await verify("/nowhere/x", token=token), 404, "not_found")
    # a credential in the original query string is refused, as the proxy refuses it
    assert_error(await verify(f"/public/x?t={token}"), 400, "invalid_request",
                 contains=("X-Original-Uri", "X-Original-URI"))
    assert_error(await rg.client.request("GET", f"/public/x?t={token}"), 400, "invalid_request")


@pytest.mark.parametrize("uri", ["/public/../api/x", "/public/%2e%2e/api/x", "/public/..%2fapi/x",
                                 "/public/x#frag", "/public/x%00"])
@pytest.mark.gen_test
async def test_a_path_the_proxy_refuses_is_refused(make_gateway, upstream, tmp_path, uri):
    rg = await start(make_gateway, upstream, tmp_path)
    r = await rg.client.request("GET", VERIFY, headers=original("GET", uri))
    assert_error(r, 400, "invalid_request", contains="path")


@pytest.mark.gen_test
async def test_an_ambiguous_prefix_is_refused(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    assert_error(await rg.client.request("GET", VERIFY, headers=original("GET", "/%61pi/x")), 400,
                 "invalid_request", contains="ambiguous")
    for uri in ("/%61pi/x", "/API/x", "/public//api/x", "/public/%2Fapi/x", "/public;x/y", "/opt/x"):
        r = await rg.client.request("GET", VERIFY, headers=original("GET", uri))
        direct = await rg.client.request("GET", uri)  # the proxy's own answer for that path
        assert r.code == direct.code, (uri, direct.code, r.code)
        if r.code != 200:
            assert body(r) == body(direct), uri


@pytest.mark.gen_test
async def test_csrf_applies_to_an_unsafe_original_method(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    cookie = {"Cookie": f"gw_session={token}"}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = await rg.client.request("GET", VERIFY, headers={**original(method, "/api/x"), **cookie})
        assert_error(r, 403, "csrf")
        r = await rg.client.request("GET", VERIFY, headers={**original(method, "/api/x"), **cookie,
                                                            "Origin": "https://evil.example"})
        assert_error(r, 403, "csrf")
        r = await rg.client.request("GET", VERIFY, headers={**original(method, "/api/x"), **cookie,
                                                            "X-Requested-With": "fetch"})
        assert r.code == 200
        r = await rg.client.request("GET", VERIFY, token=token, headers=original(method, "/api/x"))
        assert r.code == 200  # Bearer needs no Origin
    # the gateway's own origin, as the proxy in front names it
    r = await rg.client.request("GET", VERIFY, headers={
        **original("POST", "/api/x"), **cookie, "Origin": "https://app.example.com",
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.example.com"})
    assert r.code == 200
    assert (await rg.client.request("GET", VERIFY, headers={**original("GET", "/api/x"), **cookie})).code == 200


@pytest.mark.gen_test
async def test_a_preflight_is_never_let_through_but_answered_as_the_proxy_answers_it(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, sessions={"allowed_origins": [ORIGIN]})
    ask = {**original("OPTIONS", "/api/x"), "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type, x-thing"}
    for extra in ({}, REASK):
        assert_error(await rg.client.request("GET", VERIFY, headers={**ask, **extra, "Origin": "https://evil.example"}),
                     403, "forbidden")
    # the first question: not to be forwarded (the proxy in front then asks again, for the answer)
    r = await rg.client.request("GET", VERIFY, headers={**ask, "Origin": ORIGIN})
    assert_error(r, 403, "forbidden", contains="preflight")
    # the second: the proxy's own answer to that preflight
    r = await rg.client.request("GET", VERIFY, headers={**ask, **REASK, "Origin": ORIGIN})
    direct = await rg.client.request("OPTIONS", "/api/x", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, x-thing"})
    assert r.code == direct.code == 204
    cors = [n for n in direct.headers if n.lower().startswith("access-control-")]
    assert "Access-Control-Allow-Methods" in cors and "Access-Control-Allow-Headers" in cors
    assert {n: r.headers.get(n) for n in [*cors, "Vary"]} == {n: direct.headers.get(n) for n in [*cors, "Vary"]}
    assert "X-User-Id" not in r.headers and not upstream.seen
    # a public route's preflight goes to its upstream, as the proxy sends it there
    r = await rg.client.request("GET", VERIFY, headers={**original("OPTIONS", "/public/x"),
                                                        "Access-Control-Request-Method": "POST", "Origin": ORIGIN})
    assert r.code == 200


@pytest.mark.gen_test
async def test_a_dead_cookie_is_cleared_and_the_challenge_sent(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    assert (await rg.client.request("POST", "/auth/logout", token=token)).code == 204
    r = await rg.client.request("GET", VERIFY, headers={**original("GET", "/api/x"), "Cookie": f"gw_session={token}"})
    assert_error(r, 401, "unauthenticated", fields={"reason": "revoked"})
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="gateway"')
    assert cookie_value(r) in ("", '""') and "expires=" in (cookie_header(r) or "").lower()


@pytest.mark.gen_test
async def test_the_routes_rate_limit_counts_verify_and_its_metrics_name_the_route(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]

    def answered(status: str) -> float:
        return REGISTRY.get_sample_value("gateway_http_requests_total",
                                         {"route": "/limited/", "method": "GET", "status": status}) or 0.0

    ok_before, limited_before = answered("200"), answered("429")
    for left in (1, 0):
        r = await rg.client.request("GET", VERIFY, token=token, headers=original("GET", "/limited/x"))
        assert r.code == 200
        assert r.headers["RateLimit-Policy"] == '"lim";q=2;w=60' and f'r={left}' in r.headers["RateLimit"]
    r = await rg.client.request("GET", VERIFY, token=token, headers=original("GET", "/limited/x"))
    data = assert_error(r, 429, "rate_limited")
    assert data["limit"] == "lim" and r.headers["Retry-After"] == str(data["retry_after"])
    # the proxy shares the count: the route's limit is one limit
    assert_error(await rg.client.request("GET", "/limited/x", token=token), 429, "rate_limited")
    assert answered("200") - ok_before == 2 and answered("429") - limited_before == 2  # verify's and the proxy's


# -- the second question, upgrades, cookies, the switch ------------------------------------


@pytest.mark.gen_test
async def test_the_second_question_never_lets_a_request_through(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    login = await rg.client.register()
    token = login["token"]
    # asked again (nginx's error_page) for a request that is allowed now: not a 2xx, no identity
    for uri, kw in (("/api/x", {"token": token}), ("/signed/x", {"token": token}), ("/public/x", {}),
                    ("/read/x", {"headers": KEY})):
        r = await rg.client.request("GET", VERIFY, **{**kw, "headers": {**original("GET", uri), **REASK,
                                                                         **kw.get("headers", {})}})
        assert_error(r, 503, "unavailable", contains="try again")
        assert r.headers["Retry-After"] == "1"
        for name in IDENTITY:
            assert name not in r.headers, (uri, name)
    # a refusal is answered as ever
    r = await rg.client.request("GET", VERIFY, headers={**original("GET", "/api/x"), **REASK})
    assert_error(r, 401, "unauthenticated", fields={"reason": "missing"})
    assert_error(await rg.client.request("GET", VERIFY, token=token, headers={**original("GET", "/keys-only/x"), **REASK}),
                 403, "forbidden")
    assert_error(await rg.client.request("GET", VERIFY, headers={**original("GET", "/nowhere"), **REASK}),
                 404, "not_found")
    # the first question, unmarked, is unchanged
    assert (await rg.client.request("GET", VERIFY, token=token, headers=original("GET", "/api/x"))).code == 200


@pytest.mark.gen_test
async def test_through_nginx_a_refusal_that_turns_into_a_yes_is_no_empty_200_with_the_identity(edge, upstream):
    nginx, rg, client = edge
    # the first answer 503 (the key store), the second would open: the client must not get that 200
    r = await client.request("GET", "/read/x", headers={"X-Test-Key": "flaky"})
    data = assert_error(r, 503, "unavailable")
    assert r.headers["Retry-After"] == "1", data
    for name in IDENTITY:
        assert name not in r.headers, name
    assert upstream.seen == []
    # and asked again, it is let through (the flaky key's first answer is its refusal again)
    r = await client.request("GET", "/read/x", headers={"X-Test-Key": "flaky"})
    assert r.code == 503 and upstream.seen == []
    # an ordinary refusal still carries the gateway's JSON, and no identity
    login = await client.register()
    r = await client.request("GET", "/keys-only/x", token=login["token"])
    assert_error(r, 403, "forbidden")
    for name in IDENTITY:
        assert name not in r.headers, name
    # a client's own mark changes nothing: nginx asks the first question unmarked
    r = await client.request("GET", "/api/x", token=login["token"], headers=REASK)
    assert r.code == 200 and values(upstream.last, "X-Gateway-Verify") == []


@pytest.mark.gen_test
async def test_an_upgrade_other_than_websocket_is_refused(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    for value in ("h2c", "websocket, h2c", "TLS/1.2"):
        for uri in ("/api/x", "/public/x"):
            r = await rg.client.request("GET", VERIFY, token=token, headers={**original("GET", uri), "Upgrade": value})
            assert_error(r, 400, "invalid_request", contains="Upgrade")
            assert "X-User-Id" not in r.headers


@pytest.mark.gen_test
async def test_through_nginx_h2c_never_reaches_the_upstream(edge, upstream):
    nginx, rg, client = edge
    token = (await client.register())["token"]
    h2c = {"Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA", "Connection": "Upgrade, HTTP2-Settings"}
    for path, kw in (("/api/x", {"token": token}), ("/public/x", {})):
        r = await client.request("GET", path, headers=h2c, **kw)
        assert_error(r, 400, "invalid_request", contains="Upgrade")
    assert upstream.seen == []
    # nginx itself passes on only a WebSocket upgrade (and never HTTP2-Settings)
    http = conf_directives("location / {")
    assert ("proxy_set_header", "Upgrade", "$upstream_upgrade") in http
    assert ("proxy_set_header", "HTTP2-Settings", '""') in http
    maps = CONF.read_text()
    assert '"~*^websocket$"' in maps and "map $upstream_upgrade $upstream_connection" in maps


@pytest.mark.gen_test
async def test_through_nginx_the_session_cookie_three_times_is_refused(edge, upstream):
    nginx, rg, client = edge
    t = (await client.register())["token"]
    for cookie in (f"gw_session={t}; gw_session={t}; gw_session={t}",
                   f"a=1; gw_session=x; gw_session=y; b=2; gw_session={t}",
                   f"gw_session={t}; gw_session ={t}", f"gw_session\t={t}"):
        r = await client.request("GET", "/api/x", headers={"Cookie": cookie})
        assert_error(r, 400, "invalid_request", contains="gw_session")
        r = await client.request("GET", "/public/x", headers={"Cookie": cookie})
        assert_error(r, 400, "invalid_request", contains="gw_session")
    assert upstream.seen == []
    r = await client.request("GET", "/api/x", headers={"Cookie": f"a=1; gw_session={t};  gw_session={t}; b=2"})
    assert r.code == 200
    assert values(upstream.last, "Cookie") == ["a=1; b=2"] and t not in repr(upstream.last.headers)


@pytest.mark.gen_test
async def test_through_nginx_a_preflight_gets_the_gateways_answer_and_never_reaches_the_upstream(edge, upstream):
    nginx, rg, client = edge
    ask = {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"}
    r = await client.request("OPTIONS", "/api/x", headers={**ask, "Origin": ORIGIN})
    direct = await rg.client.request("OPTIONS", "/api/x", headers={**ask, "Origin": ORIGIN})
    assert r.code == direct.code == 204, (r.code, r.body)
    for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Allow-Methods",
                 "Access-Control-Allow-Headers", "Access-Control-Max-Age"):
        assert r.headers.get(name) == direct.headers.get(name) is not None, name
    r = await client.request("OPTIONS", "/api/x", headers={**ask, "Origin": "https://evil.example"})
    assert_error(r, 403, "forbidden")
    assert "Access-Control-Allow-Origin" not in r.headers
    assert upstream.seen == []
    # on a public route the preflight is the upstream's to answer, as through the gateway's proxy
    r = await client.request("OPTIONS", "/public/x", headers={**ask, "Origin": ORIGIN})
    assert r.code == 200 and upstream.last.method == "OPTIONS"


@pytest.mark.gen_test
async def test_through_nginx_forged_client_facts_never_reach_the_upstream(edge, upstream):
    nginx, rg, client = edge
    token = (await client.register())["token"]
    forged = {name: "6.6.6.6" for name in sorted(policy.CLIENT_FACTS) if name != "x-original-uri"}
    forged.update({f"X-Forwarded-{n}": "forged" for n in ("Port", "Prefix", "Server", "Ssl", "Scheme", "Protocol",
                                                          "Path", "Client-Cert", "Uri", "Method")})
    for path, kw in (("/api/x", {"token": token}), ("/public/x", {})):
        r = await client.request("GET", path, headers=forged, **kw)
        assert r.code == 200, (r.code, r.body)
        for name in forged:
            assert values(upstream.last, name) == [], (path, name)
        assert values(upstream.last, "X-Forwarded-For") == ["127.0.0.1"]
        assert values(upstream.last, "X-Forwarded-Host") == [f"127.0.0.1:{nginx.port}"]


def conf_block(opening: str, text: str | None = None) -> str:
    """The body of the shipped conf's block that begins with ``opening``
    (``location / {``), comments removed."""
    text = "\n".join(line.split("#", 1)[0] for line in (text or CONF.read_text()).splitlines())
    start = text.index(opening) + len(opening)
    depth, i = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start:i - 1]


def conf_directives(opening: str) -> list[tuple[str, ...]]:
    """The directives of that block itself (not of blocks within), as words."""
    body, out, depth, words = conf_block(opening), [], 0, ""
    for char in body:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            words = ""
        elif char == ";" and depth == 0:
            out.append(tuple(words.split()))
            words = ""
        elif depth == 0:
            words += char
    return out


def test_the_conf_clears_every_client_fact_the_gateways_proxy_drops():
    cleared = {d[1].lower(): d[2] for d in conf_directives("location / {") if d[0] == "proxy_set_header"}
    ours = {"x-forwarded-for": "$remote_addr", "x-forwarded-proto": "$scheme", "x-forwarded-host": "$http_host"}
    for name in sorted(policy.CLIENT_FACTS) + ["x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server",
                                               "x-forwarded-ssl", "x-forwarded-scheme", "x-forwarded-protocol",
                                               "x-forwarded-path", "x-forwarded-client-cert", "x-forwarded-uri",
                                               "x-forwarded-method"]:
        assert cleared.get(name) == '""', f"conf/nginx-forward-auth.example.conf does not clear {name} upstream"
    for name, value in ours.items():
        assert cleared[name] == value
    for name in (*IDENTITY, "X-Gateway-Verify", "X-API-Key"):
        assert name.lower() in cleared, name


def test_the_conf_asks_both_questions_alike_and_hides_the_identity_of_a_refusal():
    first = [d for d in conf_directives("location = /_gateway_verify {") if d[0] == "proxy_set_header"]
    again = [d for d in conf_directives("location @gateway_refused {") if d[0] == "proxy_set_header"]
    mark = ("proxy_set_header", "X-Gateway-Verify", "refusal")
    assert mark in again and ("proxy_set_header", "X-Gateway-Verify", '""') in first
    assert [d for d in first if d[1] != "X-Gateway-Verify"] == [d for d in again if d[1] != "X-Gateway-Verify"]
    hidden = {d[1].lower() for d in conf_directives("location @gateway_refused {") if d[0] == "proxy_hide_header"}
    set_upstream = {d[1].lower() for d in conf_directives("location / {") if d[0] == "proxy_set_header" and
                    d[2].startswith("$gw_")}
    assert set_upstream >= {n.lower() for n in IDENTITY}
    assert hidden >= set_upstream - {"x-request-id"}, set_upstream - hidden
    # no location but the second question marks a request
    for opening in ("location /auth/ {", "location / {"):
        assert ("proxy_set_header", "X-Gateway-Verify", '""') in conf_directives(opening), opening


@pytest.mark.gen_test
async def test_forward_auth_is_off_unless_switched_on(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path, server={"trusted_proxies": ["127.0.0.1"]}))
    token = (await rg.client.register())["token"]
    r = await rg.client.request("GET", VERIFY, token=token, headers=original("GET", "/api/x"))
    unknown = await rg.client.request("GET", "/auth/no-such-endpoint")
    assert_error(r, 404, "not_found")
    assert body(r)["message"] == body(unknown)["message"].replace("/auth/no-such-endpoint", VERIFY)
    assert "X-User-Id" not in r.headers


@pytest.mark.gen_test
async def test_an_auth_prefix_of_slash_leaves_no_route_to_verify(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path, routes=[],
                                        server={"trusted_proxies": ["127.0.0.1"], "forward_auth": True,
                                                "auth_prefix": "/"}))
    r = await rg.client.request("GET", "/verify", headers=original("GET", "/api/x"))
    assert_error(r, 404, "not_found", contains="/api/x")


# == Envoy ext_authz (HTTP service) ========================================================
#
# Envoy's HTTP ext_authz names the original request by the authorization request
# itself: the original method, and the original path and query appended to the
# configured path_prefix (here /auth/verify/envoy), with Content-Length: 0 and only
# the headers its allowed_headers let through (Authorization always).  It lets the
# request through on 200 only and relays any other answer to the client as it is.
# These tests send exactly such requests to a real gateway.

ENVOY = "/auth/verify/envoy"


async def envoy(rg: RunningGateway, method: str, uri: str, **kw: Any) -> Any:
    """The authorization request Envoy sends for ``method uri`` (no body, Content-Length: 0)."""
    return await rg.client.request(method, ENVOY + uri, body=b"" if method != "HEAD" else None, **kw)


@pytest.mark.gen_test
async def test_envoy_an_allowed_request_is_200_with_the_identity_headers(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    login = await rg.client.register()
    token = login["token"]
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        r = await envoy(rg, method, "/api/orders?x=1", token=token)
        assert r.code == 200 and r.body == b"", (method, r.code, r.body)
        assert r.headers["X-User-Id"] == login["user"]["id"], method
        assert r.headers["X-Session-Id"] == login["session"]["id"]
        assert r.headers["X-Auth-Provider"] == "password"
        assert r.headers["X-Route-Prefix"] == "/api/"  # what the proxy would add (the test plugin's)
        assert "X-Auth-Scopes" not in r.headers and "X-Gateway-Assertion" not in r.headers
    # the session cookie, as Envoy passes it when allowed_headers lists cookie
    r = await envoy(rg, "GET", "/api/orders", headers={"Cookie": f"theme=dark; gw_session={token}"})
    assert r.code == 200 and r.headers["X-User-Id"] == login["user"]["id"]
    r = await envoy(rg, "GET", "/signed/x", token=token)
    assert r.code == 200 and r.headers["X-Gateway-Assertion"].count(".") == 2
    assert upstream.seen == []  # nothing is fetched upstream


@pytest.mark.gen_test
async def test_envoy_no_session_is_the_401_the_client_gets(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    r = await envoy(rg, "GET", "/api/x")
    assert_error(r, 401, "unauthenticated", fields={"reason": "missing"})
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    for name in IDENTITY:
        assert name not in r.headers, name
    # a dead cookie: cleared, with the challenge, as the proxy answers
    token = (await rg.client.register())["token"]
    assert (await rg.client.request("POST", "/auth/logout", token=token)).code == 204
    r = await envoy(rg, "POST", "/api/x", headers={"Cookie": f"gw_session={token}"})
    assert_error(r, 401, "unauthenticated", fields={"reason": "revoked"})
    assert cookie_value(r) in ("", '""') and "expires=" in (cookie_header(r) or "").lower()


@pytest.mark.gen_test
async def test_envoy_the_original_path_picks_the_route_whose_rules_apply(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    r = await envoy(rg, "GET", "/read/x", headers=KEY)
    assert r.code == 200 and r.headers["X-Auth-Scopes"] == "read write" and r.headers["X-User-Id"] == "u_key"
    assert_error(await envoy(rg, "GET", "/admin/x", headers=KEY), 403, "forbidden", contains="admin")
    assert_error(await envoy(rg, "GET", "/keys-only/x", token=token), 403, "forbidden")
    assert (await envoy(rg, "GET", "/keys-only/x", headers=KEY)).code == 200
    for uri in ("/opt/x", "/public/x?page=2"):
        r = await envoy(rg, "GET", uri)
        assert r.code == 200 and "X-User-Id" not in r.headers, uri
    assert_error(await envoy(rg, "GET", "/nowhere/x", token=token), 404, "not_found", contains="/nowhere/x")
    # the gateway's own endpoints are no route to judge
    assert_error(await envoy(rg, "GET", "/auth/session", token=token), 400, "invalid_request", contains="/auth/")


@pytest.mark.gen_test
async def test_envoy_a_credential_in_the_original_query_is_refused_as_the_proxy_refuses_it(
        make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    r = await envoy(rg, "GET", f"/public/x?t={token}")
    direct = await rg.client.request("GET", f"/public/x?t={token}")
    assert_error(r, 400, "invalid_request", contains="query")
    assert body(r) == body(direct)
    assert token not in r.body.decode()


#: original paths the proxy refuses (400): dot segments, plain or encoded, an encoded slash after "..", control characters
REFUSED = ("/public/../api/x", "/public/%2e%2e/api/x", "/public/..%2fapi/x", "/public/..%2Fapi/x", "/public/x%00",
           "/%61pi/x")


@pytest.mark.parametrize("uri", [*REFUSED, "/public/%2Fapi/x",
                                 "/public/%2fapi/x", "/API/x", "/public//api/x", "/public;x/y", "/opt/x"])
@pytest.mark.gen_test
async def test_envoy_an_ambiguous_path_is_refused_as_the_proxy_refuses_it(make_gateway, upstream, tmp_path, uri):
    rg = await start(make_gateway, upstream, tmp_path)
    r = await envoy(rg, "GET", uri)
    direct = await rg.client.request("GET", uri)  # the proxy's own answer for that path
    assert r.code == direct.code, (uri, direct.code, r.code)
    if direct.code != 200:
        assert body(r) == body(direct), uri
    if uri in REFUSED:  # read from the raw target: a decoded "/" or "." would have picked /api/
        assert_error(r, 400, "invalid_request", contains="path")


@pytest.mark.gen_test
async def test_envoy_csrf_applies_to_the_unsafe_original_method(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    cookie = {"Cookie": f"gw_session={token}"}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert_error(await envoy(rg, method, "/api/x", headers={**cookie, "Origin": "https://evil.example"}), 403, "csrf")
        assert_error(await envoy(rg, method, "/api/x", headers=cookie), 403, "csrf")
        assert (await envoy(rg, method, "/api/x", headers={**cookie, "X-Requested-With": "fetch"})).code == 200
        assert (await envoy(rg, method, "/api/x", token=token,
                            headers={"Origin": "https://evil.example"})).code == 200  # Bearer needs no Origin
    # the gateway's own origin: the Host Envoy passes is the client's
    r = await envoy(rg, "POST", "/api/x", headers={**cookie, "Origin": "https://app.example.com",
                                                  "Host": "app.example.com", "X-Forwarded-Proto": "https"})
    assert r.code == 200
    assert (await envoy(rg, "GET", "/api/x", headers={**cookie, "Origin": "https://evil.example"})).code == 200


@pytest.mark.gen_test
async def test_envoy_a_preflight_gets_the_proxys_own_answer_never_a_200(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, sessions={"allowed_origins": [ORIGIN]})
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type, x-thing"}
    for extra in ({}, REASK):  # the refusal marker changes nothing here
        r = await envoy(rg, "OPTIONS", "/api/x", headers={**ask, **extra})
        direct = await rg.client.request("OPTIONS", "/api/x", headers=ask)
        assert r.code == direct.code == 204  # not 200: Envoy relays it and never forwards the OPTIONS
        cors = [n for n in direct.headers if n.lower().startswith("access-control-")]
        assert {"Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
                "Access-Control-Max-Age"} <= set(cors)
        assert {n: r.headers.get(n) for n in [*cors, "Vary"]} == {n: direct.headers.get(n) for n in [*cors, "Vary"]}
        for name in IDENTITY:
            assert name not in r.headers, name
    r = await envoy(rg, "OPTIONS", "/api/x", headers={**ask, "Origin": "https://evil.example"})
    assert_error(r, 403, "forbidden")
    assert "Access-Control-Allow-Origin" not in r.headers
    assert upstream.seen == []
    # a public route's preflight is the upstream's to answer, as through the proxy
    assert (await envoy(rg, "OPTIONS", "/public/x", headers=ask)).code == 200


@pytest.mark.gen_test
async def test_envoy_the_refusal_marker_means_nothing(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    login = await rg.client.register()
    for method in ("GET", "POST"):
        r = await envoy(rg, method, "/api/x", token=login["token"], headers=REASK)
        assert r.code == 200 and r.headers["X-User-Id"] == login["user"]["id"], (r.code, r.body)
    assert (await envoy(rg, "GET", "/public/x", headers=REASK)).code == 200
    assert_error(await envoy(rg, "GET", "/api/x", headers=REASK), 401, "unauthenticated")


@pytest.mark.gen_test
async def test_envoy_an_untrusted_peer_is_refused_whatever_it_asks(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, trusted=["10.0.0.0/8"])
    token = (await rg.client.register())["token"]
    for method, uri in (("GET", "/api/x"), ("POST", "/public/x"), ("GET", "/nowhere")):
        r = await envoy(rg, method, uri, token=token)
        assert_error(r, 403, "forbidden", contains="server.trusted_proxies")
        assert "X-User-Id" not in r.headers


@pytest.mark.gen_test
async def test_envoy_forward_auth_off_is_an_unknown_endpoint(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path, server={"trusted_proxies": ["127.0.0.1"]}))
    token = (await rg.client.register())["token"]
    for method in ("GET", "POST", "OPTIONS"):
        r = await envoy(rg, method, "/api/x", token=token)
        assert_error(r, 404, "not_found", contains=ENVOY)
        assert "X-User-Id" not in r.headers
    assert upstream.seen == []


@pytest.mark.gen_test
async def test_envoy_a_body_is_refused_unread(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]
    r = await rg.client.request("POST", ENVOY + "/api/x", token=token, body=b'{"a": 1}')
    assert_error(r, 400, "invalid_request", contains="with_request_body")
    assert "X-User-Id" not in r.headers

    async def chunks(write: Any) -> None:
        await write(b"x" * 1000)

    r = await rg.client.http.fetch(rg.client.base_url + ENVOY + "/api/x", method="PUT", body_producer=chunks,
                                   headers={"Authorization": f"Bearer {token}"}, raise_error=False)  # chunked
    assert_error(r, 400, "invalid_request", contains="with_request_body")
    assert (await envoy(rg, "PUT", "/api/x", token=token)).code == 200  # Content-Length: 0 is no body


@pytest.mark.gen_test
async def test_envoy_upgrades_are_judged_as_handshakes(make_gateway, upstream, tmp_path):
    ws_routes = [{"prefix": "/ws/", "upstream": upstream.url, "websocket": True},
                 {"prefix": "/api/", "upstream": upstream.url}]
    rg = await make_gateway(base_config(upstream.url, tmp_path, routes=ws_routes,
                                        server={"trusted_proxies": ["127.0.0.1"], "forward_auth": True}))
    login = await rg.client.register()
    token = login["token"]
    ws = {"Upgrade": "websocket"}
    r = await envoy(rg, "GET", "/ws/chat", token=token, headers=ws)
    assert r.code == 200 and r.headers["X-User-Id"] == login["user"]["id"]
    assert_error(await envoy(rg, "GET", "/api/chat", token=token, headers=ws), 400, "invalid_request",
                 contains="WebSocket")
    assert_error(await envoy(rg, "POST", "/ws/chat", token=token, headers=ws), 400, "invalid_request", contains="GET")
    assert_error(await envoy(rg, "GET", "/ws/chat", headers={**ws, "Cookie": f"gw_session={token}",
                                                             "Origin": "https://evil.example"}), 403, "csrf")
    assert_error(await envoy(rg, "GET", "/ws/chat", token=token, headers={"Upgrade": "h2c"}), 400,
                 "invalid_request", contains="Upgrade")
    assert_error(await envoy(rg, "GET", "/ws/chat", headers={"Cookie": f"gw_session={token}; gw_session={token}; "
                                                                       f"gw_session={token}"}),
                 400, "invalid_request", contains="gw_session")


@pytest.mark.gen_test
async def test_envoy_rate_limits_and_metrics_are_the_routes(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    token = (await rg.client.register())["token"]

    def answered(method: str, status: str) -> float:
        return REGISTRY.get_sample_value("gateway_http_requests_total",
                                         {"route": "/limited/", "method": method, "status": status}) or 0.0

    ok_before, limited_before = answered("POST", "200"), answered("GET", "429")
    for left in (1, 0):
        r = await envoy(rg, "POST", "/limited/x", token=token)
        assert r.code == 200 and f"r={left}" in r.headers["RateLimit"]
        assert r.headers["RateLimit-Policy"] == '"lim";q=2;w=60'
    r = await envoy(rg, "GET", "/limited/x", token=token)
    data = assert_error(r, 429, "rate_limited")
    assert data["limit"] == "lim" and r.headers["Retry-After"] == str(data["retry_after"])
    # one count, whichever way a request comes
    assert_error(await rg.client.request("GET", VERIFY, token=token, headers=original("GET", "/limited/x")),
                 429, "rate_limited")
    assert answered("POST", "200") - ok_before == 2 and answered("GET", "429") - limited_before == 2


@pytest.mark.gen_test
async def test_envoy_path_is_not_in_the_openapi_document_which_stays_valid(make_gateway, upstream, tmp_path):
    from openapi_spec_validator import validate

    rg = await start(make_gateway, upstream, tmp_path)
    r = await rg.client.request("GET", "/auth/openapi.json")
    assert r.code == 200
    doc = body(r)
    validate(doc)
    assert "get" in doc["paths"]["/auth/verify"]
    assert not [p for p in doc["paths"] if p.startswith(ENVOY)]
