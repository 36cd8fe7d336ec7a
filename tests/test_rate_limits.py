"""``[[rate_limits]]``: 429 with Retry-After and the RateLimit headers, per
client address, user, API key or session, shared by every gateway on one
Redis; the default limit on logins; a shared state that is down."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.config import load_config
from gateway.options import ConfigError
from gateway.testing import (
    Client,
    RecordingHandler,
    RedisServer,
    Upstream,
    assert_error,
    base_config,
    body,
    merge_config,
)
from password_support import GATEWAY_DEFAULTS, GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
STATE = re.compile(r'^"(?P<name>[a-z0-9_]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')
LOGIN = "/auth/password/login"
PASSWORD = "correct horse"


@pytest.fixture
def gateway_defaults() -> dict[str, Any]:
    """The tests' defaults, less any ``rate_limits``: these tests see the gateway's own default."""
    return {k: v for k, v in merge_config({}, GATEWAY_DEFAULTS).items() if k != "rate_limits"}


def limit(name: str, match: str, count: int, **more: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "limit": count, "window": "60s", **more}


def remaining(r: Any) -> tuple[str, int, int]:
    """``(name, r, t)`` of a response's one-item ``RateLimit`` header."""
    found = STATE.match(r.headers.get("RateLimit", ""))
    assert found is not None, dict(r.headers.get_all())
    return found["name"], int(found["r"]), int(found["t"])


def limited_total(name: str) -> float:
    return REGISTRY.get_sample_value("gateway_rate_limited_total", {"limit": name}) or 0.0


def at(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


# ---------------------------------------------------------------------------
# over and under, with headers
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_under_the_limit_headers_over_it_429(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, rate_limits=[limit("api", "/api/", 3, key="user")]))
    token = (await gw.client.register())["token"]
    before = limited_total("api")

    seen = []
    for _ in range(3):
        r = await gw.client.request("GET", "/api/x", token=token)
        assert r.code == 200, r.body
        assert r.headers["RateLimit-Policy"] == '"api";q=3;w=60'
        name, left, reset = remaining(r)
        assert name == "api" and 1 <= reset <= 60
        seen.append(left)
    assert seen == [2, 1, 0]
    assert len(upstream.seen) == 3

    r = await gw.client.request("GET", "/api/x", token=token)
    assert_error(r, 429, "rate_limited")
    answer = body(r)
    assert answer["limit"] == "api"
    assert 1 <= answer["retry_after"] <= 20 and r.headers["Retry-After"] == str(answer["retry_after"])
    assert r.headers["RateLimit-Policy"] == '"api";q=3;w=60'
    assert remaining(r) == ("api", 0, answer["retry_after"])
    assert len(upstream.seen) == 3  # never forwarded
    assert limited_total("api") == before + 1

    # routes and endpoints without a limit: no headers at all
    for path in ("/public/x", "/opt/x"):
        r = await gw.client.request("GET", path, token=token)
        assert r.code == 200 and "RateLimit" not in r.headers and "RateLimit-Policy" not in r.headers
    r = await gw.client.request("GET", "/auth/session", token=token)
    assert r.code == 200 and "RateLimit" not in r.headers
    r = await gw.client.login(headers=at("203.0.113.1"))  # configured limits replace the default on logins
    assert "token" in r


@pytest.mark.gen_test(timeout=60)
async def test_a_limit_covers_every_route_its_match_begins(make_gateway, upstream, tmp_path):
    config = base_config(upstream.url, tmp_path, rate_limits=[limit("all", "/", 3)])
    gw = await make_gateway(config)
    codes = [(await gw.client.request("GET", path)).code for path in ("/public/a", "/opt/b", "/public/c", "/opt/d")]
    assert codes == [200, 200, 200, 429]


class LimitingUpstream(RecordingHandler):
    """An upstream with RateLimit headers of its own."""

    def set_default_headers(self) -> None:
        self.set_header("RateLimit-Policy", '"upstream";q=10;w=60')
        self.set_header("RateLimit", '"upstream";r=9;t=6')


@pytest.mark.gen_test(timeout=60)
async def test_proxied_answers_carry_both_the_gateways_and_the_upstreams_items(make_gateway, tmp_path):
    up = Upstream.start(LimitingUpstream)
    try:
        gw = await make_gateway(base_config(up.url, tmp_path, sessions={"allowed_origins": ["https://app.example"]},
                                            rate_limits=[limit("edge", "/public/", 5)]))
        for path in ("/public/x", "/public/stream"):
            r = await gw.client.request("GET", path, headers={"Origin": "https://app.example"})
            assert r.code == 200, r.body
            assert r.headers.get_list("RateLimit-Policy") == ['"edge";q=5;w=60', '"upstream";q=10;w=60']
            assert r.headers.get_list("RateLimit")[1] == '"upstream";r=9;t=6'
            exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
            assert {"ratelimit", "ratelimit-policy"} <= exposed
    finally:
        up.stop()


# ---------------------------------------------------------------------------
# what is counted
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_per_client_address_an_ipv6_client_by_its_64(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, server={"trusted_proxies": ["127.0.0.1"]},
                                        rate_limits=[limit("by_ip", "/public/", 2)]))

    async def code(ip: str) -> int:
        return (await gw.client.request("GET", "/public/x", headers=at(ip))).code

    assert [await code("203.0.113.1") for _ in range(3)] == [200, 200, 429]
    assert await code("203.0.113.2") == 200
    assert [await code(f"2001:db8:0:1::{i}") for i in (1, 2, 3)] == [200, 200, 429]  # one /64
    assert await code("2001:db8:0:2::1") == 200


@pytest.mark.gen_test(timeout=60)
async def test_per_user_and_per_session(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, routes=[
        {"prefix": "/u/", "upstream": upstream.url}, {"prefix": "/s/", "upstream": upstream.url}],
        rate_limits=[limit("per_user", "/u/", 2, key="user"), limit("per_session", "/s/", 2, key="session")]))
    first = (await gw.client.register())["token"]
    second = (await gw.client.login())["token"]
    bob = (await gw.client.register("bob"))["token"]

    async def code(path: str, token: str | None) -> int:
        return (await gw.client.request("GET", path, token=token)).code

    # a user's sessions share the user's limit...
    assert [await code("/u/x", t) for t in (first, second, first)] == [200, 200, 429]
    assert await code("/u/x", bob) == 200
    # ...and each session has its own
    assert [await code("/s/x", first) for _ in range(3)] == [200, 200, 429]
    assert await code("/s/x", second) == 200
    assert await code("/s/x", None) == 401  # refused before any limit counts it


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.gen_test(timeout=90)
async def test_per_credential_an_api_key_sessions_uncounted(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, providers={"apikey": {}},
                                        rate_limits=[limit("keys", "/api/", 2, key="credential")]))
    registered = await gw.client.register()
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f'[profiles]\nstore = "sqlite"\nsqlite_path = {json.dumps(str(tmp_path / "profiles.db"))}\n')
    keys = []
    for name in ("bot", "other bot"):
        code, out, err = await cli("apikey", "create", "--config", str(config_path),
                                   "--user", registered["user"]["id"], "--name", name)
        assert code == 0, err
        keys.append(next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("key:")))

    codes = [(await gw.client.request("GET", "/api/x", headers={"X-API-Key": keys[0]})).code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = await gw.client.request("GET", "/api/x", headers={"X-API-Key": keys[1]})  # each key of a user apart
    assert r.code == 200 and remaining(r)[:2] == ("keys", 1)
    for _ in range(3):  # the same user's session is not an API key
        r = await gw.client.request("GET", "/api/x", token=registered["token"])
        assert r.code == 200 and "RateLimit" not in r.headers


@pytest.mark.gen_test(timeout=60)
async def test_an_endpoint_limit_by_user_resolves_the_caller(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, rate_limits=[
        limit("whoami", "/auth/session", 2, key="user"), limit("refresh", "/auth/refresh", 1, key="session")]))
    token = (await gw.client.register())["token"]
    codes = [(await gw.client.request("GET", "/auth/session", token=token)).code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert (await gw.client.request("GET", "/auth/session")).code == 401  # no caller: not counted, and refused

    r = await gw.client.request("POST", "/auth/refresh", token=token)
    assert r.code == 200, r.body
    assert remaining(r)[:2] == ("refresh", 0)
    newer = body(r)["token"]
    assert_error(await gw.client.request("POST", "/auth/refresh", token=newer), 429, "rate_limited")


# ---------------------------------------------------------------------------
# shared by gateways on one Redis
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_two_gateways_on_one_redis_share_the_limit(make_gateway, upstream, tmp_path, redis_url):
    config = base_config(upstream.url, tmp_path, sessions={"store": "redis", "redis_url": redis_url},
                         rate_limits=[limit("shared", "/public/", 4)])
    a = await make_gateway(config)
    b = await make_gateway(config)
    answers = [await gw.client.request("GET", "/public/x") for gw in (a, b, a, b, a, b)]
    assert [r.code for r in answers] == [200, 200, 200, 200, 429, 429]
    assert [remaining(r)[1] for r in answers[:4]] == [3, 2, 1, 0]


@pytest.mark.gen_test(timeout=90)
async def test_two_gateway_processes_on_one_redis_share_the_limit(upstream, tmp_path, redis_url):
    """Two separate ``gateway serve`` processes with the same [[rate_limits]]
    entry: the limit counts the requests through both, and once it is over
    either one answers 429 with Retry-After and the RateLimit headers."""
    shared = {"sessions": {"store": "redis", "redis_url": redis_url}, "admin": {"port": 0},
              "rate_limits": [limit("shared", "/public/", 4)]}
    routes = [{"prefix": "/public/", "upstream": upstream.url, "auth": "public"}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with GatewayProcess(tmp_path / "a", routes, **shared) as a, \
            GatewayProcess(tmp_path / "b", routes, **shared) as b:
        assert a.pid != b.pid
        clients = [Client(a.url), Client(b.url)]
        try:
            answers = [await clients[i % 2].request("GET", f"/public/x{i}") for i in range(6)]
        finally:
            for client in clients:
                client.close()
    assert [r.code for r in answers] == [200, 200, 200, 200, 429, 429]
    assert [remaining(r)[1] for r in answers[:4]] == [3, 2, 1, 0]
    assert len(upstream.seen) == 4  # the refused ones never went upstream
    for r in answers[4:]:  # one refusal from each process
        assert_error(r, 429, "rate_limited")
        answer = body(r)
        assert answer["limit"] == "shared" and 1 <= answer["retry_after"] <= 60
        assert r.headers["Retry-After"] == str(answer["retry_after"])
        assert r.headers["RateLimit-Policy"] == '"shared";q=4;w=60'
        assert remaining(r) == ("shared", 0, answer["retry_after"])


# ---------------------------------------------------------------------------
# the default limit on logins
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_default_login_limit_per_client_address(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, server={"trusted_proxies": ["127.0.0.1"]}))
    r = await gw.client.request("POST", "/auth/password/register", json_body={"username": "alice", "password": PASSWORD},
                                headers=at("198.51.100.1"))
    assert r.code == 201 and remaining(r)[:2] == ("login", 19)  # a registration is a login too
    token = body(r)["token"]
    r = await gw.client.request("POST", LOGIN, json_body={"username": "alice", "password": "wrong"},
                                headers=at("198.51.100.2"))
    assert r.code == 401 and remaining(r)[:2] == ("login", 19)  # so is a refused one

    before = limited_total("login")
    creds = {"username": "alice", "password": PASSWORD}
    for _ in range(20):
        r = await gw.client.request("POST", LOGIN, json_body=creds, headers=at("203.0.113.7"))
        assert r.code == 200, r.body
        assert r.headers["RateLimit-Policy"] == '"login";q=20;w=60'
    for _ in range(20):  # (a slow machine gives one back every 3 s)
        r = await gw.client.request("POST", LOGIN, json_body=creds, headers=at("203.0.113.7"))
        if r.code != 200:
            break
    assert_error(r, 429, "rate_limited")
    assert body(r)["limit"] == "login" and 1 <= int(r.headers["Retry-After"]) <= 3
    assert limited_total("login") == before + 1
    # per client; the other endpoints are not limited
    assert (await gw.client.request("POST", LOGIN, json_body=creds, headers=at("203.0.113.8"))).code == 200
    r = await gw.client.request("GET", "/auth/session", token=token, headers=at("203.0.113.7"))
    assert r.code == 200 and "RateLimit" not in r.headers
    # a wrong method or a CORS preflight is no login, and is not counted
    for method in ("GET", "OPTIONS"):
        r = await gw.client.request(method, LOGIN, headers=at("203.0.113.7"))
        assert r.code == 405 and "RateLimit" not in r.headers, (method, r.code)


@pytest.mark.gen_test(timeout=90)
async def test_an_empty_rate_limits_turns_the_default_off(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path, rate_limits=[]))
    await gw.client.register()
    for _ in range(25):
        r = await gw.client.request("POST", LOGIN, json_body={"username": "alice", "password": PASSWORD})
        assert r.code == 200 and "RateLimit" not in r.headers


# ---------------------------------------------------------------------------
# the shared state down
# ---------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path):
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.mark.gen_test(timeout=60)
async def test_store_down_deny_answers_503_allow_serves(make_gateway, upstream, tmp_path, own_redis, caplog):
    config = base_config(
        upstream.url, tmp_path, sessions={"store": "redis", "redis_url": own_redis.url, "redis_timeout": "0.3s"},
        routes=[{"prefix": "/public/", "upstream": upstream.url, "auth": "public"},
                {"prefix": "/strict/", "upstream": upstream.url, "auth": "public"}],
        rate_limits=[limit("lenient", "/public/", 100, on_store_error="allow"),
                     limit("strict", "/strict/", 100, on_store_error="deny"),
                     limit("docs", "/auth/openapi.json", 100)])  # an endpoint: deny by default
    gw = await make_gateway(config)
    for path in ("/public/x", "/strict/x", "/auth/openapi.json"):
        r = await gw.client.request("GET", path)
        assert r.code == 200 and "RateLimit" in r.headers, (path, r.code)

    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
        for _ in range(3):
            r = await gw.client.request("GET", "/public/x")
            assert r.code == 200 and "RateLimit" not in r.headers  # served, uncounted
    logged = [rec for rec in caplog.records if rec.name == "gateway.ratelimit"]
    assert 1 <= len(logged) <= 3 and "lenient" in logged[0].getMessage()
    for path in ("/strict/x", "/auth/openapi.json"):
        r = await gw.client.request("GET", path)
        assert_error(r, 503, "unavailable")
        assert r.headers["Retry-After"] == "1"


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def test_bad_rate_limits_are_refused_naming_the_key(tmp_path):
    config = base_config("http://127.0.0.1:9", tmp_path, rate_limits=[
        limit("api", "/api/", 3), limit("api", "/opt/", 3), limit("Bad-Name", "/nowhere/", 0, window="1.5s"),
        {"name": "x", "match": "/api/", "limit": 1, "window": "1m", "key": "cookie", "extra": 1}])
    with pytest.raises(ConfigError) as caught:
        load_config(data=config, environ={})
    text = "\n".join(caught.value.problems)
    for expected in ("rate_limits[1].name", "rate_limits[2].name", "rate_limits[2].limit", "rate_limits[2].window",
                     "rate_limits[3].key", "rate_limits[3].extra"):
        assert expected in text, text
    with pytest.raises(ConfigError, match=r"rate_limits\[0\].match"):
        load_config(data={**base_config("http://127.0.0.1:9", tmp_path), "rate_limits": [limit("x", "/nowhere/", 1)]},
                    environ={})


@pytest.mark.gen_test
async def test_a_limit_on_no_endpoint_is_a_start_up_error(make_gateway, upstream, tmp_path):
    with pytest.raises(ConfigError, match=r"rate_limits\[0\].match.*/auth/password/logon"):
        await make_gateway(base_config(upstream.url, tmp_path, rate_limits=[limit("x", "/auth/password/logon", 1)]))
