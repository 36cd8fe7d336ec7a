"""Remember-me: ``"remember": true`` at login or registration (as
``sessions.remember`` allows) gives a persistent cookie and the remember
timeouts; any other session gets a browser-session cookie and the normal
timeouts.  ``/refresh`` keeps the kind.  Driven over HTTP against a real
gateway (and a real redis-server where the store matters).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from gateway.config import ConfigError, load_config
from gateway.testing import assert_error, base_config, body, cookie_header, cookie_value

PASSWORD = "correct horse"
DAY = 86400


@pytest.fixture
def start(make_gateway, upstream, tmp_path):
    """``await start(**sections)`` -> a running gateway with overrides on the test config."""

    async def _start(**sections: Any):
        return await make_gateway(base_config(upstream.url, tmp_path, **sections))

    return _start


def attrs_of(r) -> dict[str, str]:
    """The attributes of the response's session cookie, names lower-cased."""
    header = cookie_header(r)
    assert header is not None, r.headers.get_list("Set-Cookie")
    out = {}
    for part in header.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        out[name.lower()] = value
    return out


def seconds(session: dict[str, Any], start: str, end: str) -> float:
    parse = lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))  # noqa: E731
    return (parse(session[end]) - parse(session[start])).total_seconds()


async def login(gw, remember: Any = None, username: str = "alice"):
    payload: dict[str, Any] = {"username": username, "password": PASSWORD}
    if remember is not None:
        payload["remember"] = remember
    return await gw.client.request("POST", "/auth/password/login", json_body=payload)


async def register(gw, remember: Any = None, username: str = "alice"):
    payload: dict[str, Any] = {"username": username, "password": PASSWORD}
    if remember is not None:
        payload["remember"] = remember
    return await gw.client.request("POST", "/auth/password/register", json_body=payload)


def assert_remembered(r, *, idle: float = 14 * DAY, absolute: float = 30 * DAY) -> dict[str, Any]:
    """A remembered session's answer: a persistent cookie, the remember deadlines."""
    data = body(r)
    session = data["session"]
    assert session["remembered"] is True, data
    assert abs(seconds(session, "created_at", "expires_at") - idle) <= 5
    assert abs(seconds(session, "created_at", "absolute_expires_at") - absolute) <= 5
    assert data["expires_at"] == session["expires_at"]
    attrs = attrs_of(r)
    assert abs(int(attrs["max-age"]) - absolute) <= 5, attrs
    assert "httponly" in attrs and attrs["path"] == "/"
    return data


def assert_browser_session(r, *, idle: float = 1800, absolute: float = 7 * DAY) -> dict[str, Any]:
    """A session not remembered: a browser-session cookie, the normal deadlines."""
    data = body(r)
    session = data["session"]
    assert session["remembered"] is False, data
    assert abs(seconds(session, "created_at", "expires_at") - idle) <= 5
    assert abs(seconds(session, "created_at", "absolute_expires_at") - absolute) <= 5
    attrs = attrs_of(r)
    assert "max-age" not in attrs and "expires" not in attrs, attrs
    assert "httponly" in attrs and attrs["path"] == "/"
    return data


# ---------------------------------------------------------------------------
# remember = "optional" (the default): the body decides
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_login_is_not_remembered_unless_asked(start):
    gw = await start()
    r = await register(gw)
    assert r.code == 201
    assert_browser_session(r)
    for remember in (None, False):
        r = await login(gw, remember)
        assert r.code == 200, r.body
        assert_browser_session(r)


@pytest.mark.gen_test
async def test_remember_true_gives_a_persistent_cookie_and_the_remember_deadlines(start):
    gw = await start()
    r = await register(gw, True)
    assert r.code == 201, r.body
    assert_remembered(r)
    r = await login(gw, True)
    assert r.code == 200
    data = assert_remembered(r)
    # what GET /auth/session and the listing show
    r = await gw.client.request("GET", "/auth/session", token=data["token"])
    assert body(r)["session"]["remembered"] is True
    plain = body(await login(gw))
    r = await gw.client.request("GET", "/auth/sessions", token=plain["token"])
    by_id = {s["id"]: s for s in body(r)["sessions"]}
    assert by_id[data["session"]["id"]]["remembered"] is True
    assert by_id[plain["session"]["id"]]["remembered"] is False


@pytest.mark.gen_test
async def test_a_remember_that_is_not_a_boolean_is_refused_before_anything_happens(start):
    gw = await start()
    for bad in ("yes", 1, [], {}):
        r = await register(gw, bad)
        assert_error(r, 400, "invalid_request", contains="remember")
        assert cookie_header(r) is None
    r = await register(gw)
    assert r.code == 201  # no registration went through before
    r = await login(gw, "true")
    assert_error(r, 400, "invalid_request", contains="remember")
    # refused whatever the setting
    never = await start(sessions={"remember": "never"})
    assert_error(await login(never, "true"), 400, "invalid_request", contains="remember")


# ---------------------------------------------------------------------------
# remember = "always" / "never"
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_remember_always_remembers_every_session(start):
    gw = await start(sessions={"remember": "always", "remember_idle_timeout": "2d",
                               "remember_absolute_timeout": "10d"})
    r = await register(gw)
    assert r.code == 201
    assert_remembered(r, idle=2 * DAY, absolute=10 * DAY)
    for remember in (None, False, True):
        assert_remembered(await login(gw, remember), idle=2 * DAY, absolute=10 * DAY)


@pytest.mark.gen_test
async def test_remember_never_remembers_no_session(start):
    gw = await start(sessions={"remember": "never", "idle_timeout": "1h", "absolute_timeout": "2d"})
    r = await register(gw, True)
    assert r.code == 201
    assert_browser_session(r, idle=3600, absolute=2 * DAY)
    assert_browser_session(await login(gw, True), idle=3600, absolute=2 * DAY)


# ---------------------------------------------------------------------------
# the session keeps its kind
# ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_refresh_keeps_the_kind_of_session_and_of_cookie(start, session_section):
    gw = await start(sessions=session_section)
    await register(gw)
    for remember in (True, False):
        first = body(await login(gw, remember))
        r = await gw.client.request("POST", "/auth/refresh", token=first["token"])
        assert r.code == 200, r.body
        data = body(r)
        assert data["session"]["remembered"] is remember
        assert data["session"]["absolute_expires_at"] == first["session"]["absolute_expires_at"]
        assert cookie_value(r) == data["token"]
        attrs = attrs_of(r)
        if remember:
            assert abs(int(attrs["max-age"]) - 30 * DAY) <= 5, attrs
            assert abs(seconds(data["session"], "created_at", "expires_at") - 14 * DAY) <= 5
        else:
            assert "max-age" not in attrs and "expires" not in attrs, attrs
            assert abs(seconds(data["session"], "created_at", "expires_at") - 1800) <= 5


@pytest.mark.gen_test
async def test_each_session_lives_by_its_own_idle_timeout(start, session_section):
    gw = await start(sessions={**session_section, "idle_timeout": "1s", "remember_idle_timeout": "30s",
                               "touch_interval": 0})
    await register(gw)
    plain = body(await login(gw))
    kept = body(await login(gw, True))
    await asyncio.sleep(0.6)
    for token in (plain["token"], kept["token"]):  # a touch pushes each by its own timeout
        assert (await gw.client.request("GET", "/api/thing", token=token)).code == 200
    await asyncio.sleep(1.3)
    r = await gw.client.request("GET", "/auth/session", token=plain["token"])
    assert_error(r, 401, "unauthenticated", fields={"reason": "expired"})
    r = await gw.client.request("GET", "/auth/session", token=kept["token"])
    assert r.code == 200
    session = body(r)["session"]
    assert session["remembered"] is True
    assert 20 <= seconds(session, "created_at", "expires_at") <= 40


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def test_touch_interval_must_be_shorter_than_the_remember_idle_timeout():
    with pytest.raises(ConfigError) as caught:
        load_config(data={"sessions": {"remember_idle_timeout": "30s", "touch_interval": "60s",
                                       "idle_timeout": "2m"}}, environ={})
    assert any(p.startswith("sessions.touch_interval:") and "remember_idle_timeout" in p
               for p in caught.value.problems), caught.value.problems
    load_config(data={"sessions": {"remember": "never", "remember_idle_timeout": "30s", "touch_interval": "60s",
                                   "idle_timeout": "2m"}}, environ={})
    with pytest.raises(ConfigError) as caught:
        load_config(data={"sessions": {"remember": "sometimes"}}, environ={})
    assert any(p.startswith("sessions.remember:") for p in caught.value.problems)
