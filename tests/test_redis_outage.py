"""A Redis outage: 503 for what needs a session, cookies kept, public routes
served, and service back on its own when Redis returns."""

from __future__ import annotations

import subprocess

import pytest

from conftest import RedisServer, base_config, body, cookie_header


class PersistentRedis(RedisServer):
    """A redis-server whose data survives a restart on the same port."""

    def start(self) -> None:
        import shutil
        import socket
        import time

        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")


@pytest.fixture
def own_redis(tmp_path):
    server = PersistentRedis(tmp_path)
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
