"""A Redis outage: 503 for what needs a session, cookies kept, public routes
served, and service back on its own when Redis returns."""

from __future__ import annotations

import pytest

from gateway.testing import RedisServer, base_config, body, cookie_header


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


@pytest.mark.gen_test(timeout=30)
async def test_outage_answers_503_keeps_cookie_and_recovers(make_gateway, upstream, tmp_path, own_redis):
    config = base_config(upstream.url, tmp_path, sessions={"store": "redis", "redis_url": own_redis.url,
                                                           "redis_timeout": "0.3s"})
    gw = await make_gateway(config)
    reg = await gw.client.register()
    token = reg["token"]
    cookie = {"Cookie": f"gw_session={token}"}
    assert (await gw.client.request("GET", "/api/x", headers=cookie)).code == 200

    own_redis.stop()

    r = await gw.client.request("GET", "/api/x", headers=cookie)
    assert r.code == 503
    assert body(r)["error"] == "unavailable"
    assert r.headers.get("Retry-After")
    assert cookie_header(r) is None  # the cookie is not cleared: an outage logs no one out
    r = await gw.client.request("GET", "/auth/session", token=token)
    assert r.code == 503 and body(r)["error"] == "unavailable"
    r = await gw.client.request("POST", "/auth/password/login",
                                json_body={"username": "alice", "password": "correct horse"})
    assert r.code == 503 and body(r)["error"] == "unavailable"
    assert (await gw.client.request("GET", "/public/x")).code == 200
    count_before = len(upstream.seen)

    own_redis.start()

    r = await gw.client.request("GET", "/api/x", headers=cookie)
    assert r.code == 200, r.body
    assert len(upstream.seen) == count_before + 1
    assert upstream.last.header("X-User-Id") == reg["user"]["id"]
