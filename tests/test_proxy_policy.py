"""The proxy's policy as pure functions: no server, no I/O."""

from __future__ import annotations

import base64

import pytest

from gateway.errors import GatewayError
from gateway.proxy import policy
from gateway.routing import Route, RouteTable


def route(prefix: str, auth: str = "required") -> Route:
    return Route(prefix=prefix, upstream="http://127.0.0.1:9", auth=auth, strip_prefix=False,
                 connect_timeout=1.0, request_timeout=1.0)


PUB, SECRET, API = route("/pub/", "public"), route("/pub/secret/"), route("/api/")
TABLE = RouteTable([PUB, SECRET, API])


@pytest.mark.parametrize("path, expected", [
    ("/pub/x", PUB), ("/pub/secret/x", SECRET), ("/api/v1/orders", API), ("/nowhere", None),
    ("/pub/app.js", PUB), ("/pub/a/.well-known", PUB),
])
def test_route_for_plain_paths(path, expected):
    assert policy.route_for(TABLE, path) is expected


@pytest.mark.parametrize("path", [
    "/pub/%73ecret/x",          # percent-encoded letter
    "/pub//secret/x",            # doubled slash
    "/pub\\secret/x",            # backslash as a separator
    "/pub/;x/secret/x",          # ;params dropped
    "/pub/SECRET/x",             # letter case
    "/pub/%C5%BFecret/x",        # LATIN SMALL LETTER LONG S: casefold() reads it as s
    "/pub/%EF%BD%93ecret/x",     # FULLWIDTH LATIN SMALL LETTER S: NFKC reads it as s
])
def test_route_for_refuses_paths_an_upstream_could_read_as_another_route(path):
    with pytest.raises(GatewayError) as info:
        policy.route_for(TABLE, path)
    assert info.value.code == "invalid_request" and "ambiguous" in info.value.message


@pytest.mark.parametrize("path", ["/pub/../api/x", "/pub/%2e%2e/api/x", "/pub/..;/api/x", "/pub/x%00", "/pub/x%23y"])
def test_route_for_refuses_dot_segments_and_control_characters(path):
    with pytest.raises(GatewayError) as info:
        policy.route_for(TABLE, path)
    assert info.value.code == "invalid_request"


TOKEN = "gws_" + "A" * 43
KEY = "gwk_0123456789abcdef_" + "B" * 43
#: the session token's prefix and an API-key provider's, as a gateway with it loaded knows them
CREDENTIALS = policy.Credentials(("gws_", "gwk_"), headers=["X-API-Key"])


@pytest.mark.parametrize("headers, query, where", [
    ([], f"access_token={TOKEN}", "query string"),
    ([], f"api_key={KEY}", "query string"),
    ([], "t=" + TOKEN.replace("_", "%5F"), "query string"),
    ([("X-Auth-Token", TOKEN)], "", "X-Auth-Token"),
    ([("Cookie", f"other=1; token={TOKEN}")], "", "cookie 'token'"),
    ([("Authorization", "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode())], "", "Basic"),
    ([("Authorization", f"Token {TOKEN}")], "", "Authorization"),
    ([("Referer", f"https://app.example/cb?token={TOKEN}")], "", "Referer"),
])
def test_stray_credentials_are_found_and_named(headers, query, where):
    found = policy.stray_credential(headers, query, "gw_session", CREDENTIALS)
    assert found is not None and where in found


@pytest.mark.parametrize("headers, query", [
    ([("Authorization", f"Bearer {TOKEN}")], ""),
    ([("Authorization", f"Bearer\t{KEY}")], ""),
    ([("X-API-Key", KEY)], ""),
    ([("Cookie", f"gw_session={TOKEN}; theme=dark")], ""),
    ([("X-Note", "gws_ is our token prefix")], "q=gws_short"),
    ([("Authorization", "Basic dXNlcjpwYXNz")], ""),
])
def test_credentials_where_the_gateway_reads_them_or_lookalikes_pass(headers, query):
    assert policy.stray_credential(headers, query, "gw_session", CREDENTIALS) is None


def headers_for(incoming, *, trusted=False, strip=frozenset(), identity=(), websocket=False):
    return policy.upstream_request_headers(
        incoming, strip=set(strip), cookie_name="gw_session", peer_trusted=trusted,
        prior_forwarded_for="10.0.0.1" if trusted else "", peer="127.0.0.1", scheme="https",
        host="gw.example", request_id="rid-1", upstream_host="up:9", identity=identity, websocket=websocket,
        credentials=CREDENTIALS)


def test_request_headers_drop_forged_identity_hop_by_hop_and_the_gateway_credential():
    out = headers_for([
        ("X-User-Id", "admin"), ("x_user_id", "admin"), ("X-AUTH-SCOPES", "all"), ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "hop"), ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"), ("Host", "evil"),
        ("Expect", "100-continue"), ("Authorization", f"Bearer {TOKEN}"), ("X-API-Key", KEY),
        ("Cookie", f"a=1; gw_session={TOKEN}; b=2"), ("X-Custom", "kept"), ("Content-Length", "5"),
        ("X-Forwarded-For", "6.6.6.6"), ("X-Real-IP", "6.6.6.6"), ("X-Strip-Me", "cred"),
    ], strip={"x-strip-me"}, identity=policy.identity_headers("u_1", "password", "s_1", None))
    names = [n.lower() for n, _ in out]
    assert dict((n.lower(), v) for n, v in out)["x-user-id"] == "u_1"
    assert names.count("x-user-id") == 1 and "x-auth-scopes" not in names
    for gone in ("connection", "x-secret", "keep-alive", "upgrade", "expect", "authorization", "x-api-key",
                 "x-real-ip", "x-strip-me"):
        assert gone not in names, gone
    values = dict((n.lower(), v) for n, v in out)
    assert values["cookie"] == "a=1; b=2"
    assert values["x-custom"] == "kept" and values["content-length"] == "5"
    assert values["host"] == "up:9" and values["x-forwarded-for"] == "127.0.0.1"
    assert values["x-forwarded-proto"] == "https" and values["x-request-id"] == "rid-1"
    assert TOKEN not in repr(out) and KEY not in repr(out)


def test_client_facts_pass_from_a_trusted_proxy_and_the_chain_grows():
    out = dict((n.lower(), v) for n, v in headers_for([("X-Real-IP", "1.2.3.4")], trusted=True))
    assert out["x-real-ip"] == "1.2.3.4"
    assert out["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


def test_websocket_handshake_headers_are_made_anew_upstream():
    out = headers_for([("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Version", "13"),
                       ("Sec-WebSocket-Protocol", "chat"), ("X-App", "1")], websocket=True)
    names = {n.lower() for n, _ in out}
    assert not {n for n in names if n.startswith("sec-websocket")} and "x-app" in names


def test_response_headers():
    out = policy.upstream_response_headers(200, [
        ("Set-Cookie", "gw_session=fixed; Path=/"), ("Set-Cookie", "=gw_session=x"), ("Set-Cookie", "theme=dark"),
        ("X-Request-Id", "theirs"), ("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "5"),
        ("Content-Length", "5"), ("ETag", '"v1"'),
    ], "gw_session")
    assert out == [("Set-Cookie", "theme=dark"), ("Content-Length", "5"), ("ETag", '"v1"')]
    assert policy.upstream_response_headers(204, [("Content-Length", "0")], "gw_session") == []
    assert policy.upstream_response_headers(200, [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
                                            "gw_session") == []
