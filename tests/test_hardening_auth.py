"""No client can exhaust the gateway: the session store's connection pool,
the login lockout, cookie names browsers refuse, and what a token that
``/refresh`` replaced may still do.

Every test drives a real gateway on loopback (and, where it matters, a real
redis-server) and checks what a client or operator can observe.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import hookimpl
from gateway.config import ConfigError, load_config
from gateway.plugins import get_plugin_manager
from gateway.sessions.manager import hash_token
from gateway.testing import assert_error, base_config, body, cookie_header, cookie_value

ROOT = Path(__file__).resolve().parent.parent

PASSWORD = "correct horse"
LOGIN = "/auth/password/login"
BOGUS = "gws_" + "B" * 43


@pytest.fixture
def start(make_gateway, upstream, tmp_path):
    async def _start(*, pm: Any = None, **sections: Any):
        return await make_gateway(base_config(upstream.url, tmp_path, **sections), pm=pm)

    return _start


class KeepAliveClient:
    """One HTTP/1.1 connection kept open for many requests, as a browser or
    a mobile app holds it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "KeepAliveClient":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.writer is not None
        self.writer.close()

    async def get(self, path: str, token: str) -> tuple[int, dict[str, Any]]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        raw = await self.reader.readexactly(length)
        return status, (json.loads(raw) if raw else {})


async def keep_alive_burst(port: int, token: str, clients: int, rounds: int) -> list[tuple[int, dict[str, Any]]]:
    """``clients`` connections at once, each sending ``rounds`` requests for
    GET /auth/session with ``token`` one after the other."""
    async def one() -> list[tuple[int, dict[str, Any]]]:
        async with KeepAliveClient(port) as c:
            return [await c.get("/auth/session", token) for _ in range(rounds)]

    return [r for results in await asyncio.gather(*(one() for _ in range(clients))) for r in results]


# ---------------------------------------------------------------------------
# the Redis connection pool: a burst waits for a connection, it does not fail
# ---------------------------------------------------------------------------


async def burst_with_bogus_tokens(gw, legit_token: str, *, clients: int) -> None:
    """Many keep-alive clients with a bogus token, and legitimate ones
    beside them: every bogus request is a plain 401, every legitimate one 200."""
    bogus, legit = await asyncio.gather(
        keep_alive_burst(gw.port, BOGUS, clients, 3),
        keep_alive_burst(gw.port, legit_token, 10, 3),
    )
    assert {status for status, _ in bogus} == {401}, [b for b in bogus if b[0] != 401][:3]
    assert {b["error"] for _, b in bogus} == {"unauthenticated"}
    assert [status for status, _ in legit] == [200] * 30, [b for b in legit if b[0] != 200][:3]


@pytest.mark.gen_test(timeout=60)
async def test_150_keep_alive_clients_with_a_bogus_token_do_not_starve_redis(start, redis_url):
    """redis-py's default pool (100 connections) failed at once beyond its size."""
    gw = await start(sessions={"store": "redis", "redis_url": redis_url})
    token = (await gw.client.register())["token"]
    await burst_with_bogus_tokens(gw, token, clients=150)


@pytest.mark.gen_test(timeout=60)
async def test_requests_beyond_a_small_pool_wait_for_a_free_connection(start, redis_url):
    gw = await start(sessions={"store": "redis", "redis_url": redis_url,
                               "redis_max_connections": 3, "redis_pool_timeout": "10s"})
    token = (await gw.client.register())["token"]
    await burst_with_bogus_tokens(gw, token, clients=60)


@pytest.mark.gen_test(timeout=30)
async def test_the_wait_for_a_connection_is_bounded_by_redis_pool_timeout(start, redis_url):
    """With every connection busy past ``redis_pool_timeout``, the answer is
    503 ``unavailable``; a connection freed within it serves the request."""
    gw = await start(sessions={"store": "redis", "redis_url": redis_url, "redis_timeout": "5s",
                               "redis_max_connections": 1, "redis_pool_timeout": "0.2s"})
    token = (await gw.client.register())["token"]
    store = gw.gateway.session_store

    # the pool's only connection is held by a command that blocks for 2 s
    holder = asyncio.ensure_future(store.client.blpop(["gw:test:never-pushed"], timeout=2))
    await asyncio.sleep(0.3)
    r = await gw.client.request("GET", "/auth/session", token=token)
    assert_error(r, 503, "unavailable", contains="session store")
    assert r.headers.get("Retry-After") == "1"
    assert cookie_header(r) is None
    await holder
    assert (await gw.client.request("GET", "/auth/session", token=token)).code == 200

    # a longer pool timeout: the same request waits for the connection instead
    patient = await start(sessions={"store": "redis", "redis_url": redis_url, "redis_timeout": "5s",
                                    "redis_max_connections": 1, "redis_pool_timeout": "10s"})
    holder = asyncio.ensure_future(patient.gateway.session_store.client.blpop(["gw:test:never-pushed"], timeout=1))
    await asyncio.sleep(0.3)
    r = await patient.client.request("GET", "/auth/session", token=token)
    assert r.code == 200, r.body
    await holder


def test_pool_options_are_checked():
    for key, value in (("redis_max_connections", 0), ("redis_max_connections", "many"),
                       ("redis_pool_timeout", 0), ("redis_pool_timeout", "soon")):
        with pytest.raises(ConfigError) as info:
            load_config(data={"sessions": {key: value}})
        assert any(p.startswith(f"sessions.{key}:") for p in info.value.problems), info.value.problems
    sessions = load_config(data={}).sessions
    assert sessions.redis_max_connections == 1000 and sessions.redis_pool_timeout == 1.0


# ---------------------------------------------------------------------------
# a login refused as busy is not an attempt
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_login_refused_as_busy_never_counts_toward_the_lockout(start, session_section):
    gw = await start(sessions=session_section, providers={"password": {
        "time_cost": 2, "memory_cost": 65536, "parallelism": 1, "hash_threads": 1,
        "max_pending_hashes": 1, "max_failures": 10, "max_failures_per_username": 10}})
    await gw.client.register()
    provider = gw.gateway.providers["password"]

    results = await asyncio.gather(*(
        gw.client.request("POST", LOGIN, json_body={"username": "alice", "password": f"wrong guess {i}"})
        for i in range(20)))
    codes = [(r.code, body(r)["error"]) for r in results]
    busy = codes.count((429, "rate_limited"))
    tried = codes.count((401, "invalid_credentials"))
    assert busy >= 1 and busy + tried == 20, codes
    assert tried < 10, codes  # the flood was mostly turned away as busy
    # only the attempts that were verified were counted, from this client and in all
    store = gw.gateway.state
    assert (await store.peek(provider._counter("alice")))[0] == tried
    assert (await store.peek(provider._client_counter("alice", "127.0.0.1")))[0] == tried
    r = await gw.client.request("POST", LOGIN, json_body={"username": "alice", "password": PASSWORD})
    assert r.code == 200, r.body


# ---------------------------------------------------------------------------
# lockout per (username, client), and username-wide only from many clients
# ---------------------------------------------------------------------------


def login_from(gw, ip: str, password: str, username: str = "alice"):
    return gw.client.request("POST", LOGIN, json_body={"username": username, "password": password},
                             headers={"X-Forwarded-For": ip})


@pytest.mark.gen_test(timeout=60)
async def test_one_client_cannot_lock_a_username_out_for_everyone(start, session_section):
    gw = await start(sessions=session_section, server={"trusted_proxies": ["127.0.0.1"]},
                     providers={"password": {"max_failures": 3, "max_failures_per_username": 10,
                                             "lockout_window": "60s"}})
    await gw.client.register()
    attacker, victim = "203.0.113.9", "198.51.100.7"

    for _ in range(3):
        assert_error(await login_from(gw, attacker, "wrong password"), 401, "invalid_credentials")
    # the attacker is locked out of this username, even with the right password...
    for password in ("wrong password", PASSWORD):
        r = await login_from(gw, attacker, password)
        assert_error(r, 429, "locked_out")
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    # ...and however long it keeps trying, those refused attempts lock no one else
    for _ in range(30):
        assert_error(await login_from(gw, attacker, "wrong password"), 429, "locked_out")
    r = await login_from(gw, victim, PASSWORD)
    assert r.code == 200, r.body
    # the victim's own count is separate: its failures do not add to the attacker's lock and vice versa
    assert_error(await login_from(gw, victim, "wrong password"), 401, "invalid_credentials")
    assert (await login_from(gw, victim, PASSWORD)).code == 200
    assert_error(await login_from(gw, attacker, PASSWORD), 429, "locked_out")


@pytest.mark.gen_test(timeout=60)
async def test_many_clients_together_lock_the_username(start, session_section):
    gw = await start(sessions=session_section, server={"trusted_proxies": ["127.0.0.1"]},
                     providers={"password": {"max_failures": 3, "max_failures_per_username": 10,
                                             "lockout_window": "60s"}})
    await gw.client.register()
    await gw.client.register("bob")
    for i in range(10):  # ten clients, one failure each: under every client's own limit
        assert_error(await login_from(gw, f"203.0.113.{i + 1}", "wrong password"), 401, "invalid_credentials")
    # now the username is locked for everybody, a fresh client with the right password too
    r = await login_from(gw, "198.51.100.7", PASSWORD)
    assert_error(r, 429, "locked_out")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert (await login_from(gw, "198.51.100.7", PASSWORD, "bob")).code == 200  # other usernames are not


@pytest.mark.gen_test(timeout=60)
async def test_an_ipv6_client_is_counted_by_its_64(start):
    gw = await start(server={"trusted_proxies": ["127.0.0.1"]},
                     providers={"password": {"max_failures": 3, "lockout_window": "60s"}})
    await gw.client.register()
    for i in range(3):  # one host, three addresses of its /64
        assert_error(await login_from(gw, f"2001:db8:0:1::{i + 1}", "wrong password"), 401, "invalid_credentials")
    assert_error(await login_from(gw, "2001:db8:0:1::99", PASSWORD), 429, "locked_out")
    assert (await login_from(gw, "2001:db8:0:2::1", PASSWORD)).code == 200


@pytest.mark.gen_test
async def test_failed_password_changes_count_per_client_too(start):
    gw = await start(server={"trusted_proxies": ["127.0.0.1"]},
                     providers={"password": {"max_failures": 2, "lockout_window": "60s"}})
    token = (await gw.client.register())["token"]
    change = {"old_password": "not the password", "new_password": "brand new pass"}
    here = {"X-Forwarded-For": "203.0.113.5"}
    for _ in range(2):
        r = await gw.client.request("POST", "/auth/password/change", token=token, json_body=change, headers=here)
        assert_error(r, 401, "invalid_credentials")
    r = await gw.client.request("POST", "/auth/password/change", token=token, headers=here,
                                json_body={**change, "old_password": PASSWORD})
    assert_error(r, 429, "locked_out")
    assert (await login_from(gw, "198.51.100.7", PASSWORD)).code == 200


# ---------------------------------------------------------------------------
# cookie names browsers refuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sessions, mentions", [
    ({"cookie_name": "__Host-gw", "cookie_domain": "example.com"}, "cookie_domain"),
    ({"cookie_name": "__Host-gw", "cookie_secure": False}, "cookie_secure"),
    ({"cookie_name": "__Secure-gw", "cookie_secure": False}, "cookie_secure"),
    ({"cookie_name": "__host-gw", "cookie_domain": "example.com"}, "cookie_domain"),  # browsers ignore case
    ({"cookie_name": "__SECURE-gw", "cookie_secure": False}, "cookie_secure"),
])
def test_prefixed_cookie_names_browsers_refuse_are_config_errors(sessions, mentions):
    with pytest.raises(ConfigError) as info:
        load_config(data={"sessions": sessions})
    problems = [p for p in info.value.problems if p.startswith("sessions.cookie_name:")]
    assert len(problems) == 1, info.value.problems
    assert mentions in problems[0]


@pytest.mark.parametrize("sessions", [
    {"cookie_name": "__Host-gw"},
    {"cookie_name": "__Secure-gw", "cookie_domain": "example.com"},
    {"cookie_name": "gw_host", "cookie_secure": False, "cookie_domain": "example.com"},
])
def test_prefixed_cookie_names_browsers_accept_are_fine(sessions):
    assert load_config(data={"sessions": sessions}).sessions.cookie_name == sessions["cookie_name"]


def test_check_config_refuses_a_host_cookie_with_a_domain(tmp_path):
    conf = tmp_path / "gateway.toml"
    conf.write_text('[sessions]\ncookie_name = "__Host-gw"\ncookie_domain = "example.com"\n'
                    'cookie_secure = false\n')
    proc = subprocess.run([sys.executable, str(ROOT / "bin" / "gateway"), "check-config", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    out = proc.stdout + proc.stderr
    assert "sessions.cookie_name: a __Host- cookie requires sessions.cookie_secure" in out
    assert "sessions.cookie_name: a __Host- cookie cannot have a Domain" in out


# ---------------------------------------------------------------------------
# a token in its rotation grace; refresh-token reuse
# ---------------------------------------------------------------------------


class Revocations:
    """A plugin recording every session end and its reason."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    @hookimpl
    def gateway_session_revoked(self, session, reason):
        self.ended.append((session.id, reason))


async def refreshed(gw, token: str) -> str:
    r = await gw.client.request("POST", "/auth/refresh", token=token)
    assert r.code == 200, r.body
    return body(r)["token"]


@pytest.mark.gen_test(timeout=30)
async def test_a_token_in_its_grace_works_for_proxied_requests_and_session_info_only(start, session_section, upstream):
    gw = await start(sessions={**session_section, "rotation_grace": "30s"})
    reg = await gw.client.register()
    other = await gw.client.login()  # a second session of the same user
    old = reg["token"]
    new = await refreshed(gw, old)

    assert (await gw.client.request("GET", "/auth/session", token=old)).code == 200
    r = await gw.client.request("GET", "/api/orders", token=old)
    assert r.code == 200, r.body
    assert upstream.last.header("X-Session-Id") == reg["session"]["id"]

    refused = [
        ("POST", "/auth/logout-all", None),
        ("GET", "/auth/sessions", None),
        ("DELETE", f"/auth/sessions/{other['session']['id']}", None),
        ("DELETE", f"/auth/sessions/{reg['session']['id']}", None),
        ("POST", "/auth/password/change", {"old_password": PASSWORD, "new_password": "brand new pass"}),
    ]
    for method, path, payload in refused:
        r = await gw.client.request(method, path, token=old, json_body=payload)
        assert_error(r, 401, "unauthenticated", contains="newer token")
    # none of them did anything
    for token in (old, new, other["token"]):
        assert (await gw.client.request("GET", "/auth/session", token=token)).code == 200
    assert (await gw.client.login()).get("token")  # the password is unchanged

    # the current token may do all of it
    r = await gw.client.request("GET", "/auth/sessions", token=new)
    assert r.code == 200 and len(body(r)["sessions"]) == 3
    r = await gw.client.request("DELETE", f"/auth/sessions/{other['session']['id']}", token=new)
    assert r.code == 204
    r = await gw.client.request("POST", "/auth/password/change", token=new,
                                json_body={"old_password": PASSWORD, "new_password": "brand new pass"})
    assert r.code == 204, r.body
    r = await gw.client.request("POST", "/auth/logout-all", token=new)
    assert r.code == 204
    assert (await gw.client.request("GET", "/auth/session", token=new)).code == 401


@pytest.mark.gen_test
async def test_logout_with_a_token_in_its_grace_ends_the_session(start, session_section):
    gw = await start(sessions={**session_section, "rotation_grace": "30s"})
    reg = await gw.client.register()
    new = await refreshed(gw, reg["token"])
    assert (await gw.client.request("POST", "/auth/logout", token=reg["token"])).code == 204
    assert (await gw.client.request("GET", "/auth/session", token=new)).code == 401
    assert await gw.gateway.session_store.get(reg["session"]["id"]) is None


@pytest.mark.gen_test(timeout=30)
async def test_refreshing_with_a_replaced_token_in_its_grace_ends_the_session(start, session_section):
    recorder = Revocations()
    pm = get_plugin_manager(extra_plugins=[("revocations", recorder)])
    gw = await start(pm=pm, sessions={**session_section, "rotation_grace": "30s", "refresh_race_window": "0.2s"})
    reg = await gw.client.register()
    sid = reg["session"]["id"]
    new = await refreshed(gw, reg["token"])
    await asyncio.sleep(0.3)  # past the race window, well within the grace

    assert (await gw.client.request("GET", "/auth/session", token=reg["token"])).code == 200  # in its grace
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert_error(r, 401, "unauthenticated", contains="session has ended")
    for token in (reg["token"], new):  # the thief's copy and the owner's both stop working
        assert (await gw.client.request("GET", "/auth/session", token=token)).code == 401
        assert (await gw.client.request("GET", "/api/x", token=token)).code == 401
    assert await gw.gateway.session_store.get(sid) is None
    assert recorder.ended == [(sid, "revoked")]


@pytest.mark.gen_test(timeout=30)
async def test_refreshing_with_a_replaced_token_after_its_grace_ends_the_session(start, session_section):
    recorder = Revocations()
    pm = get_plugin_manager(extra_plugins=[("revocations", recorder)])
    gw = await start(pm=pm, sessions={**session_section, "rotation_grace": "0.3s", "refresh_race_window": "0.3s"})
    reg = await gw.client.register()
    sid = reg["session"]["id"]
    first = await refreshed(gw, reg["token"])
    newest = await refreshed(gw, first)
    await asyncio.sleep(0.5)
    assert (await gw.client.request("GET", "/auth/session", token=reg["token"])).code == 401  # past its grace
    assert (await gw.client.request("GET", "/auth/session", token=newest)).code == 200

    # the token of two rotations ago, long past its grace, replayed
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert_error(r, 401, "unauthenticated", contains="session has ended")
    assert (await gw.client.request("GET", "/auth/session", token=newest)).code == 401
    assert recorder.ended == [(sid, "revoked")]

    # an unknown token is a plain 401 that ends nothing
    other = await gw.client.login()
    r = await gw.client.request("POST", "/auth/refresh", token=BOGUS)
    assert_error(r, 401, "unauthenticated")
    assert (await gw.client.request("GET", "/auth/session", token=other["token"])).code == 200
    assert recorder.ended == [(sid, "revoked")]


@pytest.mark.gen_test(timeout=30)
async def test_a_replayed_refresh_cookie_ends_the_session_and_clears_the_cookie(start, session_section):
    gw = await start(sessions={**session_section, "rotation_grace": "30s", "refresh_race_window": 0})
    reg = await gw.client.register()
    new = await refreshed(gw, reg["token"])
    stale = {"Cookie": f"gw_session={reg['token']}"}

    # a cross-site page cannot use the stale cookie to end the session
    r = await gw.client.request("POST", "/auth/refresh", headers=stale)
    assert_error(r, 403, "csrf")
    assert (await gw.client.request("GET", "/auth/session", token=new)).code == 200

    r = await gw.client.request("POST", "/auth/refresh", headers={**stale, "X-Requested-With": "fetch"})
    assert_error(r, 401, "unauthenticated", contains="session has ended")
    assert cookie_header(r) is not None and cookie_value(r) in ("", '""')
    assert (await gw.client.request("GET", "/auth/session", token=new)).code == 401


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_refreshes_with_one_token_are_no_reuse(start, session_section):
    """Refreshes sent together with one token (two browser tabs) lose the
    race with 401; they do not end the session that the winner renewed."""
    gw = await start(sessions=session_section)
    reg = await gw.client.register()
    results = await asyncio.gather(*(gw.client.request("POST", "/auth/refresh", token=reg["token"])
                                     for _ in range(5)))
    assert sorted(r.code for r in results) == [200, 401, 401, 401, 401]
    for r in results:
        if r.code == 401:
            assert_error(r, 401, "unauthenticated", contains="newer token")
    winner = next(body(r)["token"] for r in results if r.code == 200)
    assert (await gw.client.request("GET", "/auth/session", token=winner)).code == 200
    assert (await gw.gateway.session_store.get(reg["session"]["id"]))["token_hash"] == hash_token(winner)


@pytest.mark.gen_test(timeout=30)
async def test_a_replaced_token_within_the_race_window_is_refused_without_ending_the_session(start, session_section):
    gw = await start(sessions={**session_section, "rotation_grace": "30s", "refresh_race_window": "30s"})
    reg = await gw.client.register()
    new = await refreshed(gw, reg["token"])
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert_error(r, 401, "unauthenticated", contains="newer token")
    assert (await gw.client.request("GET", "/auth/session", token=new)).code == 200
    # only the token replaced last is ever taken for a racing one
    newest = await refreshed(gw, new)
    r = await gw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert_error(r, 401, "unauthenticated", contains="session has ended")
    assert (await gw.client.request("GET", "/auth/session", token=newest)).code == 401
