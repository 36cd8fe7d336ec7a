"""Reloading `gateway serve` on SIGHUP, run as a real subprocess on loopback:
under a load of real clients, workers are replaced one at a time and no
request is lost (nor one sent before a stop); a changed configuration takes
effect, an invalid one is refused and logged while the old one serves; an
open WebSocket outlives its worker's replacement until it ends on its own
(up to server.shutdown_timeout); one worker reloads as well."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from gateway.testing import Client, GatewayProcess, Upstream, children_of, free_port, merge_config


# -- a load of real clients, in threads (the upstream runs on the test's event loop) -----------------


@dataclass
class Load:
    """What the clients saw.  ``failures``: (when the request was whole on
    the wire, or None if it never was; when it failed; what happened)."""

    ok: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[float | None, float, str]] = field(default_factory=list)
    retried: int = 0  # keep-alive requests sent again after an idle connection's close (RFC 9112, 9.3.1)
    answered: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def answer(self, path: str, status: int) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.ok += status == 200
            self.answered.add(path)

    def fail(self, sent: float | None, what: str) -> None:
        with self.lock:
            self.failures.append((sent, time.monotonic(), what))

    def lost_before(self, moment: float) -> list[str]:
        """Failures of requests that were whole on the wire before ``moment``,
        or that failed before it."""
        return [what for sent, failed, what in self.failures
                if failed < moment or (sent is not None and sent < moment)]


def fresh_client(port: int, name: str, load: Load, limit: int) -> None:
    """Requests one after the other, each on a new connection (through the
    accept queues, where a closed listening socket would reset them)."""
    for n in range(limit):
        if load.stop.is_set():
            return
        path = f"/public/f?c={name}&n={n}"
        sent = None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            sent = time.monotonic()
            response = conn.getresponse()
            response.read()
            load.answer(path, response.status)
        except Exception as exc:
            load.fail(sent, f"{path}: {exc!r}")
            time.sleep(0.01)  # (refused after the stop: no busy loop)
        finally:
            conn.close()


def keep_alive_client(port: int, name: str, load: Load, limit: int) -> None:
    """Requests one after the other on a keep-alive connection, a new one
    whenever the gateway closes it.  A request on a reused connection that
    is closed before any byte of the answer is sent once more on a new
    connection, as RFC 9112 (9.3.1) lets a client do with an idempotent
    request: the gateway may close an idle connection at any moment."""
    conn: http.client.HTTPConnection | None = None
    try:
        for n in range(limit):
            if load.stop.is_set():
                return
            for attempt in (0, 1):
                path = f"/public/k?c={name}&n={n}&a={attempt}"
                reused = conn is not None
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
                sent = None
                try:
                    conn.request("GET", path)
                    sent = time.monotonic()
                    response = conn.getresponse()
                    response.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    conn.close()
                    conn = None
                    if reused and attempt == 0:
                        with load.lock:
                            load.retried += 1
                        continue
                    load.fail(sent, f"{path}: {exc!r}")
                    time.sleep(0.01)
                    break
                except Exception as exc:
                    conn.close()
                    conn = None
                    load.fail(sent, f"{path}: {exc!r}")
                    time.sleep(0.01)
                    break
                load.answer(path, response.status)
                if response.will_close:
                    conn.close()
                    conn = None
                break
    finally:
        if conn is not None:
            conn.close()


def start_load(port: int, *, fresh: int, keep_alive: int, limit: int = 3000) -> Load:
    load = Load()
    for i in range(fresh):
        load.threads.append(threading.Thread(target=fresh_client, args=(port, f"f{i}", load, limit), daemon=True))
    for i in range(keep_alive):
        load.threads.append(threading.Thread(target=keep_alive_client, args=(port, f"k{i}", load, limit),
                                             daemon=True))
    for t in load.threads:
        t.start()
    return load


async def finish_load(load: Load) -> None:
    load.stop.set()
    loop = asyncio.get_running_loop()
    for t in load.threads:
        await loop.run_in_executor(None, t.join, 30)
    assert not any(t.is_alive() for t in load.threads)


async def answered_more(load: Load, than: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while load.ok < than:
        assert time.monotonic() < deadline, f"the load got only {load.ok} answers"
        await asyncio.sleep(0.05)


# -- helpers ----------------------------------------------------------------------------------------


def route(prefix: str, upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": upstream_url, "auth": "public", **extra}


async def status_of(client: Client, path: str) -> int:
    return (await client.request("GET", path, headers={"Connection": "close"})).code


async def workers_of(gp: GatewayProcess, n: int, timeout: float = 30.0) -> list[int]:
    """Wait until the supervisor has exactly ``n`` workers; their pids."""
    deadline = time.monotonic() + timeout
    while True:
        workers = children_of(gp.pid)
        if len(workers) == n:
            return sorted(workers)
        assert time.monotonic() < deadline, f"{len(workers)} workers, not {n}: {gp.output()}"
        await asyncio.sleep(0.05)


class ReadyzWatch:
    """Polls ``/readyz`` on the admin port every 50 ms; every status seen."""

    def __init__(self, admin_port: int) -> None:
        self.client = Client(f"http://127.0.0.1:{admin_port}")
        self.statuses: list[int] = []
        self.task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            self.statuses.append((await self.client.request("GET", "/readyz")).code)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            # (after a failure the gateway may be gone first: its refusal must not hide the failure)
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self.task
            self.task = None
        self.client.close()


# -- under load: two reloads, then a stop ---------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_reloads_under_load_lose_no_request_and_apply_the_new_configuration(tmp_path, upstream, redis_url):
    second = Upstream.start()
    admin_port = free_port()
    readyz = ReadyzWatch(admin_port)
    load: Load | None = None
    try:
        async with GatewayProcess(tmp_path, [route("/public/", upstream.url)],
                                  server={"workers": 2, "shutdown_timeout": "20s"},
                                  sessions={"store": "redis", "redis_url": redis_url},
                                  admin={"port": admin_port}) as gp:
            first_workers = await workers_of(gp, 2)
            await gp.wait_output("gateway listening on", 2)
            # the pid to send SIGHUP to is in the log, beside its workers'
            assert f"supervisor pid {gp.pid}: SIGHUP reloads" in gp.output()
            async with Client(gp.url) as c, Client(f"http://127.0.0.1:{admin_port}") as admin:
                deadline = time.monotonic() + 20
                while (await admin.request("GET", "/readyz")).code != 200:  # ready, before "stays ready"
                    assert time.monotonic() < deadline, gp.output()
                    await asyncio.sleep(0.1)
                assert await status_of(c, "/extra/x") == 404  # no such route yet
                load = start_load(gp.port, fresh=6, keep_alive=4)
                await answered_more(load, 200)
                readyz.start()

                # 1. A new route.
                gp.rewrite_config(merge_config(gp.config, {"routes": [route("/public/", upstream.url),
                                                                      route("/extra/", upstream.url)]}))
                gp.send_signal(signal.SIGHUP)
                await gp.wait_output("reloaded:", 1)
                # once it says so, no new connection reaches a worker of the old configuration
                assert [await status_of(c, "/extra/x") for _ in range(20)] == [200] * 20
                assert any(seen.path == "/extra/x" for seen in upstream.seen)
                after_first = load.ok
                await answered_more(load, after_first + 200)

                # 2. /public/ moves to another upstream, and a third worker joins.
                gp.rewrite_config(merge_config(gp.config, {"server": {"workers": 3},
                                                           "routes": [route("/public/", second.url),
                                                                      route("/extra/", upstream.url)]}))
                gp.send_signal(signal.SIGHUP)
                await gp.wait_output("reloaded:", 2)
                third_workers = await workers_of(gp, 3)
                assert not set(third_workers) & set(first_workers)
                seen_by_second = len(second.seen)
                await answered_more(load, load.ok + 200)
                assert len(second.seen) > seen_by_second + 100  # the load now goes to the second upstream
                await readyz.stop()

                # 3. A stop while the load goes on.
                stop_began = time.monotonic()
                gp.send_signal(signal.SIGTERM)  # the clients go on until the gateway has exited
                code = await asyncio.get_running_loop().run_in_executor(None, gp.proc.wait, 40)
                await finish_load(load)
    finally:
        await readyz.stop()
        if load is not None:
            load.stop.set()
        second.stop()
    out = gp.output()
    assert code == 0, out
    print(f"load: {load.ok} answered, statuses {load.statuses}, {load.retried} keep-alive retries, "
          f"{len(load.failures)} failures after the stop began; /readyz polled {len(readyz.statuses)} times")
    assert load.lost_before(stop_began) == [], (load.lost_before(stop_began)[:10], out[-4000:])
    assert set(load.statuses) == {200}, load.statuses
    assert load.ok >= 1000
    # Every request the gateway passed on was answered to its client.
    passed_on = {s.path + "?" + s.query for s in [*upstream.seen, *second.seen] if s.path in ("/public/f", "/public/k")}
    assert passed_on <= load.answered, sorted(passed_on - load.answered)[:10]
    # /readyz stayed 200 through both reloads.
    assert readyz.statuses and set(readyz.statuses) == {200}, readyz.statuses
    assert out.count("(replaced by a reload) exited with 0") == 4, out
    assert "Traceback" not in out and "Exception in callback" not in out


# -- one worker: an invalid configuration, then a valid one ----------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_one_worker_refuses_an_invalid_configuration_and_reloads_a_valid_one(tmp_path, upstream):
    admin_port = free_port()
    async with GatewayProcess(tmp_path, [route("/public/", upstream.url)], admin={"port": admin_port}) as gp:
        worker, = await workers_of(gp, 1)  # one worker: a supervisor above it, which reloads
        good = gp.config
        async with Client(gp.url) as c, Client(f"http://127.0.0.1:{admin_port}") as admin:
            assert (await admin.request("GET", "/readyz")).code == 200

            # Two problems: both are logged, and the old configuration serves on.
            gp.rewrite_config(merge_config(good, {"server": {"max_body_size": "lots"},
                                                  "routes": [route("/public/", upstream.url, auth="sometimes")]}))
            gp.send_signal(signal.SIGHUP)
            out = await gp.wait_output("reload refused")
            assert "2 problem(s)" in out, out
            assert "server.max_body_size" in out and "routes[0].auth" in out, out
            assert await status_of(c, "/public/still") == 200
            assert children_of(gp.pid) == [worker]

            # A valid one, under a light load: a new route; the admin port
            # cannot move while serving (logged), the rest applies.
            load = start_load(gp.port, fresh=2, keep_alive=2)
            await answered_more(load, 50)
            gp.rewrite_config(merge_config(good, {"admin": {"port": free_port()},
                                                  "routes": [route("/public/", upstream.url),
                                                             route("/extra/", upstream.url)]}))
            gp.send_signal(signal.SIGHUP)
            out = await gp.wait_output("reloaded:")
            assert "needs a restart, not applied: admin.host/admin.port" in out, out
            assert await status_of(c, "/extra/y") == 200
            await answered_more(load, load.ok + 50)
            await finish_load(load)
            new_worker, = await workers_of(gp, 1)
            assert new_worker != worker
            assert (await admin.request("GET", "/readyz")).code == 200  # on the old admin port
    out = gp.output()
    assert gp.proc is not None and gp.proc.returncode == 0, out
    print(f"load: {load.ok} answered, statuses {load.statuses}, {load.retried} keep-alive retries")
    assert load.failures == [], load.failures[:10]
    assert set(load.statuses) == {200}, load.statuses
    assert "Traceback" not in out


# -- an open WebSocket outlives the reload -------------------------------------------------------------------


class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


@pytest.mark.gen_test(timeout=90)
async def test_an_open_websocket_outlives_a_reload_until_it_ends_or_shutdown_timeout(tmp_path):
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Echo)]))
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets(sockets)
    ws_url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    routes = [route("/ws/", ws_url, websocket=True)]
    try:
        async with GatewayProcess(tmp_path, routes, server={"shutdown_timeout": "6s"}, admin={"port": 0}) as gp:
            old_worker, = await workers_of(gp, 1)
            url = f"ws://127.0.0.1:{gp.port}/ws/echo"
            ending = await tornado.websocket.websocket_connect(url)  # its client closes it after the reload
            lasting = await tornado.websocket.websocket_connect(url)  # stays open: shutdown_timeout ends it
            for ws in (ending, lasting):
                await ws.write_message("before")
                assert await ws.read_message() == "before"

            gp.rewrite_config(merge_config(gp.config, {"routes": [*routes, route("/ws2/", ws_url, websocket=True)]}))
            gp.send_signal(signal.SIGHUP)
            await gp.wait_output("reloaded:")
            await gp.wait_output("waiting for 2 open WebSocket(s) to end")
            assert sorted(children_of(gp.pid)) != [old_worker] and old_worker in children_of(gp.pid)
            # The new worker serves new sockets (the new route is its alone);
            # the old one still carries both open sockets.
            fresh = await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{gp.port}/ws2/echo")
            await fresh.write_message("new")
            assert await fresh.read_message() == "new"
            fresh.close()
            for ws in (ending, lasting):
                await ws.write_message("after")
                assert await ws.read_message() == "after"
            ending.close()
            await asyncio.sleep(0.5)
            await lasting.write_message("still")
            assert await lasting.read_message() == "still"
            assert old_worker in children_of(gp.pid)

            # shutdown_timeout (6 s from the reload) is the limit: then the old worker closes it and exits.
            deadline = time.monotonic() + 20
            closed = None
            while time.monotonic() < deadline:
                closed = await lasting.read_message()
                if closed is None:
                    break
            assert closed is None, "the old worker did not close the socket"
            out = await gp.wait_output("(replaced by a reload) exited with 0")
            assert "closing 1 WebSocket(s) still open" in out, out
    finally:
        server.stop()
    assert gp.proc is not None and gp.proc.returncode == 0, gp.output()
    assert "Traceback" not in gp.output()


# -- what needs a restart ----------------------------------------------------------------------------------


def test_what_a_running_gateway_cannot_change_is_named_and_kept_and_the_rest_applies():
    from gateway.config import load_config
    from gateway.server import restart_only

    def config(**server: Any) -> Any:
        return load_config(data={"server": {"port": 8080, "workers": 2, **server},
                                 "sessions": {"store": "redis"}, "admin": {"port": 9091},
                                 "routes": [route("/public/", "http://127.0.0.1:9000")]}, environ={})

    old = config()
    same, notes = restart_only(old, config(max_body_size="1MiB"))
    assert notes == [] and same.server.max_body_size == 1024 * 1024

    kept, notes = restart_only(old, config(port=8081, workers=1, max_body_size="1MiB"))
    assert [n.split(":")[0] for n in notes] == ["server.host/server.port", "server.workers"], notes
    assert (kept.server.port, kept.server.workers, kept.server.max_body_size) == (8080, 2, 1024 * 1024)

    more, notes = restart_only(old, config(workers=4))
    assert notes == [] and more.server.workers == 4

    moved = load_config(data={"server": {"port": 8080, "workers": 2}, "sessions": {"store": "redis"},
                              "admin": {"port": 9191}}, environ={})
    kept, notes = restart_only(old, moved)
    assert [n.split(":")[0] for n in notes] == ["admin.host/admin.port"], notes
    assert kept.admin.port == 9091 and kept.routes == ()  # the routes apply: none now
