"""The gateway's own HTTP contract under /auth, against a real running gateway.

Every test talks HTTP to a started gateway (and, where it matters, a real
redis-server) and asserts what a client or operator can observe: status
codes, JSON bodies, headers, Set-Cookie attributes, what the upstream
received and what the session store holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from gateway.testing import assert_error, base_config, body, cookie_header, cookie_value

PASSWORD = "correct horse"
TOKEN_RE = re.compile(r"^gws_([A-Za-z0-9_\-]+)$")
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
ALLOWED_ORIGIN = "https://app.example.com"
LOGIN = "/auth/password/login"


# ---------------------------------------------------------------------------
# local helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def start(make_gateway, upstream, tmp_path):
    """``await start(**sections)`` -> a running gateway with overrides on the test config."""

    async def _start(**sections: Any):
        return await make_gateway(base_config(upstream.url, tmp_path, **sections))

    return _start


@pytest.fixture
def sgw(start, session_section, io_loop):
    """The default test gateway, once with each session store."""
    return io_loop.run_sync(lambda: start(sessions=session_section))


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"gw_session={token}"}


def parse_iso(value: str) -> datetime:
    assert ISO_Z.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def cookie_attrs(header: str) -> dict[str, str]:
    """Set-Cookie attributes, names lower-cased (value '' for flags)."""
    out = {}
    for part in header.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        out[name.lower()] = value
    return out


async def whoami(gw, token: str) -> int:
    r = await gw.client.request("GET", "/auth/session", token=token)
    return r.code


# ---------------------------------------------------------------------------
# register / login
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_register_returns_201_with_token_session_user_and_cookie(gw):
    r = await gw.client.request("POST", "/auth/password/register",
                                json_body={"username": "alice", "password": PASSWORD})
    assert r.code == 201, r.body
    assert r.headers["Content-Type"].startswith("application/json")
    assert "no-store" in r.headers.get("Cache-Control", "")
    data = body(r)
    token = data["token"]
    m = TOKEN_RE.match(token)
    assert m and len(m.group(1)) >= 43, token
    assert data["token_type"] == "Bearer"
    assert set(data["session"]) >= {"id", "provider", "created_at", "expires_at", "absolute_expires_at"}
    assert data["session"]["provider"] == "password"
    assert set(data["user"]) == {"id", "profile"}
    assert data["user"]["profile"] == {"username": "alice"}
    assert data["user"]["id"]

    set_cookie = cookie_header(r)
    assert set_cookie is not None
    assert cookie_value(r) == token
    attrs = cookie_attrs(set_cookie)
    assert "httponly" in attrs
    assert "secure" not in attrs  # test config: cookie_secure = false
    assert attrs.get("samesite", "").lower() == "lax"
    assert attrs.get("path") == "/"

    # the token and the cookie both authenticate
    assert await whoami(gw, token) == 200
    r2 = await gw.client.request("GET", "/auth/session", headers=cookie(token))
    assert r2.code == 200
    assert body(r2)["user"]["id"] == data["user"]["id"]


@pytest.mark.gen_test
async def test_login_returns_200_with_same_shape(gw):
    reg = await gw.client.register()
    r = await gw.client.request("POST", "/auth/password/login", json_body={"username": "alice", "password": PASSWORD})
    assert r.code == 200, r.body
    data = body(r)
    assert data["token_type"] == "Bearer"
    assert TOKEN_RE.match(data["token"])
    assert data["user"] == {"id": reg["user"]["id"], "profile": {"username": "alice"}}
    assert data["session"]["provider"] == "password"
    assert cookie_value(r) == data["token"]


@pytest.mark.gen_test
async def test_cookie_attributes_follow_configuration(start):
    gw = await start(sessions={"cookie_secure": True, "cookie_samesite": "Strict", "cookie_name": "sid"})
    r = await gw.client.request("POST", "/auth/password/register", json_body={"username": "alice", "password": PASSWORD})
    assert r.code == 201, r.body
    assert cookie_header(r, "gw_session") is None
    attrs = cookie_attrs(cookie_header(r, "sid"))
    assert "secure" in attrs and "httponly" in attrs
    assert attrs["samesite"].lower() == "strict"
    assert attrs["path"] == "/"
    assert cookie_value(r, "sid") == body(r)["token"]


@pytest.mark.gen_test
async def test_every_login_creates_a_fresh_session(sgw):
    gw = sgw
    reg = await gw.client.register()
    first = await gw.client.login()
    # a login presenting an existing session (cookie and Bearer) still gets a new one
    second = await gw.client.login(headers=cookie(first["token"]), token=first["token"])
    ids = {reg["session"]["id"], first["session"]["id"], second["session"]["id"]}
    tokens = {reg["token"], first["token"], second["token"]}
    assert len(ids) == 3 and len(tokens) == 3
    for t in tokens:
        assert await whoami(gw, t) == 200
    r = await gw.client.request("GET", "/auth/sessions", token=second["token"])
    assert sorted(s["id"] for s in body(r)["sessions"]) == sorted(ids)


@pytest.mark.gen_test
async def test_username_taken_is_409_conflict(gw):
    await gw.client.register("alice")
    r = await gw.client.request("POST", "/auth/password/register", json_body={"username": "alice", "password": "other password"})
    assert_error(r, 409, "conflict")
    assert cookie_header(r) is None
    # usernames are casefolded: ALICE is alice
    r = await gw.client.request("POST", "/auth/password/register", json_body={"username": "ALICE", "password": "other password"})
    assert_error(r, 409, "conflict")
    # and the original password is unaffected
    await gw.client.login("alice")


@pytest.mark.gen_test
async def test_usernames_are_nfkc_casefolded(gw):
    reg = await gw.client.register("\uff21\uff4c\uff49\uff43\uff45")  # fullwidth "Ａｌｉｃｅ"
    assert reg["user"]["profile"] == {"username": "alice"}
    login = await gw.client.login("alice")
    assert login["user"]["id"] == reg["user"]["id"]
    login2 = await gw.client.login("ALICE")
    assert login2["user"]["id"] == reg["user"]["id"]


@pytest.mark.gen_test
async def test_registration_disabled_is_403(start):
    gw = await start(providers={"password": {"allow_registration": False}})
    r = await gw.client.request("POST", "/auth/password/register", json_body={"username": "alice", "password": PASSWORD})
    assert_error(r, 403, "forbidden")
    assert cookie_header(r) is None
    # nothing was created: logging in is a plain invalid_credentials
    r = await gw.client.request("POST", "/auth/password/login", json_body={"username": "alice", "password": PASSWORD})
    assert_error(r, 401, "invalid_credentials")


@pytest.mark.gen_test
async def test_password_length_limits(start):
    gw = await start(providers={"password": {"min_length": 10}})
    reg = "/auth/password/register"
    r = await gw.client.request("POST", reg, json_body={"username": "a", "password": "x" * 9})
    assert_error(r, 400, "invalid_request", contains="password")
    r = await gw.client.request("POST", reg, json_body={"username": "b", "password": "x" * 1025})
    assert_error(r, 400, "invalid_request", contains="password")
    r = await gw.client.request("POST", reg, json_body={"username": "c", "password": "x" * 5000})
    assert_error(r, 400, "invalid_request", contains="password")
    # the bounds themselves are accepted
    await gw.client.register("d", "x" * 10)
    await gw.client.register("e", "y" * 1024)
    await gw.client.login("e", "y" * 1024)
    # rejected registrations created nothing
    for name in ("a", "b", "c"):
        assert await gw.gateway.profiles.get_identity("password", name) is None


@pytest.mark.gen_test
async def test_wrong_password_and_unknown_user_look_the_same(gw):
    await gw.client.register()
    wrong = await gw.client.request("POST", "/auth/password/login", json_body={"username": "alice", "password": "wrong password"})
    unknown = await gw.client.request("POST", "/auth/password/login", json_body={"username": "mallory", "password": "wrong password"})
    a = assert_error(wrong, 401, "invalid_credentials")
    b = assert_error(unknown, 401, "invalid_credentials")
    assert a == b
    assert cookie_header(wrong) is None and cookie_header(unknown) is None


# ---------------------------------------------------------------------------
# lockout, in the session store (memory and redis)
# ---------------------------------------------------------------------------


async def bad_login(gw, username: str = "alice"):
    return await gw.client.request("POST", "/auth/password/login", json_body={"username": username, "password": "wrong password"})


async def good_login(gw, username: str = "alice", password: str = PASSWORD):
    return await gw.client.request("POST", "/auth/password/login", json_body={"username": username, "password": password})


@pytest.mark.gen_test
async def test_lockout_after_max_failures(start, session_section):
    lock = {"password": {"max_failures": 3, "lockout_window": "60s"}}
    gw = await start(sessions=session_section, providers=lock)
    await gw.client.register("alice")
    await gw.client.register("bob")
    counter = gw.gateway.providers["password"]._counter("alice")

    # a success resets the count
    for _ in range(2):
        assert_error(await bad_login(gw), 401, "invalid_credentials")
    assert (await gw.gateway.state.peek(counter))[0] == 2
    assert (await good_login(gw)).code == 200
    assert (await gw.gateway.state.peek(counter))[0] == 0

    for name in ("alice", "ALICE", "\uff21lice"):  # one counter per normalised username
        assert_error(await bad_login(gw, name), 401, "invalid_credentials")
    count, left = await gw.gateway.state.peek(counter)
    assert count == 3 and 0 < left <= 60

    for attempt in (bad_login(gw), good_login(gw)):  # the right password is refused too
        r = await attempt
        assert_error(r, 429, "locked_out")
        retry = r.headers.get("Retry-After")
        assert retry is not None and retry.isdigit(), retry
        assert 1 <= int(retry) <= 60
        assert cookie_header(r) is None

    # the lock is per username
    assert (await good_login(gw, "bob")).code == 200

    if session_section["store"] == "redis":
        # a second gateway (another process in production) sharing redis sees the lock
        other = await start(sessions=session_section, providers=lock)
        r = await good_login(other)
        assert_error(r, 429, "locked_out")
        assert int(r.headers["Retry-After"]) >= 1
        assert (await good_login(other, "bob")).code == 200


@pytest.mark.gen_test
async def test_lockout_holds_against_concurrent_guesses(start, session_section):
    gw = await start(sessions=session_section, providers={"password": {"max_failures": 3, "lockout_window": "60s"}})
    await gw.client.register()
    results = await asyncio.gather(*[
        gw.client.request("POST", LOGIN, json_body={"username": "alice", "password": f"guess number {i}"})
        for i in range(12)
    ])
    codes = sorted(r.code for r in results)
    assert codes == [401] * 3 + [429] * 9, codes
    assert_error(await good_login(gw), 429, "locked_out")


@pytest.mark.gen_test
async def test_lockout_ends_with_its_window(start):
    gw = await start(providers={"password": {"max_failures": 2, "lockout_window": "1s"}})
    await gw.client.register()
    for _ in range(2):
        assert_error(await bad_login(gw), 401, "invalid_credentials")
    r = await good_login(gw)
    assert_error(r, 429, "locked_out")
    assert r.headers["Retry-After"] == "1"
    await asyncio.sleep(1.2)
    assert (await good_login(gw)).code == 200


# ---------------------------------------------------------------------------
# refresh
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_refresh_rotates_token_with_grace(start, session_section):
    gw = await start(sessions={**session_section, "rotation_grace": "1s", "refresh_race_window": "5s"})
    reg = await gw.client.register()
    old = reg["token"]
    before = await gw.gateway.session_store.get(reg["session"]["id"])

    r = await gw.client.request("POST", "/auth/refresh", token=old)
    assert r.code == 200, r.body
    data = body(r)
    new = data["token"]
    assert TOKEN_RE.match(new) and new != old
    assert data["token_type"] == "Bearer"
    assert data["session"]["id"] == reg["session"]["id"]
    assert data["session"]["absolute_expires_at"] == reg["session"]["absolute_expires_at"]
    assert cookie_value(r) == new
    after = await gw.gateway.session_store.get(reg["session"]["id"])
    assert after["absolute_expires_at"] == before["absolute_expires_at"]
    assert after["token_hash"] == new[4:7] + "." + hashlib.sha256(new.encode()).hexdigest()  # gws_<tag>_...

    # within the grace period the old token still opens the session...
    assert await whoami(gw, old) == 200
    assert await whoami(gw, new) == 200
    # ...but cannot be refreshed again (within the race window: a concurrent refresh)
    r = await gw.client.request("POST", "/auth/refresh", token=old)
    assert_error(r, 401, "unauthenticated", contains="newer token")
    assert await whoami(gw, new) == 200

    # the new token refreshes fine, and the deadline still does not move
    r = await gw.client.request("POST", "/auth/refresh", token=new)
    assert r.code == 200
    assert body(r)["session"]["absolute_expires_at"] == reg["session"]["absolute_expires_at"]
    newest = body(r)["token"]

    await asyncio.sleep(1.3)
    assert await whoami(gw, old) == 401
    assert await whoami(gw, newest) == 200
    # after its grace, a replaced token presented to /refresh is a replay: the session ends
    r = await gw.client.request("POST", "/auth/refresh", token=old)
    assert_error(r, 401, "unauthenticated", contains="ended")
    assert await whoami(gw, newest) == 401


@pytest.mark.gen_test
async def test_refresh_without_session_is_401(gw):
    r = await gw.client.request("POST", "/auth/refresh")
    assert_error(r, 401, "unauthenticated")
    r = await gw.client.request("POST", "/auth/refresh", token="gws_" + "A" * 43)
    assert_error(r, 401, "unauthenticated")


# ---------------------------------------------------------------------------
# logout
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_logout_ends_the_session_and_clears_the_cookie(sgw):
    gw = sgw
    reg = await gw.client.register()
    other = await gw.client.login()
    r = await gw.client.request("POST", "/auth/logout", token=reg["token"])
    assert r.code == 204, r.body
    assert r.body == b""
    cleared = cookie_header(r)
    assert cleared is not None
    assert cookie_value(r) in ("", '""')
    attrs = cookie_attrs(cleared)
    assert attrs.get("max-age") == "0" or "expires" in attrs
    if "expires" in attrs:
        assert datetime.strptime(attrs["expires"], "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=timezone.utc) < datetime.now(timezone.utc)
    assert attrs.get("path") == "/"

    assert await whoami(gw, reg["token"]) == 401
    assert await gw.gateway.session_store.get(reg["session"]["id"]) is None
    assert await whoami(gw, other["token"]) == 200
    # a second logout with the dead token is 401
    r = await gw.client.request("POST", "/auth/logout", token=reg["token"])
    assert_error(r, 401, "unauthenticated")


@pytest.mark.gen_test
async def test_logout_all_revokes_every_session_of_the_user_only(sgw):
    gw = sgw
    a1 = await gw.client.register("alice")
    a2 = await gw.client.login("alice")
    a3 = await gw.client.login("alice")
    b1 = await gw.client.register("bob")
    r = await gw.client.request("POST", "/auth/logout-all", token=a2["token"])
    assert r.code == 204, r.body
    assert cookie_value(r) in ("", '""')
    for s in (a1, a2, a3):
        assert await whoami(gw, s["token"]) == 401
        assert await gw.gateway.session_store.get(s["session"]["id"]) is None
    assert await gw.gateway.session_store.list_user(a1["user"]["id"]) == []
    assert await whoami(gw, b1["token"]) == 200
    # alice can log in again afterwards
    assert await whoami(gw, (await gw.client.login("alice"))["token"]) == 200


# ---------------------------------------------------------------------------
# session endpoints
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_get_session_shape(gw):
    t0 = datetime.now(timezone.utc).replace(microsecond=0)
    reg = await gw.client.register()
    r = await gw.client.request("GET", "/auth/session", token=reg["token"])
    assert r.code == 200, r.body
    data = body(r)
    assert set(data) == {"user", "session"}
    assert data["user"] == {"id": reg["user"]["id"], "profile": {"username": "alice"}}
    s = data["session"]
    assert set(s) == {"id", "provider", "created_at", "expires_at", "absolute_expires_at", "remembered"}
    assert s["remembered"] is False
    assert s["id"] == reg["session"]["id"]
    assert s["provider"] == "password"
    created, expires, absolute = (parse_iso(s[k]) for k in ("created_at", "expires_at", "absolute_expires_at"))
    assert abs((created - t0).total_seconds()) <= 5
    # defaults: idle 30m, absolute 7d
    assert abs((expires - created).total_seconds() - 1800) <= 5
    assert abs((absolute - created).total_seconds() - 7 * 86400) <= 5


@pytest.mark.gen_test
async def test_sessions_listing(sgw):
    gw = sgw
    a1 = await gw.client.register(headers={"User-Agent": "browser-one"})
    a2 = await gw.client.login(headers={"User-Agent": "browser-two"})
    await gw.client.register("bob")
    r = await gw.client.request("GET", "/auth/sessions", token=a2["token"])
    assert r.code == 200, r.body
    sessions = body(r)["sessions"]
    assert isinstance(sessions, list) and len(sessions) == 2
    by_id = {s["id"]: s for s in sessions}
    assert set(by_id) == {a1["session"]["id"], a2["session"]["id"]}
    for s in sessions:
        assert {"id", "provider", "created_at", "last_seen_at", "ip", "user_agent", "current"} <= set(s)
        assert s["provider"] == "password"
        assert s["ip"] == "127.0.0.1"
        parse_iso(s["created_at"])
        parse_iso(s["last_seen_at"])
    assert [s["current"] for s in sessions].count(True) == 1
    assert by_id[a2["session"]["id"]]["current"] is True
    assert by_id[a1["session"]["id"]]["current"] is False
    assert by_id[a1["session"]["id"]]["user_agent"] == "browser-one"
    assert by_id[a2["session"]["id"]]["user_agent"] == "browser-two"


@pytest.mark.gen_test
async def test_delete_session(sgw):
    gw = sgw
    a1 = await gw.client.register("alice")
    a2 = await gw.client.login("alice")
    b1 = await gw.client.register("bob")

    r = await gw.client.request("DELETE", f"/auth/sessions/{a2['session']['id']}", token=a1["token"])
    assert r.code == 204, r.body
    assert await whoami(gw, a2["token"]) == 401
    assert await whoami(gw, a1["token"]) == 200
    listing = body(await gw.client.request("GET", "/auth/sessions", token=a1["token"]))["sessions"]
    assert [s["id"] for s in listing] == [a1["session"]["id"]]

    # someone else's session: 404, and it keeps working
    r = await gw.client.request("DELETE", f"/auth/sessions/{b1['session']['id']}", token=a1["token"])
    assert_error(r, 404, "not_found")
    assert await whoami(gw, b1["token"]) == 200

    # unknown and already-deleted ids
    for sid in ("s_doesnotexist0000", a2["session"]["id"]):
        r = await gw.client.request("DELETE", f"/auth/sessions/{sid}", token=a1["token"])
        assert_error(r, 404, "not_found")

    # needs a session
    r = await gw.client.request("DELETE", f"/auth/sessions/{b1['session']['id']}")
    assert_error(r, 401, "unauthenticated")
    assert await whoami(gw, b1["token"]) == 200

    # deleting one's own current session ends it
    r = await gw.client.request("DELETE", f"/auth/sessions/{a1['session']['id']}", token=a1["token"])
    assert r.code == 204
    assert await whoami(gw, a1["token"]) == 401


# ---------------------------------------------------------------------------
# password change
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_password_change(sgw):
    gw = sgw
    a1 = await gw.client.register("alice")
    a2 = await gw.client.login("alice")
    b1 = await gw.client.register("bob")
    change = "/auth/password/change"

    # wrong old password: 401 and nothing changes
    r = await gw.client.request("POST", change, token=a1["token"],
                                json_body={"old_password": "not the password", "new_password": "brand new pass"})
    assert_error(r, 401, "invalid_credentials")
    # new password too short: 400 naming the field
    r = await gw.client.request("POST", change, token=a1["token"],
                                json_body={"old_password": PASSWORD, "new_password": "short"})
    assert_error(r, 400, "invalid_request", contains="new_password")
    # no session: 401
    r = await gw.client.request("POST", change, json_body={"old_password": PASSWORD, "new_password": "brand new pass"})
    assert_error(r, 401, "unauthenticated")
    assert await whoami(gw, a2["token"]) == 200

    r = await gw.client.request("POST", change, token=a1["token"],
                                json_body={"old_password": PASSWORD, "new_password": "brand new pass"})
    assert r.code == 204, r.body
    assert await whoami(gw, a1["token"]) == 200
    assert await whoami(gw, a2["token"]) == 401
    assert await whoami(gw, b1["token"]) == 200
    assert_error(await good_login(gw, "alice", PASSWORD), 401, "invalid_credentials")
    assert (await good_login(gw, "alice", "brand new pass")).code == 200
    assert (await good_login(gw, "bob", PASSWORD)).code == 200


# ---------------------------------------------------------------------------
# timeouts
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=15)
async def test_idle_timeout(start, session_section):
    gw = await start(sessions={**session_section, "idle_timeout": "1s", "touch_interval": 0})
    used = await gw.client.register()
    unused = await gw.client.login()
    first_seen = (await gw.gateway.session_store.get(used["session"]["id"]))["last_seen_at"]
    for _ in range(3):  # 1.5 s of activity, every 0.5 s
        await asyncio.sleep(0.5)
        assert await whoami(gw, used["token"]) == 200
    record = await gw.gateway.session_store.get(used["session"]["id"])
    assert record["last_seen_at"] > first_seen + 1.0
    assert await whoami(gw, unused["token"]) == 401
    assert await gw.gateway.session_store.get(unused["session"]["id"]) is None
    assert await whoami(gw, used["token"]) == 200


@pytest.mark.gen_test(timeout=15)
async def test_sessions_kept_alive_past_their_first_ttl_are_still_the_users(start, session_section):
    """Listing, logout-all and password change must reach a session that has
    been touched beyond its initial idle deadline (redis: the user index TTL)."""
    gw = await start(sessions={**session_section, "idle_timeout": "1s", "touch_interval": 0})
    a = await gw.client.register()
    b = await gw.client.login()
    c = await gw.client.login()
    for _ in range(3):  # 1.5 s: every session outlives its first 1 s TTL
        await asyncio.sleep(0.5)
        for s in (a, b, c):
            assert await whoami(gw, s["token"]) == 200
    listing = body(await gw.client.request("GET", "/auth/sessions", token=a["token"]))["sessions"]
    assert sorted(s["id"] for s in listing) == sorted(s["session"]["id"] for s in (a, b, c))

    r = await gw.client.request("POST", "/auth/password/change", token=a["token"],
                                json_body={"old_password": PASSWORD, "new_password": "brand new pass"})
    assert r.code == 204
    assert await whoami(gw, b["token"]) == 401
    d = await gw.client.login(password="brand new pass")
    r = await gw.client.request("POST", "/auth/logout-all", token=d["token"])
    assert r.code == 204
    for s in (a, c, d):
        assert await whoami(gw, s["token"]) == 401


@pytest.mark.gen_test(timeout=15)
async def test_absolute_timeout(start):
    gw = await start(sessions={"idle_timeout": "10s", "absolute_timeout": "2s", "touch_interval": 0})
    reg = await gw.client.register()
    s = reg["session"]
    assert (parse_iso(s["absolute_expires_at"]) - parse_iso(s["created_at"])).total_seconds() == 2
    deadline = time.time() + 2.3
    while time.time() < deadline - 0.6:
        assert await whoami(gw, reg["token"]) == 200
        await asyncio.sleep(0.4)
    await asyncio.sleep(max(0.0, deadline - time.time()))
    assert await whoami(gw, reg["token"]) == 401
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert_error(r, 401, "unauthenticated")


@pytest.mark.gen_test
async def test_touch_interval_limits_store_writes(start, session_section):
    gw = await start(sessions={**session_section, "touch_interval": "60s"})
    reg = await gw.client.register()
    sid = reg["session"]["id"]
    before = await gw.gateway.session_store.get(sid)
    await asyncio.sleep(0.05)
    for _ in range(2):
        assert await whoami(gw, reg["token"]) == 200
    after = await gw.gateway.session_store.get(sid)
    assert after["last_seen_at"] == before["last_seen_at"]
    assert after["expires_at"] == before["expires_at"]


@pytest.mark.gen_test
async def test_touch_interval_zero_touches_every_request(start):
    gw = await start(sessions={"touch_interval": 0})
    reg = await gw.client.register()
    sid = reg["session"]["id"]
    before = await gw.gateway.session_store.get(sid)
    await asyncio.sleep(0.05)
    assert await whoami(gw, reg["token"]) == 200
    after = await gw.gateway.session_store.get(sid)
    assert after["last_seen_at"] > before["last_seen_at"]
    assert after["expires_at"] > before["expires_at"]


# ---------------------------------------------------------------------------
# tokens are never stored
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_redis_holds_token_hashes_never_tokens(start, redis_url):
    gw = await start(sessions={"store": "redis", "redis_url": redis_url, "rotation_grace": "30s"})
    reg = await gw.client.register()
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert r.code == 200
    tokens = [reg["token"], body(r)["token"]]

    client = gw.gateway.session_store.client
    keys = await client.keys("*")
    assert keys
    dump = []
    for key in keys:
        kind = await client.type(key)
        if kind == "string":
            dump.append(await client.get(key))
        elif kind == "zset":
            dump.extend(await client.zrange(key, 0, -1))
        elif kind == "hash":
            dump.extend(f"{k}={v}" for k, v in (await client.hgetall(key)).items())
        elif kind in ("list",):
            dump.extend(await client.lrange(key, 0, -1))
        elif kind == "set":
            dump.extend(await client.smembers(key))
        else:
            pytest.fail(f"unexpected redis type {kind} for {key}")
    everything = "\n".join(keys + dump)
    for token in tokens:
        secret = TOKEN_RE.match(token).group(1)
        assert token not in everything
        assert secret not in everything
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert any(digest in key for key in keys), (digest, keys)
    # and the record is found by its id, under the slot tag the id and the tokens carry
    session_id = reg['session']['id']
    tag = session_id[2:5]
    assert all(t.startswith(f"gws_{tag}_") for t in tokens)
    record = json.loads(await client.get(f"gw:{{{tag}}}:s:{session_id}"))
    assert record["token_hash"] == f"{tag}." + hashlib.sha256(tokens[1].encode()).hexdigest()
    assert record["prev_token_hash"] == f"{tag}." + hashlib.sha256(tokens[0].encode()).hexdigest()


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


ERROR_CASES = [
    # (id, method, path, raw body, extra headers, status, code, message must contain)
    ("malformed-json", "POST", LOGIN, b'{"username": "alice", ', {}, 400, "invalid_request", "JSON"),
    ("json-array", "POST", LOGIN, b'["alice", "pw"]', {}, 400, "invalid_request", None),
    ("json-string", "POST", LOGIN, b'"alice"', {}, 400, "invalid_request", None),
    ("empty-body", "POST", LOGIN, b"", {}, 400, "invalid_request", None),
    ("missing-password", "POST", LOGIN, b'{"username": "alice"}', {}, 400, "invalid_request", "password"),
    ("missing-username", "POST", LOGIN, b'{"password": "correct horse"}', {}, 400, "invalid_request", "username"),
    ("username-not-string", "POST", LOGIN, b'{"username": 5, "password": "correct horse"}', {}, 400, "invalid_request", "username"),
    ("password-not-string", "POST", LOGIN, b'{"username": "alice", "password": ["x"]}', {}, 400, "invalid_request", "password"),
    ("password-lone-surrogate", "POST", LOGIN, b'{"username": "alice", "password": "correct horse\\ud800"}', {}, 400, "invalid_request", "password"),
    ("register-password-lone-surrogate", "POST", "/auth/password/register", b'{"username": "zed", "password": "correct horse\\ud800"}', {}, 400, "invalid_request", "password"),
    ("register-missing-password", "POST", "/auth/password/register", b'{"username": "alice"}', {}, 400, "invalid_request", "password"),
    ("not-utf8", "POST", LOGIN, b'{"username": "\xff\xfe"}', {}, 400, "invalid_request", "JSON"),
    ("unknown-endpoint", "GET", "/auth/nope", None, {}, 404, "not_found", None),
    ("unknown-endpoint-post", "POST", "/auth/nope", b"{}", {}, 404, "not_found", None),
    ("unknown-provider", "POST", "/auth/nope/login", b"{}", {}, 404, "not_found", None),
    ("get-logout", "GET", "/auth/logout", None, {}, 405, "method_not_allowed", None),
    ("get-login", "GET", LOGIN, None, {}, 405, "method_not_allowed", None),
    ("session-no-token", "GET", "/auth/session", None, {}, 401, "unauthenticated", None),
    ("session-bad-bearer", "GET", "/auth/session", None, {"Authorization": "Bearer gws_" + "x" * 43}, 401, "unauthenticated", None),
    ("session-bad-cookie", "GET", "/auth/session", None, {"Cookie": "gw_session=gws_nope"}, 401, "unauthenticated", None),
    ("sessions-no-token", "GET", "/auth/sessions", None, {}, 401, "unauthenticated", None),
    ("logout-no-token", "POST", "/auth/logout", b"", {}, 401, "unauthenticated", None),
    ("logout-all-no-token", "POST", "/auth/logout-all", b"", {}, 401, "unauthenticated", None),
]


@pytest.mark.parametrize(
    "method,path,raw,headers,status,code,contains",
    [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES],
)
@pytest.mark.gen_test
async def test_errors_are_json(gw, method, path, raw, headers, status, code, contains):
    hdrs = {"Content-Type": "application/json", **headers} if raw is not None else dict(headers)
    r = await gw.client.request(method, path, body=raw, headers=hdrs)
    assert_error(r, status, code, contains=contains)
    if status == 401:
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers


@pytest.mark.gen_test
async def test_body_over_max_body_size_is_413(start):
    gw = await start(server={"auth_max_body_size": "1KiB"})
    big = json.dumps({"username": "alice", "password": "x" * 2000})
    r = await gw.client.request("POST", LOGIN, body=big, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    r = await gw.client.request("POST", "/auth/password/register", body=big, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    # just under the limit is read and judged on its merits
    ok = json.dumps({"username": "alice", "password": "x" * 900})
    assert len(ok) <= 1024
    r = await gw.client.request("POST", LOGIN, body=ok, headers={"Content-Type": "application/json"})
    assert_error(r, 401, "invalid_credentials")
    # and the gateway still serves afterwards
    await gw.client.register()


# ---------------------------------------------------------------------------
# CSRF
# ---------------------------------------------------------------------------


@pytest.fixture
def csrf_gw(start, io_loop):
    return io_loop.run_sync(lambda: start(sessions={"allowed_origins": [ALLOWED_ORIGIN]}))


@pytest.mark.gen_test
async def test_csrf_cookie_post_needs_origin_or_header(csrf_gw):
    gw = csrf_gw
    reg = await gw.client.register()
    tok = reg["token"]

    r = await gw.client.request("POST", "/auth/logout", headers=cookie(tok))
    assert_error(r, 403, "csrf")
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok), "Origin": "https://evil.example.com"})
    assert_error(r, 403, "csrf")
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok), "Origin": "null"})
    assert_error(r, 403, "csrf")
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok), "Referer": "https://evil.example.com/x"})
    assert_error(r, 403, "csrf")
    assert await whoami(gw, tok) == 200  # none of these logged out

    # the other cookie-authenticated unsafe endpoints are guarded the same way
    for path in ("/auth/logout-all", "/auth/refresh"):
        assert_error(await gw.client.request("POST", path, headers=cookie(tok)), 403, "csrf")
    r = await gw.client.request("POST", "/auth/password/change", headers=cookie(tok),
                                json_body={"old_password": PASSWORD, "new_password": "brand new pass"})
    assert_error(r, 403, "csrf")
    r = await gw.client.request("DELETE", f"/auth/sessions/{reg['session']['id']}", headers=cookie(tok))
    assert_error(r, 403, "csrf")
    assert await whoami(gw, tok) == 200
    assert (await good_login(gw)).code == 200  # password unchanged

    # a safe method with the cookie alone is fine
    assert (await gw.client.request("GET", "/auth/session", headers=cookie(tok))).code == 200

    # allowed Origin
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok), "Origin": ALLOWED_ORIGIN})
    assert r.code == 204, r.body
    assert await whoami(gw, tok) == 401

    # X-Requested-With
    tok2 = (await gw.client.login())["token"]
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok2), "X-Requested-With": "XMLHttpRequest"})
    assert r.code == 204, r.body
    assert await whoami(gw, tok2) == 401

    # Referer from an allowed origin
    tok3 = (await gw.client.login())["token"]
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok3), "Referer": ALLOWED_ORIGIN + "/page"})
    assert r.code == 204, r.body

    # the gateway's own origin
    tok4 = (await gw.client.login())["token"]
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(tok4), "Origin": gw.base_url})
    assert r.code == 204, r.body

    # Bearer needs no Origin
    tok5 = (await gw.client.login())["token"]
    r = await gw.client.request("POST", "/auth/logout", token=tok5)
    assert r.code == 204, r.body
    assert await whoami(gw, tok5) == 401


@pytest.mark.gen_test
async def test_csrf_through_the_proxy(csrf_gw, upstream):
    gw = csrf_gw
    reg = await gw.client.register()
    tok = reg["token"]

    r = await gw.client.request("POST", "/api/x", body=b'{"a": 1}', headers={**cookie(tok), "Content-Type": "application/json"})
    assert_error(r, 403, "csrf")
    r = await gw.client.request("DELETE", "/api/x", headers={**cookie(tok), "Origin": "https://evil.example.com"})
    assert_error(r, 403, "csrf")
    assert upstream.seen == []

    r = await gw.client.request("GET", "/api/x", headers=cookie(tok))
    assert r.code == 200, r.body
    assert upstream.last.method == "GET"
    assert upstream.last.header("X-User-Id") == reg["user"]["id"]

    r = await gw.client.request("POST", "/api/x", body=b"hi", headers={**cookie(tok), "Origin": ALLOWED_ORIGIN})
    assert r.code == 200, r.body
    assert upstream.last.method == "POST" and upstream.last.body == b"hi"

    r = await gw.client.request("POST", "/api/x", body=b"hey", token=tok)
    assert r.code == 200, r.body
    assert upstream.last.body == b"hey"
    assert len(upstream.seen) == 3


# ---------------------------------------------------------------------------
# max_per_user
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_max_per_user_revokes_the_oldest(start, session_section):
    gw = await start(sessions={**session_section, "max_per_user": 2})
    s1 = await gw.client.register("alice")
    s2 = await gw.client.login("alice")
    b1 = await gw.client.register("bob")
    b2 = await gw.client.login("bob")
    s3 = await gw.client.login("alice")
    assert await whoami(gw, s1["token"]) == 401
    assert await whoami(gw, s2["token"]) == 200
    assert await whoami(gw, s3["token"]) == 200
    assert await whoami(gw, b1["token"]) == 200 and await whoami(gw, b2["token"]) == 200
    listing = body(await gw.client.request("GET", "/auth/sessions", token=s3["token"]))["sessions"]
    assert sorted(s["id"] for s in listing) == sorted([s2["session"]["id"], s3["session"]["id"]])
    s4 = await gw.client.login("alice")
    assert await whoami(gw, s2["token"]) == 401
    assert await whoami(gw, s3["token"]) == 200 and await whoami(gw, s4["token"]) == 200


# ---------------------------------------------------------------------------
# secrets never in logs
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_no_secrets_in_logs(gw, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    good, bad = "s3cret-Passw0rd-xyzzy", "wr0ng-Passw0rd-plugh"
    reg = await gw.client.register("alice", good)
    r = await gw.client.request("POST", LOGIN, json_body={"username": "alice", "password": bad})
    assert r.code == 401
    login = await gw.client.login("alice", good)
    r = await gw.client.request("GET", "/api/hello?x=1", token=login["token"])
    assert r.code == 200
    r = await gw.client.request("POST", "/api/hello", body=b"{}", headers={**cookie(login["token"]), "X-Requested-With": "x"})
    assert r.code == 200
    r = await gw.client.request("POST", "/auth/refresh", token=login["token"])
    assert r.code == 200
    refreshed = body(r)["token"]
    r = await gw.client.request("POST", "/auth/logout", token=refreshed)
    assert r.code == 204
    # an error path that echoes input
    r = await gw.client.request("POST", LOGIN, body='{"username": "alice", "password": "' + good, headers={"Content-Type": "application/json"})
    assert r.code == 400

    text = caplog.text + "\n".join(rec.getMessage() for rec in caplog.records)
    assert "/auth/password/login" in text  # the logs did capture the requests
    for secret in (good, bad, reg["token"], login["token"], refreshed):
        assert secret not in text
    for token in (reg["token"], login["token"], refreshed):
        assert TOKEN_RE.match(token).group(1) not in text


@pytest.mark.gen_test
async def test_password_is_rehashed_on_login_when_the_cost_parameters_change(start):
    gw1 = await start()
    reg = await gw1.client.register()
    old_hash = (await gw1.gateway.profiles.get_identity("password", "alice")).data["hash"]
    assert "t=1," in old_hash
    await gw1.gateway.stop()  # the same SQLite file, opened by a gateway with new parameters
    gw2 = await start(providers={"password": {"time_cost": 2}})
    login = await gw2.client.login()
    assert login["user"]["id"] == reg["user"]["id"]
    new_hash = (await gw2.gateway.profiles.get_identity("password", "alice")).data["hash"]
    assert "t=2," in new_hash and new_hash != old_hash
    assert (await gw2.client.login())["user"]["id"] == reg["user"]["id"]


@pytest.mark.gen_test
async def test_concurrent_refreshes_with_one_token_yield_exactly_one_new_token(start, redis_url):
    gw = await start(sessions={"store": "redis", "redis_url": redis_url})
    reg = await gw.client.register()
    results = await asyncio.gather(*(gw.client.request("POST", "/auth/refresh", token=reg["token"]) for _ in range(5)))
    codes = sorted(r.code for r in results)
    assert codes == [200, 401, 401, 401, 401]
    winner = next(body(r)["token"] for r in results if r.code == 200)
    assert (await gw.client.request("GET", "/auth/session", token=winner)).code == 200
    for r in results:
        if r.code == 401:
            assert "already refreshed" in body(r)["message"]


@pytest.mark.gen_test
async def test_login_requires_a_json_content_type(start):
    """A cross-site page can send text/plain or a form without a preflight, never JSON."""
    gw = await start()
    await gw.client.register()
    payload = json.dumps({"username": "alice", "password": PASSWORD})
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        r = await gw.client.request("POST", LOGIN, body=payload, headers=headers)
        assert r.code == 400, headers
        assert "Content-Type" in body(r)["message"]
    r = await gw.client.request("POST", LOGIN, body=payload, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.code == 200


@pytest.mark.gen_test
async def test_deeply_nested_json_is_a_400_not_a_500(start):
    gw = await start()
    r = await gw.client.request("POST", LOGIN, body="[" * 60_000, headers={"Content-Type": "application/json"})
    assert r.code == 400 and body(r)["error"] == "invalid_request"
    assert "nested" in body(r)["message"]


@pytest.mark.gen_test
async def test_malformed_referer_is_no_origin_not_a_500(start):
    gw = await start()
    reg = await gw.client.register()
    r = await gw.client.request("POST", "/auth/logout", headers={**cookie(reg["token"]), "Referer": "http://[evil"})
    assert r.code == 403 and body(r)["error"] == "csrf"


@pytest.mark.gen_test
async def test_same_origin_behind_a_trusted_proxy_uses_the_forwarded_host(start):
    gw = await start(server={"trusted_proxies": ["127.0.0.1"]})
    reg = await gw.client.register()
    headers = {**cookie(reg["token"]), "X-Forwarded-Host": "app.example.org", "X-Forwarded-Proto": "https"}
    r = await gw.client.request("POST", "/auth/logout", headers={**headers, "Origin": "https://app.example.org"})
    assert r.code == 204
    reg = await gw.client.login()
    headers["Cookie"] = f"gw_session={reg['token']}"
    r = await gw.client.request("POST", "/auth/logout", headers={**headers, "Origin": "https://evil.example"})
    assert r.code == 403


@pytest.mark.gen_test
async def test_tornado_never_logs_a_token_from_a_malformed_request(start, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await start()
    reg = await gw.client.register()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(f"GET /auth/session HTTP/1.1\r\nHost: x\r\nCookie: gw_session={reg['token']}; o=a\x01b\r\n\r\n"
                 .encode("latin-1"))
    await writer.drain()
    await reader.read(1024)
    writer.close()
    secret = reg["token"].removeprefix("gws_")
    assert caplog.records, "the malformed request should have been logged"
    assert secret not in caplog.text


@pytest.mark.gen_test
async def test_registering_again_with_the_same_password_logs_in(start):
    """A client that lost the answer to its registration can simply retry."""
    gw = await start()
    first = await gw.client.register()
    r = await gw.client.request("POST", "/auth/password/register",
                                json_body={"username": "Alice", "password": PASSWORD})
    assert r.code == 200
    assert body(r)["user"]["id"] == first["user"]["id"] and body(r)["token"] != first["token"]
    r = await gw.client.request("POST", "/auth/password/register",
                                json_body={"username": "alice", "password": "another password"})
    assert r.code == 409 and body(r)["error"] == "conflict"


@pytest.mark.gen_test(timeout=30)
async def test_a_flood_of_logins_is_turned_away_with_rate_limited(start):
    gw = await start(providers={"password": {"time_cost": 2, "memory_cost": 65536, "parallelism": 1,
                                             "hash_threads": 1, "max_pending_hashes": 2, "max_failures": 100}})
    results = await asyncio.gather(*(
        gw.client.request("POST", LOGIN, json_body={"username": f"user{i}", "password": PASSWORD})
        for i in range(8)))
    codes = [r.code for r in results]
    assert 429 in codes and set(codes) <= {401, 429}
    limited = next(r for r in results if r.code == 429)
    assert body(limited)["error"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1


@pytest.mark.gen_test
async def test_a_stale_cookie_is_cleared(start):
    gw = await start()
    reg = await gw.client.register()
    await gw.client.request("POST", "/auth/logout", token=reg["token"])
    for method, path in (("POST", "/auth/logout"), ("GET", "/auth/session")):
        r = await gw.client.request(method, path, headers={**cookie(reg["token"]), "X-Requested-With": "x"})
        assert r.code == 401
        assert cookie_header(r) is not None, f"{method} {path} left the dead cookie in place"
        assert cookie_value(r) in ("", '""')


@pytest.mark.gen_test
async def test_an_auth_prefix_is_a_path_not_a_pattern(start):
    gw = await start(server={"auth_prefix": "/gw.v1"})
    r = await gw.client.request("POST", "/gw.v1/password/register", json_body={"username": "al", "password": PASSWORD})
    assert r.code == 201
    r = await gw.client.request("GET", "/gwXv1/session")
    assert r.code == 404 and "no route" in body(r)["message"]


@pytest.mark.gen_test
async def test_a_web_app_on_an_allowed_origin_can_call_the_auth_endpoints(start):
    gw = await start(sessions={"allowed_origins": [ALLOWED_ORIGIN]})
    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    r = await gw.client.request("OPTIONS", "/auth/password/register", headers=preflight)
    assert r.code == 204
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert r.headers["Access-Control-Allow-Headers"] == "content-type"
    r = await gw.client.request("POST", "/auth/password/register", headers={"Origin": ALLOWED_ORIGIN},
                                json_body={"username": "alice", "password": PASSWORD})
    assert r.code == 201 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
    r = await gw.client.request("GET", "/auth/session", headers={"Origin": ALLOWED_ORIGIN})
    assert r.code == 401 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN  # errors are readable too
    # Any other origin: refused preflight, no CORS headers.
    r = await gw.client.request("OPTIONS", "/auth/password/register",
                                headers={**preflight, "Origin": "https://evil.example"})
    assert r.code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await gw.client.request("GET", "/auth/session", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    # A plain OPTIONS is not a preflight.
    assert (await gw.client.request("OPTIONS", "/auth/session")).code == 405
