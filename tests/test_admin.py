"""The admin listener of `bin/gateway serve`, run as a real subprocess:
/healthz, /readyz (the stores, a graceful stop) and /metrics, summed over
the workers by the supervisor, with labels that stay bounded whatever the
paths; `[admin] port = 0` turns it off."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import tornado.httpserver
import tornado.web
import tornado.websocket
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import read_config
from gateway.testing import Client, RedisServer, children_of, free_port
from gateway.testing.raw import close_quietly, connect, read_response, request_head
from password_support import GatewayProcess, PasswordClient

# -- helpers ------------------------------------------------------------------------------


def public_route(upstream_url: str) -> list[dict[str, Any]]:
    return [{"prefix": "/public/", "upstream": upstream_url, "auth": "public"}]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Poll ``check`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


async def get_json(client: Client, path: str) -> tuple[int, Any]:
    r = await client.request("GET", path)
    return r.code, json.loads(r.body) if r.body else None


async def scrape(admin: Client) -> dict[str, Any]:
    """``GET /metrics``, parsed: metric family name -> family."""
    r = await admin.request("GET", "/metrics")
    assert r.code == 200, r.body
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers
    return {family.name: family for family in text_string_to_metric_families(r.body.decode())}


def samples(families: dict[str, Any], family: str, sample: str | None = None) -> list[Any]:
    """The samples named ``sample`` (default: the family's name) of ``family``."""
    found = families.get(family)
    return [s for s in found.samples if s.name == (sample or family)] if found is not None else []


def total(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    return sum(s.value for s in samples(families, family, sample)
               if all(s.labels.get(k) == v for k, v in labels.items()))


async def both_workers_listening(gp: GatewayProcess) -> list[int]:
    workers: list[int] = []

    async def two() -> bool:
        nonlocal workers
        workers = children_of(gp.pid)
        return len(workers) == 2 and gp.output().count("gateway listening on") >= 2

    await eventually(two, "two workers listening")
    return workers


def tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket (/proc/net/tcp)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        out.append((int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16), cols[3], cols[9]))
    return out


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(link[8:-1])
    return found


def listening_ports(pids: list[int]) -> set[int]:
    """The TCP ports these processes listen on."""
    inodes = set().union(*(socket_inodes(pid) for pid in pids))
    return {local for local, _, state, inode in tcp_sockets() if state == "0A" and inode in inodes}


async def keep_alive_get(path: str, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                         method: str = "GET") -> int:
    """One request on a kept-alive connection: its status."""
    reader, writer = conn
    writer.write(request_head(method, path))
    await writer.drain()
    status, _, _ = await read_response(reader, method)
    return status


# -- health, readiness and summed metrics, with two workers ----------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_two_workers_share_one_admin_listener_whose_metrics_are_their_sum(tmp_path, upstream):
    redis = RedisServer(tmp_path / "redis")  # the test's own: it is stopped below
    (tmp_path / "redis").mkdir()
    redis.start()
    admin_port = free_port()
    admin = Client(f"http://127.0.0.1:{admin_port}")
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with GatewayProcess(tmp_path, public_route(upstream.url), server={"workers": 2},
                                  sessions={"store": "redis", "redis_url": redis.url},
                                  admin={"port": admin_port}) as gp:
            assert await get_json(admin, "/healthz") == (200, {"status": "ok"})
            workers = await both_workers_listening(gp)
            assert await get_json(admin, "/readyz") == (200, {"status": "ok"})
            assert (await admin.request("GET", "/nothing")).code == 404

            # 16 keep-alive connections: which worker holds each one (from
            # /proc), then 5 requests on each.
            for _ in range(16):
                conns.append(await connect(gp.port))
            for conn in conns:
                assert await keep_alive_get("/public/k", conn) == 200
            client_ports = {conn[1].get_extra_info("sockname")[1] for conn in conns}
            held = {pid: socket_inodes(pid) for pid in workers}
            served: dict[int, int] = {pid: 0 for pid in workers}
            for local, remote, state, inode in tcp_sockets():
                if local == gp.port and remote in client_ports and state == "01":
                    for pid, inodes in held.items():
                        served[pid] += 5 * (inode in inodes)
            for conn in conns:
                for n in range(4):
                    assert await keep_alive_get(f"/public/k?n={n}", conn) == 200
            assert sum(served.values()) == 80 and min(served.values()) > 0, served  # both workers served some

            async def all_counted() -> bool:  # a request is counted as its handler finishes, just after its answer
                return total(await scrape(admin), "gateway_http_requests", "gateway_http_requests_total",
                             route="/public/", method="GET", status="200") >= 80

            await eventually(all_counted, "80 requests counted", timeout=5)
            families = await scrape(admin)
            assert total(families, "gateway_http_requests", "gateway_http_requests_total",
                         route="/public/", method="GET", status="200") == 80
            assert total(families, "gateway_http_request_duration_seconds",
                         "gateway_http_request_duration_seconds_count", route="/public/") == 80
            assert total(families, "gateway_upstream_duration_seconds",
                         "gateway_upstream_duration_seconds_count", route="/public/") == 80

            # Logins, sessions and their end, through the password provider.
            users = PasswordClient(gp.url)
            try:
                reg = await users.register("carol", "a long enough password")
                await users.login_with("password", {"username": "carol", "password": "wrong password"},
                                       expect=401)
                login = await users.login("carol", "a long enough password")
                r = await users.request("POST", "/auth/logout", token=login["token"])
                assert r.code == 204, r.body
                assert reg["token"]
            finally:
                users.close()

            async def logins_counted() -> bool:  # counted as each handler finishes, just after its answer
                return total(await scrape(admin), "gateway_http_requests", "gateway_http_requests_total",
                             route="/auth/password/login", method="POST") >= 2

            await eventually(logins_counted, "the logins counted", timeout=5)
            families = await scrape(admin)
            assert total(families, "gateway_logins", "gateway_logins_total", provider="password", result="ok") == 1
            assert total(families, "gateway_logins", "gateway_logins_total", provider="password",
                         result="invalid_credentials") == 1
            assert total(families, "gateway_sessions_created", "gateway_sessions_created_total",
                         provider="password") == 2
            assert total(families, "gateway_sessions_ended", "gateway_sessions_ended_total", reason="logout") == 1
            assert total(families, "gateway_http_requests", "gateway_http_requests_total",
                         route="/auth/password/login", method="POST") == 2

            # A worker that dies is replaced; what it counted still counts.
            # An admin connection kept alive across the fork stays the
            # supervisor's alone: the new worker holds neither it nor the port.
            for _, writer in conns:
                close_quietly(writer)
            conns.clear()
            probe = await connect(admin_port)
            conns.append(probe)
            assert await keep_alive_get("/healthz", probe) == 200
            os.kill(workers[0], signal.SIGKILL)

            async def replaced() -> bool:
                now = children_of(gp.pid)
                return len(now) == 2 and workers[0] not in now and gp.output().count("gateway listening on") >= 3

            await eventually(replaced, "the killed worker replaced")
            assert await keep_alive_get("/healthz", probe) == 200
            new_worker, = set(children_of(gp.pid)) - set(workers)
            assert listening_ports([new_worker]) == {gp.port}
            assert not socket_inodes(new_worker) & {inode for local, _, _, inode in tcp_sockets()
                                                     if local == admin_port}
            families = await scrape(admin)
            assert total(families, "gateway_http_requests", "gateway_http_requests_total",
                         route="/public/", method="GET", status="200") == 80

            # Redis stops: /readyz names the session store, requests that
            # need it get 503 and are counted; Redis back: ready again.
            redis.stop()

            async def session_store_down() -> bool:
                return await get_json(admin, "/readyz") == (503, {"status": "unavailable",
                                                                  "failed": ["session store"]})

            await eventually(session_store_down, "/readyz 503 naming the session store")
            async with Client(gp.url) as c:
                # a well-formed token (gws_<slot tag>_...): only Redis can tell it opens nothing
                r = await c.request("GET", "/auth/session", token="gws_000_" + "x" * 43)
            assert r.code == 503, r.body
            families = await scrape(admin)
            assert total(families, "gateway_store_errors", "gateway_store_errors_total", store="session store") >= 1
            assert await get_json(admin, "/healthz") == (200, {"status": "ok"})

            redis.start()

            async def ready_again() -> bool:
                return await get_json(admin, "/readyz") == (200, {"status": "ok"})

            await eventually(ready_again, "/readyz 200 once Redis is back")
            assert "not ready: session store" in gp.output() and "ready again" in gp.output()
    finally:
        for _, writer in conns:
            close_quietly(writer)
        admin.close()
        redis.stop()
    assert gp.proc is not None and gp.proc.returncode == 0, gp.output()
    for trouble in ("Traceback", "Exception ignored", "was destroyed", "Exception in callback"):
        assert trouble not in gp.output(), gp.output()


# -- the WebSocket gauge ---------------------------------------------------------------------------


class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


def connections_held(port: int, pids: list[int]) -> dict[int, int]:
    """How many established connections to local ``port`` each process holds."""
    established = {inode for local, _, state, inode in tcp_sockets() if local == port and state == "01"}
    return {pid: len(socket_inodes(pid) & established) for pid in pids}


@pytest.mark.gen_test(timeout=90)
async def test_the_websocket_gauge_counts_open_sockets_of_live_workers(tmp_path, redis_url):
    echo = tornado.httpserver.HTTPServer(tornado.web.Application([(r".*", Echo)]))
    echo_port = free_port()
    echo.listen(echo_port, "127.0.0.1")
    admin_port = free_port()
    admin = Client(f"http://127.0.0.1:{admin_port}")
    sockets: list[Any] = []
    try:
        async with GatewayProcess(tmp_path, [{"prefix": "/ws/", "upstream": f"http://127.0.0.1:{echo_port}",
                                              "auth": "public", "websocket": True}],
                                  server={"workers": 2}, sessions={"store": "redis", "redis_url": redis_url},
                                  admin={"port": admin_port}) as gp:
            workers = await both_workers_listening(gp)
            for n in range(6):
                ws = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{gp.port}/ws/{n}")
                await ws.write_message("hi")
                assert await ws.read_message() == "hi"
                sockets.append(ws)

            def gauge_is(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return total(await scrape(admin), "gateway_websocket_connections", route="/ws/") == n
                return check

            await eventually(gauge_is(6), "6 open WebSockets")
            sockets.pop().close()
            await eventually(gauge_is(5), "5 open WebSockets")

            # A worker killed with its sockets open: they no longer count.
            async def settled() -> bool:
                return sum(connections_held(gp.port, workers).values()) == 5

            await eventually(settled, "5 connections held by the workers")
            held = connections_held(gp.port, workers)
            victim = next(pid for pid in workers if held[pid])
            survivor = next(pid for pid in workers if pid != victim)
            os.kill(victim, signal.SIGKILL)
            await eventually(gauge_is(held[survivor]), "only the surviving worker's sockets counted")
    finally:
        for ws in sockets:
            ws.close()
        admin.close()
        echo.stop()


# -- the graceful stop --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.gen_test(timeout=90)
async def test_readyz_turns_503_at_sigterm_while_the_gateway_still_serves(tmp_path, upstream, redis_url, workers):
    admin_port = free_port()
    admin = Client(f"http://127.0.0.1:{admin_port}")
    try:
        async with GatewayProcess(tmp_path, public_route(upstream.url), server={"workers": workers},
                                  sessions={"store": "redis", "redis_url": redis_url},
                                  admin={"port": admin_port, "drain_delay": "3s"}) as gp:
            if workers == 2:
                await both_workers_listening(gp)

            async def ready() -> bool:
                return (await get_json(admin, "/readyz"))[0] == 200

            await eventually(ready, "/readyz 200")
            async with Client(gp.url) as c:
                assert (await c.request("GET", "/public/before")).code == 200

            async def counted() -> bool:
                # the access-log function counts a request once its handler
                # finishes, a moment after the client has the whole answer
                families = await scrape(admin)
                return total(families, "gateway_http_requests", "gateway_http_requests_total", route="/public/") == 1

            await eventually(counted, "the request counted", timeout=5)

            gp.proc.send_signal(signal.SIGTERM)

            async def stopping() -> bool:
                return await get_json(admin, "/readyz") == (503, {"status": "stopping"})

            await eventually(stopping, "/readyz 503 stopping", timeout=3)
            # The gateway still accepts: the load balancer has time to notice.
            async with Client(gp.url) as c:
                r = await c.request("GET", "/public/during", headers={"Connection": "close"})
            assert r.code == 200, r.body
            assert await get_json(admin, "/healthz") == (200, {"status": "ok"})

            async def exited() -> bool:
                return gp.proc.poll() is not None

            await eventually(exited, "the gateway exits")
    finally:
        admin.close()
    assert gp.proc.returncode == 0, gp.output()
    log = gp.output()
    assert log.index("/readyz answers 503") < log.index("no new connections"), log
    assert any(seen.path == "/public/during" for seen in upstream.seen)


# -- bounded labels --------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_a_thousand_distinct_paths_make_a_handful_of_series(tmp_path, upstream, redis_url):
    admin_port = free_port()
    admin = Client(f"http://127.0.0.1:{admin_port}")
    try:
        async with GatewayProcess(tmp_path, public_route(upstream.url), server={"workers": 2},
                                  sessions={"store": "redis", "redis_url": redis_url},
                                  admin={"port": admin_port}) as gp:
            await both_workers_listening(gp)
            # 1,000 requests, each on its own path: under a route, under no
            # route, a session id, unknown gateway endpoints, unknown methods.
            kinds = [("GET", "/public/item-{i}"), ("GET", "/nowhere/u_{i}"), ("DELETE", "/auth/sessions/s{i}"),
                     ("GET", "/auth/x{i}"), ("M{i}", "/public/m{i}")]
            requests = [(kinds[i % 5][0].format(i=i), kinds[i % 5][1].format(i=i)) for i in range(1000)]

            async def one_by_one(part: list[tuple[str, str]]) -> list[int]:
                out = []
                for method, path in part:  # a connection each: a refused request closes its connection
                    reader, writer = await connect(gp.port)
                    try:
                        writer.write(request_head(method, path, [("Connection", "close")]))
                        out.append((await read_response(reader, method))[0])
                    finally:
                        close_quietly(writer)
                return out

            statuses = sum(await asyncio.gather(*(one_by_one(requests[k::8]) for k in range(8))), [])
            assert len(statuses) == 1000 and set(statuses) <= {200, 401, 404, 405}, set(statuses)

            families = await scrape(admin)
            counted = samples(families, "gateway_http_requests", "gateway_http_requests_total")
            assert sum(s.value for s in counted) == 1000
            assert len(counted) <= 8, [s.labels for s in counted]
            assert {s.labels["route"] for s in counted} == {"/public/", "other", "/auth/sessions/*"}
            assert {s.labels["method"] for s in counted} == {"GET", "DELETE", "other"}
            durations = samples(families, "gateway_http_request_duration_seconds",
                                "gateway_http_request_duration_seconds_count")
            assert {s.labels["route"] for s in durations} == {"/public/", "other", "/auth/sessions/*"}
            every_label = {v for family in families.values() for s in family.samples for v in s.labels.values()}
            assert not [v for v in every_label if any(c.isdigit() for c in v) and v.startswith(("/", "u_", "M"))]
    finally:
        admin.close()


# -- off, and its configuration ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_admin_port_0_turns_the_listener_off(tmp_path, upstream, redis_url):
    async with GatewayProcess(tmp_path, public_route(upstream.url), server={"workers": 2},
                              sessions={"store": "redis", "redis_url": redis_url}, admin={"port": 0}) as gp:
        workers = await both_workers_listening(gp)
        async with Client(gp.url) as c:
            assert (await c.request("GET", "/public/x")).code == 200
        assert listening_ports([gp.pid, *workers]) == {gp.port}
        assert "admin listener" not in gp.output()
    assert gp.proc is not None and gp.proc.returncode == 0, gp.output()


def test_admin_options_are_checked():
    def problems(admin: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
        return read_config(data={"server": {"port": 8080}, "admin": admin}, environ=environ or {})[1]

    assert problems({}) == []
    assert problems({"port": 8080}) == ["admin.port: 8080 is server.port too; the admin listener needs a port of its own"]
    assert problems({"port": 8080, "host": "10.0.0.1"}) == []  # server.host is 127.0.0.1: another address
    assert problems({"token_env": "GATEWAY_ADMIN_TOKEN"}) == [
        "admin.token_env: environment variable GATEWAY_ADMIN_TOKEN is not set"]
    assert problems({"token_env": "T"}, {"T": "short"}) == [
        "admin.token: expected a token of at least 16 characters without spaces"]
    token = "t" * 32
    config, found = read_config(data={"admin": {"token_env": "T"}}, environ={"T": token})
    assert found == [] and config.admin.token == token and token not in repr(config)
    assert read_config(data={})[0].admin.port == 9091
