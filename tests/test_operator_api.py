"""The operator API of the admin listener, against `bin/gateway serve` with
two workers and Redis sessions: the admin token, a user's sessions listed
and ended, one session ended, a lockout lifted through its provider, users
found and shown (never their identities' data), presence (a session used
lately, an open WebSocket) and the paging of users online; then the same
operations as `gateway sessions` and `gateway unlock`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.web
import tornado.websocket

from gateway.operator import SOCKET_TOUCH_INTERVAL, token_id
from gateway.proxy.websocket import WATCH_INTERVAL
from gateway.testing import Client, body, free_port
from password_support import ROOT, GatewayProcess, PasswordClient

TOKEN = "operator-token-0123456789"


class Echo(tornado.websocket.WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


@asynccontextmanager
async def operated(tmp_path: Path, redis_url: str, *, token: str = TOKEN, admin: dict[str, Any] | None = None,
                   **sections: Any) -> AsyncIterator[tuple[GatewayProcess, PasswordClient, Client]]:
    """A gateway of two workers on Redis with an admin listener (the operator
    API on with ``token``) and a WebSocket route; its client and an admin client."""
    echo = tornado.httpserver.HTTPServer(tornado.web.Application([(r".*", Echo)]))
    echo_port = free_port()
    echo.listen(echo_port, "127.0.0.1")
    admin_port = free_port()
    routes = [{"prefix": "/ws/", "upstream": f"http://127.0.0.1:{echo_port}", "websocket": True}]
    sessions = {"store": "redis", "redis_url": redis_url, **sections.pop("sessions", {})}
    try:
        async with GatewayProcess(tmp_path, routes, server={"workers": 2}, sessions=sessions,
                                  admin={"port": admin_port, "token": token, **(admin or {})}, **sections) as gp:
            async with PasswordClient(gp.url) as client, Client(f"http://127.0.0.1:{admin_port}") as operator:
                await until_ok(operator)
                yield gp, client, operator
    finally:
        echo.stop()


async def until_ok(admin: Client, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (await admin.request("GET", "/readyz")).code != 200:
        assert time.monotonic() < deadline, "the admin listener did not turn ready"
        await asyncio.sleep(0.1)


async def call(admin: Client, method: str, path: str, expect: int = 200, token: str | None = TOKEN) -> Any:
    r = await admin.request(method, path, token=token)
    assert r.code == expect, (r.code, r.body)
    assert r.headers["Content-Type"].startswith("application/json")
    return body(r)


async def session_reason(client: Client, token: str) -> tuple[int, str | None]:
    r = await client.request("GET", "/auth/session", token=token)
    return r.code, (body(r) or {}).get("reason") if r.code != 200 else None


# -- the token ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_every_call_needs_the_admin_token_and_is_audited_with_its_id(tmp_path, redis_url):
    audit_file = tmp_path / "audit.log"
    async with operated(tmp_path, redis_url, logging={"audit": str(audit_file)}) as (gp, client, admin):
        user = (await client.register("alice"))["user"]["id"]
        for token in (None, "operator-token-wrong-01234"):
            answer = await call(admin, "GET", f"/admin/users/{user}", 401, token=token)
            assert answer["error"] == "unauthenticated"
        r = await admin.request("GET", f"/admin/users/{user}", headers={"Authorization": TOKEN})  # no "Bearer"
        assert r.code == 401
        assert (await call(admin, "GET", f"/admin/users/{user}"))["id"] == user
        # health, readiness and metrics stay open
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await admin.request("GET", path)).code == 200
        lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
        calls = [line for line in lines if line["event"] == "admin.users.get"]
        assert [(c["operator"], c["status"], c["user_id"]) for c in calls] == \
            [("none", 401, user)] * 3 + [(token_id(TOKEN), 200, user)]
        assert TOKEN not in audit_file.read_text()


@pytest.mark.gen_test(timeout=90)
async def test_without_a_configured_token_the_api_is_not_there(tmp_path, redis_url):
    async with operated(tmp_path, redis_url, token="") as (gp, client, admin):
        user = (await client.register("alice"))["user"]["id"]
        answer = await call(admin, "GET", f"/admin/users/{user}", 404)
        assert answer["error"] == "not_found"
        await call(admin, "DELETE", f"/admin/users/{user}/sessions", 404)
        assert (await session_reason(client, (await client.login("alice"))["token"]))[0] == 200


# -- sessions -------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_list_and_end_a_users_sessions(tmp_path, redis_url):
    async with operated(tmp_path, redis_url) as (gp, client, admin):
        first = await client.register("alice")
        second = await client.login("alice")
        other = await client.register("bob")
        user = first["user"]["id"]
        listed = await call(admin, "GET", f"/admin/users/{user}/sessions")
        assert listed["user_id"] == user
        assert [s["id"] for s in listed["sessions"]] == [first["session"]["id"], second["session"]["id"]]
        assert {"id", "provider", "created_at", "last_seen_at", "expires_at", "ip", "user_agent"} \
            <= set(listed["sessions"][0])
        assert "current" not in listed["sessions"][0]

        # one session
        gone = await call(admin, "DELETE", f"/admin/sessions/{first['session']['id']}")
        assert gone == {"id": first["session"]["id"], "user_id": user, "revoked": True}
        assert await session_reason(client, first["token"]) == (401, "revoked")
        assert (await session_reason(client, second["token"]))[0] == 200
        await call(admin, "DELETE", f"/admin/sessions/{first['session']['id']}", 404)

        # every session of the user; bob's stays
        third = await client.login("alice")
        ended = await call(admin, "DELETE", f"/admin/users/{user}/sessions")
        assert sorted(ended["revoked"]) == sorted([second["session"]["id"], third["session"]["id"]])
        for token in (second["token"], third["token"]):
            assert await session_reason(client, token) == (401, "revoked")
        assert (await session_reason(client, other["token"]))[0] == 200
        assert (await call(admin, "GET", f"/admin/users/{user}/sessions"))["sessions"] == []

        for method, path in (("GET", "/admin/users/u_nobody/sessions"), ("DELETE", "/admin/users/u_nobody/sessions")):
            assert (await call(admin, method, path, 404))["error"] == "not_found"


# -- lockouts ----------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_unlock_a_locked_out_username_through_its_provider(tmp_path, redis_url):
    lock = {"password": {"max_failures": 2, "lockout_window": "10m"}}
    async with operated(tmp_path, redis_url, providers=lock) as (gp, client, admin):
        await client.register("alice")
        for _ in range(2):
            await client.login("alice", "not the password", expect=401)
        refused = await client.login("alice", expect=429)
        assert refused["error"] == "locked_out"

        answer = await call(admin, "DELETE", "/admin/lockouts/password/Alice")
        assert answer == {"provider": "password", "subject": "Alice", "unlocked": True}
        assert (await client.login("alice"))["user"]["id"]
        # a lockout after the unlock holds again
        for _ in range(2):
            await client.login("alice", "not the password", expect=401)
        await client.login("alice", expect=429)

        assert (await call(admin, "DELETE", "/admin/lockouts/nosuch/alice", 404))["error"] == "not_found"


# -- users --------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_find_a_user_by_identity_and_show_it_without_identity_data(tmp_path, redis_url):
    async with operated(tmp_path, redis_url) as (gp, client, admin):
        user = (await client.register("alice"))["user"]["id"]
        found = await call(admin, "GET", "/admin/users?identity=password:alice")
        assert found["id"] == user
        assert [(i["provider"], i["subject"]) for i in found["identities"]] == [("password", "alice")]
        assert all("data" not in i for i in found["identities"])
        assert "argon2" not in json.dumps(found)
        assert await call(admin, "GET", f"/admin/users/{user}") == found

        assert (await call(admin, "GET", "/admin/users?identity=password:nobody", 404))["error"] == "not_found"
        await call(admin, "GET", "/admin/users/u_nobody", 404)
        assert (await call(admin, "GET", "/admin/users?identity=alice", 400))["error"] == "invalid_request"
        await call(admin, "GET", "/admin/users", 400)


# -- presence ------------------------------------------------------------------------------------------


def test_the_presence_floor_is_the_websocket_watchers_interval():
    assert SOCKET_TOUCH_INTERVAL == WATCH_INTERVAL


async def presence(admin: Client, *users: str) -> dict[str, dict[str, Any]]:
    query = "&".join(f"user={u}" for u in users)
    answer = await call(admin, "GET", f"/admin/presence?{query}")
    return {entry["user_id"]: entry for entry in answer["users"]}


async def open_socket(port: int, token: str) -> tornado.websocket.WebSocketClientConnection:
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/ws/chat",
                                             headers=tornado.httputil.HTTPHeaders({"Authorization": f"Bearer {token}"}),
                                             connect_timeout=10, request_timeout=10)
    ws = await tornado.websocket.websocket_connect(request)
    await ws.write_message("hi")
    assert await ws.read_message() == "hi"
    return ws


@pytest.mark.gen_test(timeout=120)
async def test_presence_online_while_used_or_holding_a_websocket_offline_after_the_window(tmp_path, redis_url):
    # touch_interval 0: every use is recorded; the window is then the least there is, 3 s
    async with operated(tmp_path, redis_url, sessions={"touch_interval": "0s"},
                        admin={"presence_window": "1s"}) as (gp, client, admin):
        alice = await client.register("alice")
        bob = await client.register("bob")
        ids = alice["user"]["id"], bob["user"]["id"]
        window = (await call(admin, "GET", f"/admin/presence?user={ids[0]}"))["window"]
        assert window == SOCKET_TOUCH_INTERVAL + 1.0
        seen = await presence(admin, *ids, "u_nobody")
        assert seen[ids[0]]["online"] and seen[ids[1]]["online"]
        assert seen["u_nobody"] == {"user_id": "u_nobody", "online": False, "last_seen_at": None}

        ws = await open_socket(gp.port, bob["token"])
        try:
            await asyncio.sleep(window + 1.0)  # past the window: alice idle, bob on his socket
            seen = await presence(admin, *ids)
            assert not seen[ids[0]]["online"] and seen[ids[0]]["last_seen_at"] is not None
            assert seen[ids[1]]["online"]
            online = await call(admin, "GET", "/admin/presence/online")
            assert [u["user_id"] for u in online["users"]] == [ids[1]]

            assert (await session_reason(client, alice["token"]))[0] == 200  # used again: online again
            assert (await presence(admin, ids[0]))[ids[0]]["online"]
        finally:
            ws.close()
        await asyncio.sleep(window + 1.0)
        seen = await presence(admin, *ids)
        assert not seen[ids[0]]["online"] and not seen[ids[1]]["online"]
        assert (await call(admin, "GET", "/admin/presence/online"))["users"] == []

        await call(admin, "GET", "/admin/presence", 400)
        await call(admin, "GET", "/admin/presence?" + "&".join(f"user=u{i}" for i in range(101)), 400)


@pytest.mark.gen_test(timeout=90)
async def test_page_through_the_users_online(tmp_path, redis_url):
    async with operated(tmp_path, redis_url) as (gp, client, admin):
        users = {}
        for n in range(7):
            users[(await client.register(f"user{n}"))["user"]["id"]] = n
        await client.register("gone")
        gone = (await call(admin, "GET", "/admin/users?identity=password:gone"))["id"]
        await call(admin, "DELETE", f"/admin/users/{gone}/sessions")  # no live session left: not online

        pages, cursor = [], None
        while True:
            answer = await call(admin, "GET", "/admin/presence/online?limit=3" + (f"&cursor={cursor}" if cursor else ""))
            pages.append([u["user_id"] for u in answer["users"]])
            cursor = answer["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        listed = [u for page in pages for u in page]
        assert sorted(listed) == sorted(users) and gone not in listed
        assert listed == sorted(users, key=users.__getitem__)  # oldest use first

        await call(admin, "GET", "/admin/presence/online?limit=0", 400)
        await call(admin, "GET", "/admin/presence/online?limit=x", 400)
        await call(admin, "GET", "/admin/presence/online?cursor=%21%21", 400)


# -- the commands --------------------------------------------------------------------------------------


def gateway_command(gp: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "bin" / "gateway"), *args, "--config", str(gp.config_path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.gen_test(timeout=120)
async def test_the_operator_commands(tmp_path, redis_url):
    lock = {"password": {"max_failures": 1, "lockout_window": "10m"}}
    async with operated(tmp_path, redis_url, providers=lock) as (gp, client, admin):
        alice = await client.register("alice")
        user = alice["user"]["id"]
        done = await asyncio.to_thread(gateway_command, gp, "sessions", "list", "--user", user)
        assert done.returncode == 0, done.stderr
        assert [s["id"] for s in json.loads(done.stdout)["sessions"]] == [alice["session"]["id"]]

        done = await asyncio.to_thread(gateway_command, gp, "sessions", "revoke", "--user", user)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["revoked"] == [alice["session"]["id"]]
        assert await session_reason(client, alice["token"]) == (401, "revoked")

        again = await client.login("alice")
        done = await asyncio.to_thread(gateway_command, gp, "sessions", "revoke", "--session", again["session"]["id"])
        assert done.returncode == 0, done.stderr
        assert await session_reason(client, again["token"]) == (401, "revoked")

        await client.login("alice", "not the password", expect=401)
        await client.login("alice", expect=429)
        done = await asyncio.to_thread(gateway_command, gp, "unlock", "password:alice")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["unlocked"] is True
        await client.login("alice")

        done = await asyncio.to_thread(gateway_command, gp, "sessions", "list", "--user", "u_nobody")
        assert done.returncode == 1 and "no such user" in done.stderr
        done = await asyncio.to_thread(gateway_command, gp, "unlock", "alice")
        assert done.returncode == 1 and "provider:subject" in done.stderr


# -- one process; the online index of each store ----------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_one_process_serves_the_api_itself(tmp_path):
    admin_port = free_port()
    async with GatewayProcess(tmp_path, [], admin={"port": admin_port, "token": TOKEN}) as gp:
        async with PasswordClient(gp.url) as client, Client(f"http://127.0.0.1:{admin_port}") as admin:
            await until_ok(admin)
            alice = await client.register("alice")
            user = alice["user"]["id"]
            assert (await presence(admin, user))[user]["online"]
            assert [u["user_id"] for u in (await call(admin, "GET", "/admin/presence/online"))["users"]] == [user]
            await call(admin, "DELETE", f"/admin/users/{user}/sessions")
            assert await session_reason(client, alice["token"]) == (401, "revoked")
            assert (await call(admin, "GET", "/admin/presence/online"))["users"] == []


@pytest.mark.parametrize("kind", ["memory", "redis"])
@pytest.mark.gen_test(timeout=30)
async def test_the_online_index_follows_creates_touches_and_deletes(kind, redis_url):
    from gateway.sessions.manager import SessionManager
    from gateway.sessions.memory import MemorySessionStore
    from gateway.sessions.redis import RedisSessionStore

    store = MemorySessionStore() if kind == "memory" else RedisSessionStore(redis_url)
    await store.open()
    try:
        manager = SessionManager(store, idle_timeout=600, absolute_timeout=3600, touch_interval=0, rotation_grace=5)
        start = time.time()
        await manager.create("u_a", "example")
        token_b, second = await manager.create("u_b", "example")
        _, third = await manager.create("u_b", "example")
        online = await store.online(start - 1, 10)
        assert [u for u, _ in online] == ["u_a", "u_b"]
        await asyncio.sleep(0.01)
        await manager.authenticate(token_b)  # a touch: u_b moves to the end, with its new last use
        online = await store.online(start - 1, 10)
        assert [u for u, _ in online] == ["u_a", "u_b"] and online[1][1] > third.last_seen_at
        assert await store.online(start - 1, 1, after=(online[0][1], online[0][0])) == [online[1]]
        await manager.revoke(second.id, "operator")
        assert [u for u, _ in await store.online(start - 1, 10)] == ["u_a", "u_b"]  # a live session left
        await manager.revoke(third.id, "operator")
        assert [u for u, _ in await store.online(start - 1, 10)] == ["u_a"]
        assert await store.online(time.time() + 1, 10) == []  # nobody used since (and those before forgotten)
        assert await store.online(start - 1, 10) == []
    finally:
        await store.close()
