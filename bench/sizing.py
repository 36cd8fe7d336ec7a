"""Redis sizing of the session store: bytes per session and round trips per request.

Run by hand (not part of the test suite)::

    .venv/bin/python bench/sizing.py [--sessions 10000]

It starts its own redis-server (no persistence) on a free loopback port and
a gateway in this process (sessions in that Redis, profiles in SQLite in a
temporary directory, the password provider, the default rate limits), and
prints:

- ``MEMORY USAGE`` of every key of one session made by a password login
  (``s:``, ``t:``, ``e:``, ``u:``, the ``o`` shard), then of the same
  session after one ``/refresh`` (the replaced token's ``t:`` until its
  grace ends, its ``r:`` and ``e:``), then of what its logout leaves (the
  ``revoked`` markers);
- ``used_memory`` (``INFO memory``) before and after creating ``--sessions``
  sessions of as many users through the session manager, each like the
  login's: bytes per session and sessions per GiB;
- Redis round trips (``total_reads_processed``, which counts a client's
  command, or pipeline, arriving at once as one) and commands (``INFO
  commandstats``; a script's own calls are counted too) per request kind:
  an authenticated proxied request without a touch and with one, a login,
  a refresh, a logout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.sessions.base import slot_tag  # noqa: E402
from gateway.sessions.manager import SessionManager  # noqa: E402
from gateway.sessions.redis import RedisSessionStore  # noqa: E402
from gateway.testing import GatewayFactory, RedisServer, Upstream, base_config  # noqa: E402

#: cheap password hashing: hashing costs no Redis
FAST_ARGON2 = {"time_cost": 1, "memory_cost": 64, "parallelism": 1}
#: requests of each kind averaged over
REQUESTS = 5
USER_AGENT = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
              "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")


def memory_of(client: redis.Redis, keys: list[str]) -> dict[str, int]:
    return {k: int(client.memory_usage(k, samples=0) or 0) for k in sorted(keys)}


def stats(client: redis.Redis) -> tuple[dict[str, int], int]:
    info = client.info("all")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()
             if name.startswith("cmdstat_") and not name.startswith(("cmdstat_info", "cmdstat_config"))}
    return calls, int(info["total_reads_processed"])


async def per_request(client: redis.Redis, label: str, call: Any, n: int = REQUESTS) -> dict[str, Any]:
    """Redis round trips and commands per ``await call(i)``, over ``n`` calls."""
    await asyncio.sleep(0.1)
    before, reads_before = stats(client)
    for i in range(n):
        await call(i)
    await asyncio.sleep(0.1)
    after, reads_after = stats(client)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: round(v / n, 2) for k, v in delta.items() if v}
    reads = (reads_after - reads_before - 1) / n  # less the second INFO's own read
    return {"kind": label, "round_trips": reads, "commands": delta}


def show_keys(title: str, sizes: dict[str, int], users_per_shard: float) -> int:
    print(f"\n{title}")
    total = 0.0
    for key, size in sizes.items():
        share = size / users_per_shard if key.endswith(":o") else size
        total += share
        note = f"  (shared by ~{users_per_shard:g} users: {share:.0f} each)" if key.endswith(":o") else ""
        print(f"  {size:6d}  {key[:90]}{note}")
    print(f"  {total:6.0f}  bytes in all")
    return int(total)


async def main(sessions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        upstream = Upstream.start()
        factory = GatewayFactory()
        try:
            config = base_config(upstream.url, Path(tmp), providers={"password": FAST_ARGON2},
                                 sessions={"store": "redis", "redis_url": server.url, "rotation_grace": "30s"})
            gw = await factory.start(config)
            touching = await factory.start(base_config(upstream.url, Path(tmp), providers={"password": FAST_ARGON2},
                                                       sessions={"store": "redis", "redis_url": server.url,
                                                                 "touch_interval": "0s"}))
            http = gw.client

            async def post(path: str, body: Any = None, token: str | None = None, expect: int = 200) -> Any:
                r = await http.request("POST", path, json_body=body, token=token,
                                       headers={"User-Agent": USER_AGENT})
                assert r.code == expect, (path, r.code, r.body)
                return json.loads(r.body) if r.body else None

            # -- one session, key by key ------------------------------------------
            client.flushall()
            reg = await post("/auth/password/register", {"username": "alice", "password": "correct horse"},
                             expect=201)
            user_id = reg["user"]["id"]
            tag = slot_tag(user_id)
            print(f"one password login: user {user_id}, tag {tag}, token {reg['token'][:12]}..., "
                  f"session {reg['session']['id']}")
            record = json.loads(client.get(f"gw:{{{tag}}}:s:{reg['session']['id']}"))
            print(f"session record: {len(json.dumps(record))} bytes of JSON")
            one = show_keys("keys of one session (MEMORY USAGE, bytes):",
                            memory_of(client, client.keys(f"gw:{{{tag}}}:*")), 1)
            refreshed = await post("/auth/refresh", token=reg["token"])
            show_keys("the same session after one /refresh:", memory_of(client, client.keys(f"gw:{{{tag}}}:*")), 1)
            await post("/auth/logout", token=refreshed["token"], expect=204)
            show_keys("what is left after its logout (markers, for sessions.ended_retention):",
                      memory_of(client, client.keys(f"gw:{{{tag}}}:*")), 1)

            # -- many sessions, used_memory -----------------------------------------
            client.flushall()
            store = RedisSessionStore(server.url)
            await store.open()
            mgr = SessionManager(store, idle_timeout=3600, absolute_timeout=86400, touch_interval=60,
                                 rotation_grace=30)
            time.sleep(0.2)
            before = int(client.info("memory")["used_memory"])
            for i in range(sessions):
                await mgr.create(f"u_{i:022d}", "password", ip="203.0.113.7", user_agent=USER_AGENT,
                                 data=record.get("data") or {})
            time.sleep(0.2)
            after = int(client.info("memory")["used_memory"])
            await store.close()
            per = (after - before) / sessions
            print(f"\n{sessions} sessions of {sessions} users through the session manager:")
            print(f"  used_memory {before} -> {after}: {per:.0f} bytes per session "
                  f"(key by key, one session alone: {one})")
            print(f"  1 GiB holds about {2 ** 30 / per:,.0f} such sessions "
                  f"({2 ** 30 * 0.75 / per:,.0f} with a quarter left free)")

            # -- round trips per request kind ---------------------------------------
            client.flushall()
            await post("/auth/password/register", {"username": "bob", "password": "correct horse"}, expect=201)
            logins = [await post("/auth/password/login", {"username": "bob", "password": "correct horse"})
                      for _ in range(REQUESTS * 2)]
            tokens = iter(login["token"] for login in logins)
            bob = (await touching.client.request("POST", "/auth/password/login",
                                                 json_body={"username": "bob", "password": "correct horse"}))
            bob_token = json.loads(bob.body)["token"]
            first = logins[0]["token"]

            async def proxied(i: int) -> None:
                r = await http.request("GET", "/api/hello", token=first)
                assert r.code == 200, r.body

            async def proxied_touch(i: int) -> None:
                r = await touching.client.request("GET", "/api/hello", token=bob_token)
                assert r.code == 200, r.body

            async def login(i: int) -> None:
                await post("/auth/password/login", {"username": "bob", "password": "correct horse"})

            async def refresh(i: int) -> None:
                await post("/auth/refresh", token=next(tokens))

            async def logout(i: int) -> None:
                await post("/auth/logout", token=next(tokens), expect=204)

            rows = [await per_request(client, "proxied request, no touch", proxied),
                    await per_request(client, "proxied request, with a touch", proxied_touch),
                    await per_request(client, "password login", login),
                    await per_request(client, "refresh", refresh),
                    await per_request(client, "logout", logout)]
            print("\nRedis per request (averaged over", REQUESTS, "requests each):")
            for row in rows:
                print(f"  {row['kind']:32s} {row['round_trips']:4.1f} round trips   {row['commands']}")
        finally:
            await factory.stop_all()
            upstream.stop()
            client.close()
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().sessions))
