"""Expiry a client can act on: every 401 ``unauthenticated`` says why
(``reason``), with an RFC 6750 ``WWW-Authenticate`` challenge; a dead cookie
is cleared wherever it caused a 401; cross-origin callers can read the
headers that matter; a 429 carries ``retry_after`` in its body.

Everything runs against a real gateway (and a real redis-server where the
store matters) over HTTP.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.testing import assert_error, base_config, body, cookie_header, cookie_value
from gateway.testing.raw import connect, read_response, request_head

PASSWORD = "correct horse"
ORIGIN = "https://app.example"
CHALLENGE = 'Bearer realm="gateway"'


@pytest.fixture
def start(make_gateway, upstream, tmp_path):
    """``await start(**sections)`` -> a running gateway with overrides on the test config."""

    async def _start(**sections: Any):
        return await make_gateway(base_config(upstream.url, tmp_path, **sections))

    return _start


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"gw_session={token}", "X-Requested-With": "test"}


def refused(r, reason: str) -> dict[str, Any]:
    """A 401 ``unauthenticated`` for ``reason``, its challenge in the RFC 6750 form."""
    data = assert_error(r, 401, "unauthenticated", fields={"reason": reason})
    challenge = r.headers.get("WWW-Authenticate")
    if reason == "missing":
        assert challenge == CHALLENGE, challenge
    else:
        assert challenge is not None and challenge.startswith(CHALLENGE + ", error=\"invalid_token\", "), challenge
        description = challenge.split('error_description="', 1)[1]
        assert description.endswith('"') and description[:-1] and '"' not in description[:-1], challenge
    return data


def cleared(r) -> bool:
    """Does ``r`` remove the session cookie?"""
    return clears_cookie(r.headers.get_list("Set-Cookie"))


def clears_cookie(set_cookies: list[str]) -> bool:
    """Do these ``Set-Cookie`` values remove the session cookie (and set no other)?"""
    ours = [v for v in set_cookies if v.startswith("gw_session=")]
    if len(ours) != 1:
        return False
    value, *parts = ours[0].split(";")
    attrs = {p.strip().partition("=")[0].lower(): p.strip().partition("=")[2] for p in parts}
    return value.split("=", 1)[1] in ("", '""') and (attrs.get("max-age") == "0" or "expires" in attrs)


async def session_of(gw, token: str):
    return await gw.client.request("GET", "/auth/session", token=token)


# ---------------------------------------------------------------------------
# the reasons
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_no_credential_is_missing_with_a_bare_challenge(start):
    gw = await start()
    refused(await gw.client.request("GET", "/auth/session"), "missing")
    refused(await gw.client.request("GET", "/api/thing"), "missing")
    refused(await gw.client.request("POST", "/auth/refresh"), "missing")


@pytest.mark.gen_test
async def test_a_token_never_issued_is_invalid(start):
    gw = await start()
    unknown = "gws_" + "A" * 43
    data = refused(await session_of(gw, unknown), "invalid")
    assert "log in" in data["message"]
    refused(await gw.client.request("GET", "/api/thing", token=unknown), "invalid")
    refused(await gw.client.request("GET", "/auth/session", headers={"Authorization": "Bearer nonsense"}), "invalid")


@pytest.mark.gen_test
async def test_an_idle_session_is_expired(start, session_section):
    gw = await start(sessions={**session_section, "idle_timeout": "1s", "touch_interval": 0})
    reg = await gw.client.register()
    await asyncio.sleep(1.3)
    refused(await session_of(gw, reg["token"]), "expired")
    r = await gw.client.request("GET", "/api/thing", token=reg["token"])
    refused(r, "expired")


@pytest.mark.gen_test
async def test_a_session_past_its_absolute_deadline_is_expired(start, session_section):
    gw = await start(sessions={**session_section, "idle_timeout": "10s", "absolute_timeout": "1s",
                               "touch_interval": 0})
    reg = await gw.client.register()
    assert (await session_of(gw, reg["token"])).code == 200
    await asyncio.sleep(1.3)
    refused(await session_of(gw, reg["token"]), "expired")


@pytest.mark.gen_test
async def test_every_way_of_ending_a_session_is_revoked(start, session_section):
    gw = await start(sessions={**session_section, "max_per_user": 3})
    # logout
    first = await gw.client.register()
    assert (await gw.client.request("POST", "/auth/logout", token=first["token"])).code == 204
    data = refused(await session_of(gw, first["token"]), "revoked")
    assert "log in again" in data["message"]
    # revoked from the listing
    a, b = await gw.client.login(), await gw.client.login()
    r = await gw.client.request("DELETE", f"/auth/sessions/{b['session']['id']}", token=a["token"])
    assert r.code == 204
    refused(await session_of(gw, b["token"]), "revoked")
    # max_per_user: the oldest of four is evicted
    c, d, e = await gw.client.login(), await gw.client.login(), await gw.client.login()
    refused(await session_of(gw, a["token"]), "revoked")
    # a password change ends every other session
    r = await gw.client.request("POST", "/auth/password/change", token=e["token"],
                                json_body={"old_password": PASSWORD, "new_password": "another horse"})
    assert r.code == 204, r.body
    refused(await session_of(gw, c["token"]), "revoked")
    assert (await session_of(gw, e["token"])).code == 200
    # logout everywhere
    assert (await gw.client.request("POST", "/auth/logout-all", token=e["token"])).code == 204
    refused(await session_of(gw, e["token"]), "revoked")
    refused(await gw.client.request("GET", "/api/thing", token=d["token"]), "revoked")
    # by an operator (through the plugin API)
    f = await gw.client.login(password="another horse")
    await gw.gateway.sessions.revoke_user(f["user"]["id"], "operator")
    refused(await session_of(gw, f["token"]), "revoked")


@pytest.mark.gen_test
async def test_a_replayed_refresh_token_revokes_the_session(start, session_section):
    gw = await start(sessions={**session_section, "rotation_grace": 0, "refresh_race_window": 0})
    reg = await gw.client.register()
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert r.code == 200, r.body
    newer = body(r)["token"]
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])   # the replay
    refused(r, "revoked")
    refused(await session_of(gw, newer), "revoked")
    refused(await session_of(gw, reg["token"]), "revoked")


@pytest.mark.gen_test
async def test_a_token_replaced_by_refresh_is_superseded(start, session_section):
    gw = await start(sessions={**session_section, "rotation_grace": "1s"})
    reg = await gw.client.register()
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    newer = body(r)["token"]
    # in its grace: good for proxying and GET /session, superseded for managing sessions
    assert (await session_of(gw, reg["token"])).code == 200
    data = refused(await gw.client.request("GET", "/auth/sessions", token=reg["token"]), "superseded")
    assert "newer token" in data["message"]
    await asyncio.sleep(1.3)
    refused(await session_of(gw, reg["token"]), "superseded")
    refused(await gw.client.request("GET", "/api/thing", token=reg["token"]), "superseded")
    assert (await session_of(gw, newer)).code == 200


@pytest.mark.gen_test
async def test_past_the_retention_an_ended_token_is_invalid(start, session_section):
    gw = await start(sessions={**session_section, "ended_retention": "1s"})
    reg = await gw.client.register()
    await gw.client.request("POST", "/auth/logout", token=reg["token"])
    refused(await session_of(gw, reg["token"]), "revoked")
    await asyncio.sleep(1.3)
    refused(await session_of(gw, reg["token"]), "invalid")

    gw = await start(sessions={**session_section, "ended_retention": 0})
    reg = await gw.client.register("bob")
    await gw.client.request("POST", "/auth/logout", token=reg["token"])
    refused(await session_of(gw, reg["token"]), "invalid")


# ---------------------------------------------------------------------------
# the stale cookie
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_stale_cookie_is_cleared_on_proxied_routes(start, upstream):
    gw = await start()
    reg = await gw.client.register()
    await gw.client.request("POST", "/auth/logout", token=reg["token"])
    for path in ("/api/thing", "/opt/thing"):
        r = await gw.client.request("GET", path, headers=cookie(reg["token"]))
        refused(r, "revoked")
        assert cleared(r), (path, r.headers.get_list("Set-Cookie"))
    r = await gw.client.request("GET", "/auth/session", headers=cookie(reg["token"]))
    refused(r, "revoked")
    assert cleared(r)
    assert upstream.seen == []
    # a Bearer request has no cookie to clear
    r = await gw.client.request("GET", "/api/thing", token=reg["token"])
    refused(r, "revoked")
    assert cookie_header(r) is None


@pytest.mark.gen_test
async def test_a_stale_cookie_is_cleared_on_a_websocket_handshake(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, routes=[
        {"prefix": "/ws/", "upstream": upstream.url, "websocket": True}]))
    reg = await gw.client.register()
    await gw.client.request("POST", "/auth/logout", token=reg["token"])
    reader, writer = await connect(gw.port)
    try:
        writer.write(request_head("GET", "/ws/echo", [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Origin", "http://gateway.test"),
            ("Cookie", f"gw_session={reg['token']}")]))
        status, headers, data = await asyncio.wait_for(read_response(reader), 20)
    finally:
        writer.close()
    assert status == 401, data
    answer = json.loads(data)
    assert answer["error"] == "unauthenticated" and answer["reason"] == "revoked", answer
    assert "Sec-WebSocket-Accept" not in headers
    assert headers["WWW-Authenticate"].startswith(CHALLENGE + ', error="invalid_token"')
    assert clears_cookie(headers.get_list("Set-Cookie")), headers.get_list("Set-Cookie")
    assert upstream.seen == []


@pytest.mark.gen_test
async def test_a_cookie_in_its_grace_is_left_alone(start):
    """A tab that lost a refresh race holds a replaced cookie while the browser
    may hold the newer one already: clearing it would sign the user out."""
    gw = await start(sessions={"rotation_grace": "30s", "refresh_race_window": "30s"})
    reg = await gw.client.register()
    assert (await gw.client.request("POST", "/auth/refresh", token=reg["token"])).code == 200
    r = await gw.client.request("POST", "/auth/refresh", headers=cookie(reg["token"]))
    refused(r, "superseded")
    assert cookie_header(r) is None


# ---------------------------------------------------------------------------
# what cross-origin callers can read, and 429 bodies
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_cross_origin_callers_can_read_the_headers_that_matter(start):
    gw = await start(sessions={"allowed_origins": [ORIGIN]})
    for r in (await gw.client.request("GET", "/auth/session", headers={"Origin": ORIGIN}),
              await gw.client.request("GET", "/api/thing", headers={"Origin": ORIGIN})):
        assert r.code == 401
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"retry-after", "www-authenticate", "x-request-id"} <= exposed, exposed
    r = await gw.client.request("GET", "/auth/session", headers={"Origin": "https://elsewhere.example"})
    assert "Access-Control-Expose-Headers" not in r.headers


@pytest.mark.gen_test
async def test_a_429_carries_retry_after_in_its_body_too(start):
    gw = await start(providers={"password": {"max_failures": 2, "lockout_window": "60s"}})
    await gw.client.register()
    login = {"username": "alice", "password": "wrong password"}
    for _ in range(2):
        r = await gw.client.request("POST", "/auth/password/login", json_body=login)
        assert r.code == 401
    r = await gw.client.request("POST", "/auth/password/login", json_body=login)
    data = assert_error(r, 429, "locked_out", fields={"retry_after": int(r.headers["Retry-After"])})
    assert isinstance(data["retry_after"], int) and 1 <= data["retry_after"] <= 60
