"""Failovers under load: a gateway on Redis Sentinel or Redis Cluster loses
its primary in the middle of a stream of proxied requests and logins.

What clients see: 200, or a quick 503 ``unavailable`` (never another 5xx,
never an answer slower than about a second); the sessions made before the
failover still work afterwards with the same token; and service resumes on
its own once a replica has been promoted, without restarting the gateway.

Each test starts its own Redis setup (it kills a node of it); the
sentinel one runs with an ACL user and a password on the sentinels, given
through ``redis_sentinel_password_env``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from gateway.testing import RunningGateway, base_config, body
from gateway.testing.redis_modes import RedisCluster, RedisSentinels

#: what no answer may take, failover or not (about 1 s, with room for a noisy shared machine)
SLOWEST = 2.0
#: how long service may take to resume after the kill
RECOVERY = 30.0
USERS = 4
WORKERS = 4


@dataclass
class Load:
    """Answers by status and each request's duration, while the load runs."""

    gw: RunningGateway
    tokens: list[str]
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    slowest: tuple[float, str] = (0.0, "")
    bad: list[str] = field(default_factory=list)
    stopped: bool = False
    sent: int = 0

    async def one(self, kind: str, i: int) -> int:
        started = time.monotonic()
        if kind == "proxied":
            r = await self.gw.client.request("GET", f"/api/orders/{i}", token=self.tokens[i % len(self.tokens)])
        else:
            r = await self.gw.client.request("POST", "/auth/password/login",
                                             json_body={"username": f"user{i % len(self.tokens)}",
                                                        "password": "correct horse"})
        took = time.monotonic() - started
        self.sent += 1
        self.statuses[(kind, r.code)] += 1
        if took > self.slowest[0]:
            self.slowest = (took, f"{kind} -> {r.code}")
        if r.code >= 500:
            try:
                error = body(r).get("error")
            except (ValueError, AttributeError):
                error = None
            if r.code != 503 or error != "unavailable":
                self.bad.append(f"{kind}: {r.code} {r.body[:200]!r}")
        return r.code

    async def worker(self, n: int) -> None:
        i = n
        while not self.stopped:
            await self.one("login" if i % 4 == 3 else "proxied", i)
            i += WORKERS


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking harness call (kill, wait) without stalling the gateway in this loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def failover_under_load(gw: RunningGateway, upstream: Any, sync: Callable[[], None],
                              kill: Callable[[], int], wait_failover: Callable[[int], int]) -> None:
    users = []
    for i in range(USERS):
        users.append(await gw.client.register(f"user{i}", "correct horse"))
    tokens = [u["token"] for u in users]
    for token in tokens:
        assert (await gw.client.request("GET", "/api/before", token=token)).code == 200
    await in_thread(sync)  # the replicas hold every session (WAIT 1 on the primaries)

    load = Load(gw, tokens)
    workers = [asyncio.ensure_future(load.worker(n)) for n in range(WORKERS)]
    try:
        await asyncio.sleep(0.5)
        before_kill = load.sent
        killed_at = time.monotonic()
        killed = await in_thread(kill)
        await in_thread(wait_failover, killed)
        elected = time.monotonic() - killed_at
        during = load.sent - before_kill

        # service resumes on its own: every old session and a fresh login answer 200
        deadline = time.monotonic() + RECOVERY
        while True:
            codes = [(await gw.client.request("GET", "/api/after", token=t)).code for t in tokens]
            login = await gw.client.request("POST", "/auth/password/login",
                                            json_body={"username": "user0", "password": "correct horse"})
            if codes == [200] * len(tokens) and login.code == 200:
                break
            assert time.monotonic() < deadline, f"not recovered within {RECOVERY:g} s: {codes} {login.code}"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - killed_at
        await asyncio.sleep(0.5)  # the load goes on a little on the new primary
    finally:
        load.stopped = True
        await asyncio.gather(*workers, return_exceptions=True)

    print(f"primary killed; new one elected after {elected:.1f} s, service back after {recovered:.1f} s; "
          f"{load.sent} requests ({during} during the failover): {dict(load.statuses)}; "
          f"slowest answer {load.slowest[0] * 1000:.0f} ms ({load.slowest[1]})")
    assert not load.bad, load.bad[:5]
    assert set(code for _, code in load.statuses) <= {200, 503}, load.statuses
    assert load.slowest[0] < SLOWEST, load.slowest
    assert during > 0, "no request was sent during the failover"
    assert load.statuses[("proxied", 200)] and load.statuses[("login", 200)]

    # the sessions made before the failover: same token, same user, same session
    for user, token in zip(users, tokens):
        r = await gw.client.request("GET", "/api/check", token=token)
        assert r.code == 200, r.body
        assert upstream.last.header("X-User-Id") == user["user"]["id"]
        r = await gw.client.request("GET", "/auth/session", token=token)
        assert r.code == 200 and json.loads(r.body)["session"]["id"] == user["session"]["id"], r.body


@pytest.fixture
def own_sentinels(tmp_path):
    """A primary, a replica and three sentinels of this test's own: it kills the primary.
    Replication and the gateway authenticate as an ACL user; the sentinels have a password."""
    s = RedisSentinels(tmp_path / "sentinels", auth=("gateway", "acl-pass-1"), sentinel_password="sentinel-pass-1")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def own_cluster(tmp_path):
    """A Redis Cluster of this test's own: it kills a primary."""
    c = RedisCluster(tmp_path / "cluster")
    c.start()
    yield c
    c.stop()


@pytest.mark.gen_test(timeout=90)
async def test_sentinel_failover_under_load(make_gateway, upstream, tmp_path, own_sentinels, caplog):
    sessions = {"store": "redis", "redis_url": own_sentinels.url, "redis_sentinels": own_sentinels.sentinels,
                "redis_sentinel_master": own_sentinels.master, "redis_sentinel_password_env": "GW_SENTINEL_PASSWORD"}
    gw = await make_gateway(base_config(upstream.url, tmp_path, sessions=sessions),
                            environ={"GW_SENTINEL_PASSWORD": "sentinel-pass-1"})
    await failover_under_load(gw, upstream, own_sentinels.sync_replica, own_sentinels.kill_primary,
                              own_sentinels.wait_failover)
    logged = caplog.text
    assert "acl-pass-1" not in logged and "sentinel-pass-1" not in logged


@pytest.mark.gen_test(timeout=90)
async def test_cluster_failover_under_load(make_gateway, upstream, tmp_path, own_cluster):
    sessions = {"store": "redis", "redis_url": own_cluster.urls[:2], "redis_cluster": True}
    gw = await make_gateway(base_config(upstream.url, tmp_path, sessions=sessions))
    # the first seed is the primary killed: the client finds the cluster through the other
    first = own_cluster.ports[0]
    assert first in own_cluster.primaries()
    await failover_under_load(gw, upstream, own_cluster.sync_replicas, lambda: own_cluster.kill_primary(first),
                              own_cluster.wait_failover)
