"""WebSocket proxying, end to end: a real gateway (in-process, or as a
`bin/gateway serve` subprocess) between a real WebSocket client (Tornado's
``websocket_connect``, aiohttp's ``ws_connect``, or raw bytes over a socket
where the handshake or the framing matters) and a real upstream
WebSocket server (a Tornado ``WebSocketHandler`` on loopback).

Authentication and route policy happen before the upgrade and answer the
same JSON errors as HTTP; identity reaches the upstream only in the
gateway's own headers; frames, pings and close codes pass both ways; and a
socket ends (4401 to the client, 1001 to the upstream) when its session or
API key does, in every worker process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.httputil
import tornado.web
import tornado.websocket

from gateway.testing import (RedisServer, assert_error, base_config, body, children_of, cookie_value, free_port,
                             rss_bytes)
from password_support import PasswordClient as Client

ROOT = Path(__file__).resolve().parent.parent

GATEWAY = str(ROOT / "bin" / "gateway")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IDENTITY = {"x-user-id", "x-auth-provider", "x-session-id", "x-auth-scopes"}
ALLOWED_ORIGIN = "https://app.example.com"


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


# ---------------------------------------------------------------------------
# The upstream: a real Tornado WebSocket server that records what it sees
# ---------------------------------------------------------------------------


@dataclass
class UpConn:
    """One WebSocket connection as the upstream saw it."""

    path: str
    headers: list[tuple[str, str]]
    handler: Any
    uri: str = ""
    messages: list[str | bytes] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def identity(self) -> list[tuple[str, str]]:
        """Every header whose canonical name is an identity header."""
        return [(k, v) for k, v in self.headers if canon(k) in IDENTITY]

    async def wait_closed(self, within: float = 5.0) -> tuple[int | None, str | None]:
        try:
            await asyncio.wait_for(self.closed.wait(), within)
        except asyncio.TimeoutError:
            raise AssertionError(f"the upstream side of {self.path} was still open after {within} s") from None
        return self.close_code, self.close_reason


@dataclass
class WsUpstream:
    url: str
    port: int
    conns: list[UpConn] = field(default_factory=list)
    refused: list[list[tuple[str, str]]] = field(default_factory=list)

    async def conn(self, index: int = -1, *, count: int | None = None, within: float = 5.0) -> UpConn:
        """The ``index``-th connection, waiting until ``count`` (default: enough) have arrived."""
        need = count if count is not None else (index + 1 if index >= 0 else 1)
        deadline = time.monotonic() + within
        while len(self.conns) < need:
            if time.monotonic() > deadline:
                raise AssertionError(f"the upstream has {len(self.conns)} connection(s), expected {need}")
            await asyncio.sleep(0.02)
        return self.conns[index]

    async def messages(self, conn: UpConn, n: int, within: float = 5.0) -> list[str | bytes]:
        deadline = time.monotonic() + within
        while len(conn.messages) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"the upstream received {len(conn.messages)} message(s), expected {n}")
            await asyncio.sleep(0.02)
        return conn.messages


class EchoSocket(tornado.websocket.WebSocketHandler):
    """Echoes every message (text as text, binary as binary), except
    ``cmd:...`` text messages: ``cmd:close:<code>:<reason>``,
    ``cmd:ping:<data>``, ``cmd:big:<n>`` (sends n bytes of text)."""

    def initialize(self, up: WsUpstream) -> None:
        self.up = up
        self.rec: UpConn | None = None

    def check_origin(self, origin: str) -> bool:
        return True  # the gateway decides about origins

    def get_compression_options(self) -> None:
        return None

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return "chat.v2" if "chat.v2" in subprotocols else None

    def open(self, *args: Any) -> None:
        self.rec = UpConn(self.request.path, list(self.request.headers.get_all()), self, uri=self.request.uri or "")
        self.up.conns.append(self.rec)

    def on_message(self, message: str | bytes) -> None:
        assert self.rec is not None
        self.rec.messages.append(message)
        if isinstance(message, str) and message.startswith("cmd:"):
            _, what, *rest = message.split(":", 3)
            if what == "close":
                self.close(int(rest[0]), rest[1] if len(rest) > 1 else None)
            elif what == "ping":
                self.ping(rest[0].encode())
            elif what == "big":
                self.write_message("y" * int(rest[0]))
            return
        self.write_message(message, binary=isinstance(message, bytes))

    def on_ping(self, data: bytes) -> None:
        if self.rec is not None:
            self.rec.pings.append(data)

    def on_pong(self, data: bytes) -> None:
        if self.rec is not None:
            self.rec.pongs.append(data)

    def on_close(self) -> None:
        if self.rec is not None:
            self.rec.close_code, self.rec.close_reason = self.close_code, self.close_reason
            self.rec.closed.set()


class Refuser(tornado.web.RequestHandler):
    """Answers every handshake with 403."""

    def initialize(self, up: WsUpstream) -> None:
        self.up = up

    def get(self, *args: Any) -> None:
        self.up.refused.append(list(self.request.headers.get_all()))
        self.set_status(403)
        self.finish("no websockets for you")


@pytest.fixture
def ws_upstream(io_loop):
    port = free_port()
    up = WsUpstream(url=f"http://127.0.0.1:{port}", port=port)
    app = tornado.web.Application([
        (r"/refuse/.*", Refuser, {"up": up}),
        (r".*", EchoSocket, {"up": up}),
    ])
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    yield up
    server.stop()

    async def close_all() -> None:
        for c in up.conns:
            if not c.closed.is_set():
                c.handler.close()
        await server.close_all_connections()

    io_loop.run_sync(close_all)


# ---------------------------------------------------------------------------
# Gateway configuration
# ---------------------------------------------------------------------------


def ws_routes(ws_url: str, **ws_route: Any) -> list[dict[str, Any]]:
    """``/ws/`` proxies WebSockets (with ``ws_route`` keys); ``/plain/`` is the
    same upstream without ``websocket``; ``/scripts/`` is for API keys with
    scope ``a``; ``/pub/`` is public; ``/refuse/`` answers 403; ``/down/`` is
    an upstream nobody listens on."""
    dead = f"http://127.0.0.1:{free_port()}"
    return [
        {"prefix": "/ws/", "upstream": ws_url, "auth": "required", "websocket": True, **ws_route},
        {"prefix": "/plain/", "upstream": ws_url, "auth": "required"},
        {"prefix": "/scripts/", "upstream": ws_url, "auth": "required", "websocket": True,
         "scopes": ["a"], "allow_sessions": False},
        {"prefix": "/pub/", "upstream": ws_url, "auth": "public", "websocket": True},
        {"prefix": "/refuse/", "upstream": ws_url, "auth": "required", "websocket": True},
        {"prefix": "/down/", "upstream": dead, "auth": "required", "websocket": True},
    ]


def ws_config(ws_url: str, tmp_path: Path, *, route: dict[str, Any] | None = None,
              **sections: Any) -> dict[str, Any]:
    sessions = {"allowed_origins": [ALLOWED_ORIGIN], **sections.pop("sessions", {})}
    return base_config(ws_url, tmp_path, routes=ws_routes(ws_url, **(route or {})), sessions=sessions, **sections)


async def start(make_gateway: Any, ws_upstream: WsUpstream, tmp_path: Path, **kw: Any) -> Any:
    return await make_gateway(ws_config(ws_upstream.url, tmp_path, **kw))


async def session_of(rg: Any, token: str) -> dict[str, Any]:
    r = await rg.client.request("GET", "/auth/session", token=token)
    assert r.code == 200, r.body
    return body(r)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


async def connect(port: int, path: str = "/ws/echo", *, token: str | None = None,
                  headers: Any = None, subprotocols: list[str] | None = None,
                  compression_options: dict[str, Any] | None = None,
                  ) -> tornado.websocket.WebSocketClientConnection:
    """A Tornado WebSocket client through the gateway (a fresh connection)."""
    hdrs = tornado.httputil.HTTPHeaders()
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for k, v in items:
        hdrs.add(k, v)
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}{path}", headers=hdrs,
                                             connect_timeout=10, request_timeout=10)
    return await tornado.websocket.websocket_connect(request, subprotocols=subprotocols,
                                                     compression_options=compression_options)


async def read(conn: tornado.websocket.WebSocketClientConnection, within: float = 10.0) -> str | bytes | None:
    try:
        return await asyncio.wait_for(conn.read_message(), within)
    except asyncio.TimeoutError:
        raise AssertionError(f"no message within {within} s") from None


async def echo(conn: tornado.websocket.WebSocketClientConnection, message: str | bytes) -> None:
    await conn.write_message(message, binary=isinstance(message, bytes))
    got = await read(conn)
    assert got == message, (got, message)


async def wait_client_closed(conn: tornado.websocket.WebSocketClientConnection,
                             within: float = 5.0) -> tuple[int | None, str | None]:
    """Read (and drop) messages until the gateway closes the socket; fail if
    it is still open after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the client socket was still open after {within} s")
        try:
            message = await asyncio.wait_for(conn.read_message(), remaining)
        except asyncio.TimeoutError:
            raise AssertionError(f"the client socket was still open after {within} s") from None
        if message is None:
            return conn.close_code, conn.close_reason


async def assert_session_end_closes(conn: tornado.websocket.WebSocketClientConnection, up: UpConn) -> None:
    """The client side closes with 4401 and the upstream side with 1001, within 5 s."""
    code, reason = await wait_client_closed(conn, 5.0)
    assert code == 4401, (code, reason)
    up_code, up_reason = await up.wait_closed(5.0)
    assert up_code == 1001, (up_code, up_reason)


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


@dataclass
class RawAnswer:
    status: int
    headers: tornado.httputil.HTTPHeaders
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def code(self) -> int:  # so that gateway.testing's assert_error reads it like an HTTP response
        return self.status

    def close(self) -> None:
        self.writer.close()


async def raw_upgrade(port: int, path: str, headers: list[tuple[str, str]] | dict[str, str] | None = None, *,
                      key: str | None = None, token: str | None = None) -> RawAnswer:
    """Send an upgrade request as raw bytes; read the answer's head (and its
    body, unless it is a 101)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key or ws_key()}", "Sec-WebSocket-Version: 13"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    lines += [f"{k}: {v}" for k, v in items]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    status_line, _, rest = head.decode("latin-1").partition("\r\n")
    status = int(status_line.split()[1])
    parsed = tornado.httputil.HTTPHeaders.parse(rest)
    content = b""
    if status != 101:
        if "Content-Length" in parsed:
            content = await asyncio.wait_for(reader.readexactly(int(parsed["Content-Length"])), 20)
        elif parsed.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 20)).split(b";")[0], 16)
                chunk = await asyncio.wait_for(reader.readexactly(size + 2), 20)
                if size == 0:
                    break
                content += chunk[:-2]
    return RawAnswer(status, parsed, content, reader, writer)


def assert_refused(answer: RawAnswer, status: int, code: str, *, contains: Any = None) -> dict[str, Any]:
    """A normal HTTP JSON error answer, no upgrade."""
    try:
        assert answer.status != 101, "the gateway upgraded a request it should have refused"
        assert "Sec-WebSocket-Accept" not in answer.headers
        return assert_error(answer, status, code, contains=contains)  # type: ignore[arg-type]
    finally:
        answer.close()


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader, within: float = 10.0) -> tuple[bool, int, bytes]:
    """``(fin, opcode, payload)`` of one server frame (which must be unmasked)."""
    async def one() -> tuple[bool, int, bytes]:
        b0, b1 = await reader.readexactly(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await reader.readexactly(8))[0]
        return bool(b0 & 0x80), b0 & 0x0F, await reader.readexactly(n)
    return await asyncio.wait_for(one(), within)


async def read_raw_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One data message (reassembled from fragments; pings are skipped)."""
    opcode, parts = None, []
    for _ in range(1000):
        fin, op, payload = await read_frame(reader)
        if op in (0x9, 0xA):  # ping/pong interleaved: not part of the message
            continue
        if op == 0x8:
            raise AssertionError(f"closed while a message was expected: {payload!r}")
        if opcode is None:
            opcode = op
        parts.append(payload)
        if fin:
            return opcode, b"".join(parts)
    raise AssertionError("too many frames")


# ---------------------------------------------------------------------------
# Subprocess helpers (`bin/gateway serve`)
# ---------------------------------------------------------------------------


def write_serve_config(path: Path, *, port: int, ws_url: str, db: Path, workers: int = 1,
                       redis_url: str | None = None, route_extra: str = "") -> None:
    store = f'store = "redis"\nredis_url = "{redis_url}"' if redis_url else 'store = "memory"'
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
workers = {workers}

[sessions]
{store}
cookie_secure = false

[profiles]
store = "sqlite"
sqlite_path = "{db}"

[[routes]]
prefix = "/ws/"
upstream = "{ws_url}"
websocket = true
{route_extra}

[providers.password]
time_cost = 1
memory_cost = 64
parallelism = 1
""")


async def wait_listening(proc: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}: {output(proc)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("gateway did not start listening")


async def wait_workers(proc: subprocess.Popen, n: int) -> list[int]:
    for _ in range(200):
        workers = children_of(proc.pid)
        if len(workers) == n:
            return workers
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} workers, found {children_of(proc.pid)}")


def spawn(cfg: Path) -> subprocess.Popen:
    """``bin/gateway serve`` in its own process group.  Its output goes to a
    file, not a pipe: nobody reads a pipe while the test runs, and a full
    one would block the gateway's logging (one access line per request)."""
    log = open(cfg.with_suffix(".log"), "w+")
    proc = subprocess.Popen([GATEWAY, "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.flush()
    log.seek(0)
    return log.read()


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM the gateway; its output.  One that does not stop within 20 s
    is killed with its process group (and the output says so)."""
    note = ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        note = "\n(killed: did not stop on SIGTERM)"
    text = output(proc) + note
    proc.log.close()  # type: ignore[attr-defined]
    return text


def socket_owner(pids: list[int], server_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the gateway's end of the TCP connection from
    ``client_port`` (read from /proc/net/tcp and the processes' fd tables)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote = cols[1], cols[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = cols[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


def client_port(conn: tornado.websocket.WebSocketClientConnection) -> int:
    return conn.protocol.stream.socket.getsockname()[1]  # type: ignore[union-attr]


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(GATEWAY, *args, cwd=str(ROOT),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def field_of(output: str, name: str) -> str:
    for line in output.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in {output!r}")


# ---------------------------------------------------------------------------
# Before the upgrade: authentication, policy, errors
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_without_or_with_a_bad_credential_is_401_json(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    answer = await raw_upgrade(rg.port, "/ws/echo")
    assert_refused(answer, 401, "unauthenticated")
    assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer")
    answer = await raw_upgrade(rg.port, "/ws/echo", token="gws_" + "A" * 43)
    assert_refused(answer, 401, "unauthenticated")
    answer = await raw_upgrade(rg.port, "/ws/echo", {"X-API-Key": "gwk_nope_" + "B" * 43})
    assert_refused(answer, 401, "invalid_credentials")
    assert ws_upstream.conns == []


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_with_no_route_is_404_json(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    assert_refused(await raw_upgrade(rg.port, "/nowhere/echo", token=token), 404, "not_found")


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_on_a_route_without_websocket_is_400_saying_so(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    answer = await raw_upgrade(rg.port, "/plain/echo", token=token)
    assert_refused(answer, 400, "invalid_request", contains=("websocket", "WebSocket"))
    assert ws_upstream.conns == []
    # A plain HTTP request on that route still reaches the upstream (as HTTP:
    # the WebSocket handler there answers 400 to a request that is no upgrade).
    r = await rg.client.request("GET", "/plain/echo", token=token)
    assert r.code == 400 and b"Can \"Upgrade\" only to \"WebSocket\"" in r.body, (r.code, r.body)


@pytest.mark.gen_test(timeout=60)
async def test_session_on_a_scripts_only_route_is_403_json(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    assert_refused(await raw_upgrade(rg.port, "/scripts/echo", token=token), 403, "forbidden")
    assert ws_upstream.conns == []


@pytest.mark.gen_test(timeout=60)
async def test_unreachable_session_store_is_503_json(make_gateway, ws_upstream, tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        rg = await start(make_gateway, ws_upstream, tmp_path,
                         sessions={"store": "redis", "redis_url": redis.url, "redis_timeout": "0.3s"})
        token = (await rg.client.register())["token"]
        conn = await connect(rg.port, token=token)  # works while Redis is up
        await echo(conn, "up")
        conn.close()
    finally:
        redis.stop()  # (the gateway is stopped by the fixture)
    assert_refused(await raw_upgrade(rg.port, "/ws/echo", token=token), 503, "unavailable")
    assert len(ws_upstream.conns) == 1


@pytest.mark.gen_test(timeout=60)
async def test_upstream_refusing_the_handshake_is_502_json(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    answer = await raw_upgrade(rg.port, "/refuse/echo", token=token)
    data = assert_refused(answer, 502, "bad_gateway")
    assert "no websockets for you" not in data["message"]
    assert len(ws_upstream.refused) == 1  # it did get there


@pytest.mark.gen_test(timeout=60)
async def test_upstream_not_listening_is_502_json(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    data = assert_refused(await raw_upgrade(rg.port, "/down/echo", token=token), 502, "bad_gateway")
    for marker in ("Traceback", "Error(", "ConnectionRefused", "errno"):
        assert marker not in data["message"]


# ---------------------------------------------------------------------------
# Cross-Site WebSocket Hijacking: a cookie needs an allowed Origin
# ---------------------------------------------------------------------------


async def cookie_login(rg: Any) -> str:
    r = await rg.client.request("POST", "/auth/password/register",
                                json_body={"username": "alice", "password": "correct horse"})
    assert r.code == 201, r.body
    cookie = cookie_value(r)
    assert cookie
    return cookie


@pytest.mark.parametrize("extra", [
    pytest.param({}, id="no-origin"),
    pytest.param({"Origin": "https://evil.example"}, id="foreign-origin"),
    pytest.param({"Origin": "null"}, id="null-origin"),
    pytest.param({"Origin": "https://app.example.com.evil.example"}, id="lookalike-origin"),
    pytest.param({"Origin": "https://evil.example", "Referer": ALLOWED_ORIGIN + "/page"}, id="foreign-origin-allowed-referer"),
    pytest.param({"X-Requested-With": "XMLHttpRequest"}, id="x-requested-with-no-origin"),
])
@pytest.mark.gen_test(timeout=60)
async def test_cookie_upgrade_without_an_allowed_origin_is_403_csrf(make_gateway, ws_upstream, tmp_path, extra):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    cookie = await cookie_login(rg)
    answer = await raw_upgrade(rg.port, "/ws/echo", {"Cookie": f"gw_session={cookie}", **extra})
    assert_refused(answer, 403, "csrf")
    assert ws_upstream.conns == []


@pytest.mark.gen_test(timeout=60)
async def test_cookie_upgrade_from_an_allowed_or_the_gateways_own_origin_works(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    cookie = await cookie_login(rg)
    for origin in (ALLOWED_ORIGIN, f"http://127.0.0.1:{rg.port}"):
        conn = await connect(rg.port, headers={"Cookie": f"theme=dark; gw_session={cookie}", "Origin": origin})
        await echo(conn, f"from {origin}")
        up = ws_upstream.conns[-1]
        assert up.header("X-User-Id"), up.headers
        assert up.header("Cookie") == "theme=dark"  # the gateway's cookie is cut out, others pass
        assert cookie not in json.dumps(up.headers)
        conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_bearer_upgrade_needs_no_origin(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    answer = await raw_upgrade(rg.port, "/ws/echo", token=token)
    try:
        assert answer.status == 101, (answer.status, answer.body)
    finally:
        answer.close()
    conn = await connect(rg.port, token=token)
    await echo(conn, "no origin needed")
    conn.close()


# ---------------------------------------------------------------------------
# The upstream handshake: identity headers, nothing forged, no credential
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_the_101_and_the_upstream_share_one_request_id(make_gateway, ws_upstream, tmp_path):
    """Every response carries an X-Request-Id (the client's own when it sent
    a well-formed one), and it is what the upstream receives."""
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    answer = await raw_upgrade(rg.port, "/ws/echo", {"X-Request-Id": "trace-ws-42"}, token=token)
    try:
        assert answer.status == 101, (answer.status, answer.body)
        assert answer.headers.get("X-Request-Id") == "trace-ws-42"
        up = await ws_upstream.conn()
        assert up.header("X-Request-Id") == "trace-ws-42"
    finally:
        answer.close()
    answer = await raw_upgrade(rg.port, "/ws/echo", token=token)
    try:
        assert answer.status == 101, (answer.status, answer.body)
        generated = answer.headers.get("X-Request-Id")
        assert generated
        up = await ws_upstream.conn(count=2)
        assert up.header("X-Request-Id") == generated
    finally:
        answer.close()


FORGED = [
    ("X-User-Id", "admin"), ("x_user_id", "admin"), ("X-USER-ID", "admin"), ("X-Auth-Provider", "root"),
    ("x_auth_provider", "root"), ("X-Session-Id", "s_forged"), ("X-Auth-Scopes", "everything"),
    ("x_auth_scopes", "everything"), ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
]


@pytest.mark.gen_test(timeout=60)
async def test_upstream_handshake_carries_identity_and_no_forgery_or_credential(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    reg = await rg.client.register()
    token, user_id = reg["token"], reg["user"]["id"]
    session_id = (await session_of(rg, token))["session"]["id"]
    conn = await connect(rg.port, "/ws/echo?room=7&x=%20y", token=token,
                         headers=FORGED + [("X-Request-Id", "ws-req-0001"), ("Cookie", f"gw_session={token}; a=1"),
                                           ("X-Custom", "kept")])
    await echo(conn, "hi")
    up = ws_upstream.conns[-1]
    assert up.uri == "/ws/echo?room=7&x=%20y"
    assert sorted((canon(k), v) for k, v in up.identity()) == sorted(
        [("x-user-id", user_id), ("x-auth-provider", "password"), ("x-session-id", session_id)]), up.headers
    assert up.header("X-Request-Id") == "ws-req-0001"
    assert up.header("X-Forwarded-For") == "127.0.0.1"
    assert up.header("X-Forwarded-Proto") == "http"
    assert up.header("X-Forwarded-Host") == f"127.0.0.1:{rg.port}"
    assert up.header("X-Custom") == "kept"
    assert up.header("Cookie") == "a=1"
    dumped = json.dumps(up.headers)
    assert "gws_" not in dumped and token not in dumped
    assert "admin" not in dumped and "s_forged" not in dumped and "6.6.6.6" not in dumped and "evil.example" not in dumped
    assert up.header("Authorization") is None
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_public_websocket_route_strips_forged_identity(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, "/pub/echo", headers=FORGED + [("Authorization", f"Bearer {token}")])
    await echo(conn, "public")
    up = ws_upstream.conns[-1]
    assert up.identity() == [], up.headers
    assert "gws_" not in json.dumps(up.headers)
    assert up.header("X-Forwarded-For") == "127.0.0.1"
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_subprotocol_is_passed_through_and_the_upstreams_choice_returned(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token, subprotocols=["chat.v1", "chat.v2"])
    assert conn.selected_subprotocol == "chat.v2"
    up = ws_upstream.conns[-1]
    offered = [p.strip() for v in [up.header("Sec-WebSocket-Protocol") or ""] for p in v.split(",")]
    assert offered == ["chat.v1", "chat.v2"], up.headers
    await echo(conn, "v2")
    conn.close()
    # No subprotocol offered: none chosen, none sent.
    conn = await connect(rg.port, token=token)
    assert conn.selected_subprotocol is None
    assert ws_upstream.conns[-1].header("Sec-WebSocket-Protocol") is None
    conn.close()


# ---------------------------------------------------------------------------
# Frames both ways
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_text_and_binary_frames_both_ways(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await echo(conn, "hello, 世界")
    await echo(conn, bytes(range(256)) * 4)
    await echo(conn, b"")
    await echo(conn, "")
    up = ws_upstream.conns[-1]
    assert up.messages == ["hello, 世界", bytes(range(256)) * 4, b"", ""]
    assert isinstance(up.messages[1], bytes) and isinstance(up.messages[0], str)
    conn.close()


async def raw_ws(port: int, token: str) -> Any:
    """An aiohttp client that sees every ping and pong (it answers none itself)."""
    import aiohttp

    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(f"ws://127.0.0.1:{port}/ws/echo", autoping=False,
                                   headers={"Authorization": f"Bearer {token}"})
    except BaseException:
        await http.close()
        raise
    return http, ws


async def until(predicate: Any, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.gen_test(timeout=60)
async def test_client_ping_reaches_the_upstream_and_its_pong_comes_back(make_gateway, ws_upstream, tmp_path):
    import aiohttp

    rg = await start(make_gateway, ws_upstream, tmp_path, route={"websocket_ping_interval": 0})
    token = (await rg.client.register())["token"]
    http, ws = await raw_ws(rg.port, token)
    try:
        up = await ws_upstream.conn()
        await ws.ping(b"client-ping")
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.PONG and msg.data == b"client-ping", msg
        assert await until(lambda: up.pings), "the client's ping did not reach the upstream"
        assert up.pings == [b"client-ping"]
    finally:
        await ws.close()
        await http.close()


@pytest.mark.gen_test(timeout=60)
async def test_upstream_ping_reaches_the_client_and_its_pong_goes_back(make_gateway, ws_upstream, tmp_path):
    import aiohttp

    rg = await start(make_gateway, ws_upstream, tmp_path, route={"websocket_ping_interval": 0})
    token = (await rg.client.register())["token"]
    http, ws = await raw_ws(rg.port, token)
    try:
        up = await ws_upstream.conn()
        await ws.send_str("cmd:ping:upstream-ping")
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.PING and msg.data == b"upstream-ping", msg
        await ws.pong(msg.data)
        assert await until(lambda: up.pongs), "the client's pong did not reach the upstream"
        assert up.pongs == [b"upstream-ping"]
    finally:
        await ws.close()
        await http.close()


@pytest.mark.gen_test(timeout=60)
async def test_gateway_pings_idle_clients_at_the_route_interval(make_gateway, ws_upstream, tmp_path):
    import aiohttp

    rg = await start(make_gateway, ws_upstream, tmp_path, route={"websocket_ping_interval": "500ms"})
    token = (await rg.client.register())["token"]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{rg.port}/ws/echo", autoping=False,
                                   headers={"Authorization": f"Bearer {token}"}) as ws:
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.PING, msg
            await ws.pong(msg.data)
            await ws.send_str("still here")
            for _ in range(10):
                msg = await ws.receive(timeout=5)
                if msg.type == aiohttp.WSMsgType.PING:
                    await ws.pong(msg.data)
                    continue
                break
            assert msg.type == aiohttp.WSMsgType.TEXT and msg.data == "still here", msg


@pytest.mark.gen_test(timeout=60)
async def test_upstream_close_code_and_reason_reach_the_client(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await conn.write_message("cmd:close:4000:bye")
    assert await wait_client_closed(conn, 5) == (4000, "bye")


@pytest.mark.gen_test(timeout=60)
async def test_client_close_code_and_reason_reach_the_upstream(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await echo(conn, "before closing")
    up = ws_upstream.conns[-1]
    conn.close(4001, "done")
    assert await up.wait_closed(5) == (4001, "done")


@pytest.mark.gen_test(timeout=60)
async def test_fragmented_message_from_a_raw_client_is_reassembled(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    key = ws_key()
    answer = await raw_upgrade(rg.port, "/ws/echo", token=token, key=key)
    try:
        assert answer.status == 101, (answer.status, answer.body)
        assert answer.headers.get("Upgrade", "").lower() == "websocket"
        assert "upgrade" in answer.headers.get("Connection", "").lower()
        assert answer.headers.get("Sec-WebSocket-Accept") == accept_for(key)
        w = answer.writer
        w.write(frame(0x1, "frag-one ".encode(), fin=False))
        w.write(frame(0x0, "frag-twö ".encode(), fin=False))
        w.write(frame(0x0, b"frag-three", fin=True))
        await w.drain()
        up = await ws_upstream.conn()
        assert await ws_upstream.messages(up, 1) == ["frag-one frag-twö frag-three"]
        assert await read_raw_message(answer.reader) == (0x1, "frag-one frag-twö frag-three".encode())
        # A binary message in fragments too.
        w.write(frame(0x2, b"\x00\x01", fin=False))
        w.write(frame(0x0, b"\x02", fin=True))
        await w.drain()
        assert await read_raw_message(answer.reader) == (0x2, b"\x00\x01\x02")
        assert up.messages[1] == b"\x00\x01\x02"
        # A clean close: the close frame comes back, code 1000.
        w.write(frame(0x8, struct.pack(">H", 1000) + b"bye now"))
        await w.drain()
        for _ in range(10):
            fin, op, payload = await read_frame(answer.reader)
            if op == 0x8:
                assert struct.unpack(">H", payload[:2])[0] == 1000, payload
                break
        else:
            raise AssertionError("no close frame came back")
        assert (await up.wait_closed(5))[0] == 1000
    finally:
        answer.close()


@pytest.mark.gen_test(timeout=60)
async def test_websocket_max_message_size_bounds_one_message_either_way(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path, route={"websocket_max_message_size": "1KiB"})
    token = (await rg.client.register())["token"]
    # Client -> gateway: exactly the limit passes, one byte more closes with 1009.
    conn = await connect(rg.port, token=token)
    await echo(conn, "x" * 1024)
    await echo(conn, b"\x01" * 1024)
    up = ws_upstream.conns[-1]
    await conn.write_message("z" * 1025)
    code, _ = await wait_client_closed(conn, 5)
    assert code == 1009
    await up.wait_closed(5)
    assert "z" * 1025 not in up.messages
    # Upstream -> gateway: a message over the limit is not delivered; the upstream sees 1009.
    conn = await connect(rg.port, token=token)
    await echo(conn, "ok")
    up = ws_upstream.conns[-1]
    await conn.write_message("cmd:big:2000")
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline, "the client socket was still open after 5 s"
        message = await read(conn, 5)
        if message is None:
            break
        assert len(message) <= 1024, "a message over websocket_max_message_size was delivered"
    up_code, _ = await up.wait_closed(5)
    assert up_code == 1009


@pytest.mark.gen_test(timeout=120)
async def test_a_burst_of_1000_messages_keeps_its_order(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    expected = [f"message {i}" if i % 2 else f"message {i}".encode() for i in range(1000)]
    writes = [conn.write_message(m, binary=isinstance(m, bytes)) for m in expected]
    got = [await read(conn, 20) for _ in expected]
    await asyncio.gather(*writes)
    assert got == expected
    up = ws_upstream.conns[-1]
    assert up.messages == expected
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_idle_socket_outlives_the_http_timeouts(make_gateway, ws_upstream, tmp_path):
    """A WebSocket is not an HTTP request in flight: the client-connection
    idle timeout, the body timeout and the route's read timeout do not cut
    a quiet socket."""
    rg = await start(make_gateway, ws_upstream, tmp_path,
                     route={"read_timeout": "1s", "request_timeout": "1s", "websocket_ping_interval": 0},
                     server={"idle_connection_timeout": "1s", "body_timeout": "1s"})
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await echo(conn, "first")
    await asyncio.sleep(3)
    await echo(conn, "after three quiet seconds")
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_upgrade_to_a_refused_path_is_400_json(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    for path in ("/ws/../plain/echo", "/ws/%2e%2e/plain/echo", "/Ws/echo"):
        assert_refused(await raw_upgrade(rg.port, path, token=token), 400, "invalid_request")
    assert ws_upstream.conns == []


@pytest.mark.gen_test(timeout=60)
async def test_a_fragmented_message_over_the_limit_closes_with_1009(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path, route={"websocket_max_message_size": "1KiB"})
    token = (await rg.client.register())["token"]
    answer = await raw_upgrade(rg.port, "/ws/echo", token=token)
    try:
        assert answer.status == 101, (answer.status, answer.body)
        for i in range(3):  # 3 x 500 bytes: each fragment fits, the message does not
            answer.writer.write(frame(0x1 if i == 0 else 0x0, b"f" * 500, fin=i == 2))
        await answer.writer.drain()
        for _ in range(10):
            fin, op, payload = await read_frame(answer.reader)
            if op == 0x8:
                assert struct.unpack(">H", payload[:2])[0] == 1009, payload
                break
        else:
            raise AssertionError("no close frame")
        up = await ws_upstream.conn()
        await up.wait_closed(5)
        assert up.messages == []
    finally:
        answer.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_offers_compression_still_talks(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token, compression_options={})
    await echo(conn, "squeeze me " * 50)
    await echo(conn, b"\x00" * 300)
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_vanishes_frees_its_upstream_socket(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path)
    token = (await rg.client.register())["token"]
    answer = await raw_upgrade(rg.port, "/ws/echo", token=token)
    assert answer.status == 101, (answer.status, answer.body)
    answer.writer.write(frame(0x1, b"hello"))
    await answer.writer.drain()
    assert await read_raw_message(answer.reader) == (0x1, b"hello")
    up = ws_upstream.conns[-1]
    answer.writer.transport.abort()  # no close frame: the TCP connection just ends
    await up.wait_closed(5)


@pytest.mark.gen_test(timeout=60)
async def test_refreshing_the_token_does_not_end_the_socket(make_gateway, ws_upstream, tmp_path):
    """A refresh continues the session: the socket opened with the old token
    stays open after the old token's grace is over."""
    rg = await start(make_gateway, ws_upstream, tmp_path, sessions={"rotation_grace": "1s"})
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await echo(conn, "before")
    r = await rg.client.request("POST", "/auth/refresh", token=token)
    assert r.code == 200, r.body
    await asyncio.sleep(4)
    assert (await rg.client.request("GET", "/auth/session", token=token)).code == 401  # the grace is over
    await echo(conn, "after the old token's grace")
    conn.close()


# ---------------------------------------------------------------------------
# When the session ends, the socket ends (in-process)
# ---------------------------------------------------------------------------


STORES = [pytest.param("memory", id="memory"), pytest.param("redis", id="redis")]


async def start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url, **sessions):
    extra = {"store": "redis", "redis_url": redis_url} if store == "redis" else {}
    return await start(make_gateway, ws_upstream, tmp_path, sessions={**extra, **sessions})


@pytest.mark.parametrize("store", STORES)
@pytest.mark.gen_test(timeout=60)
async def test_logout_closes_the_socket_with_4401(make_gateway, ws_upstream, tmp_path, redis_url, store):
    rg = await start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url)
    token = (await rg.client.register())["token"]
    other = (await rg.client.login())["token"]
    conn = await connect(rg.port, token=token)
    keep = await connect(rg.port, token=other)
    await echo(conn, "a")
    await echo(keep, "b")
    up = ws_upstream.conns[0]
    r = await rg.client.request("POST", "/auth/logout", token=token)
    assert r.code == 204, r.body
    await assert_session_end_closes(conn, up)
    await echo(keep, "another session's socket stays open")
    assert_refused(await raw_upgrade(rg.port, "/ws/echo", token=token), 401, "unauthenticated")
    keep.close()


@pytest.mark.parametrize("store", STORES)
@pytest.mark.gen_test(timeout=60)
async def test_logout_all_closes_every_socket_of_the_user(make_gateway, ws_upstream, tmp_path, redis_url, store):
    rg = await start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url)
    token = (await rg.client.register())["token"]
    other = (await rg.client.login())["token"]
    bob = (await rg.client.register("bob"))["token"]
    conns = [await connect(rg.port, token=t) for t in (token, token, other)]
    bobs = await connect(rg.port, token=bob)
    for c in conns + [bobs]:
        await echo(c, "hi")
    ups = list(ws_upstream.conns[:3])
    r = await rg.client.request("POST", "/auth/logout-all", token=other)
    assert r.code == 204, r.body
    for c, up in zip(conns, ups):
        await assert_session_end_closes(c, up)
    await echo(bobs, "another user's socket stays open")
    bobs.close()


@pytest.mark.parametrize("store", STORES)
@pytest.mark.gen_test(timeout=60)
async def test_revoking_a_session_closes_its_socket(make_gateway, ws_upstream, tmp_path, redis_url, store):
    rg = await start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url)
    token = (await rg.client.register())["token"]
    other = (await rg.client.login())["token"]
    victim_id = (await session_of(rg, token))["session"]["id"]
    conn = await connect(rg.port, token=token)
    keep = await connect(rg.port, token=other)
    await echo(conn, "a")
    await echo(keep, "b")
    up = ws_upstream.conns[0]
    r = await rg.client.request("DELETE", f"/auth/sessions/{victim_id}", token=other)
    assert r.code == 204, r.body
    await assert_session_end_closes(conn, up)
    await echo(keep, "the revoking session's socket stays open")
    keep.close()


@pytest.mark.parametrize("store", STORES)
@pytest.mark.gen_test(timeout=60)
async def test_password_change_closes_the_users_other_sockets(make_gateway, ws_upstream, tmp_path, redis_url, store):
    rg = await start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url)
    token = (await rg.client.register())["token"]
    current = (await rg.client.login())["token"]
    conn = await connect(rg.port, token=token)
    keep = await connect(rg.port, token=current)
    await echo(conn, "a")
    await echo(keep, "b")
    up = ws_upstream.conns[0]
    r = await rg.client.request("POST", "/auth/password/change", token=current,
                                json_body={"old_password": "correct horse", "new_password": "battery staple"})
    assert r.code == 204, r.body
    await assert_session_end_closes(conn, up)
    await echo(keep, "the changing session's socket stays open")
    keep.close()


@pytest.mark.parametrize("store", STORES)
@pytest.mark.gen_test(timeout=60)
async def test_absolute_deadline_closes_the_socket(make_gateway, ws_upstream, tmp_path, redis_url, store):
    rg = await start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url, absolute_timeout="3s")
    logged_in = time.monotonic()
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await echo(conn, "within the deadline")
    up = ws_upstream.conns[0]
    code, reason = await wait_client_closed(conn, 3 + 5 - (time.monotonic() - logged_in))
    assert code == 4401, (code, reason)
    assert (await up.wait_closed(5))[0] == 1001


@pytest.mark.parametrize("store", STORES)
@pytest.mark.gen_test(timeout=60)
async def test_an_open_socket_keeps_its_session_from_going_idle(make_gateway, ws_upstream, tmp_path, redis_url, store):
    rg = await start_with_store(make_gateway, ws_upstream, tmp_path, store, redis_url,
                                idle_timeout="3s", touch_interval="1s")
    token = (await rg.client.register())["token"]
    conn = await connect(rg.port, token=token)
    await asyncio.sleep(7)  # more than twice the idle timeout, with no HTTP request
    await echo(conn, "still here")
    r = await rg.client.request("GET", "/auth/session", token=token)
    assert r.code == 200, r.body
    conn.close()


# ---------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_api_key_socket_carries_scopes_and_closes_after_revocation(make_gateway, ws_upstream, tmp_path):
    rg = await start(make_gateway, ws_upstream, tmp_path, providers={"apikey": {"cache_ttl": "1s"}})
    user_id = (await rg.client.register())["user"]["id"]
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f'[profiles]\nstore = "sqlite"\nsqlite_path = {json.dumps(str(tmp_path / "profiles.db"))}\n')
    code, out, err = await cli("apikey", "create", "--config", str(config_path), "--user", user_id,
                               "--name", "x", "--scopes", "a")
    assert code == 0, err
    key, key_id = field_of(out, "key"), field_of(out, "id")
    code, out, err = await cli("apikey", "create", "--config", str(config_path), "--user", user_id,
                               "--name", "y", "--scopes", "b")
    assert code == 0, err
    wrong_scope = field_of(out, "key")

    assert_refused(await raw_upgrade(rg.port, "/scripts/echo", {"X-API-Key": wrong_scope}), 403, "forbidden",
                   contains="a")
    conn = await connect(rg.port, "/scripts/echo", headers={"X-API-Key": key, "X-Auth-Scopes": "a b c"})
    bearer = await connect(rg.port, "/scripts/echo", headers={"Authorization": f"Bearer {key}"})
    await echo(conn, "scripted")
    await echo(bearer, "scripted too")
    ups = list(ws_upstream.conns)
    assert len(ups) == 2
    for up in ups:
        assert sorted((canon(k), v) for k, v in up.identity()) == sorted(
            [("x-user-id", user_id), ("x-auth-provider", "apikey"), ("x-auth-scopes", "a")]), up.headers
        dumped = json.dumps(up.headers)
        assert "gwk_" not in dumped and key not in dumped
        assert up.header("X-API-Key") is None and up.header("Authorization") is None

    code, _, err = await cli("apikey", "revoke", "--config", str(config_path), key_id)
    assert code == 0, err
    revoked_at = time.monotonic()
    for c, up in zip((conn, bearer), ups):
        got, reason = await wait_client_closed(c, max(0.5, 6 - (time.monotonic() - revoked_at)))
        assert got == 4401, (got, reason)
        assert (await up.wait_closed(5))[0] == 1001
    assert_refused(await raw_upgrade(rg.port, "/scripts/echo", {"X-API-Key": key}), 401, "invalid_credentials")


# ---------------------------------------------------------------------------
# Several workers: a logout-all reaches the sockets every worker holds
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_logout_all_closes_sockets_in_every_worker(ws_upstream, tmp_path, redis_url):
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_serve_config(cfg, port=port, ws_url=ws_upstream.url, db=tmp_path / "p.db", workers=2, redis_url=redis_url)
    proc = spawn(cfg)
    clients: list[Client] = []
    conns: list[tornado.websocket.WebSocketClientConnection] = []

    def fresh() -> Client:
        clients.append(Client(f"http://127.0.0.1:{port}"))
        return clients[-1]

    try:
        await wait_listening(proc, port)
        workers = await wait_workers(proc, 2)
        token = (await fresh().register())["token"]
        other = (await fresh().login())["token"]
        held: dict[int, int] = {pid: 0 for pid in workers}
        for i in range(60):  # bounded: until both workers hold at least two sockets (and at least eight in all)
            conn = await connect(port, token=token if i % 2 == 0 else other)
            conns.append(conn)
            await echo(conn, f"socket {i}")
            owner = socket_owner(workers, port, client_port(conn))
            assert owner is not None, "cannot tell which worker holds the socket"
            held[owner] += 1
            if len(conns) >= 8 and min(held.values()) >= 2:
                break
        assert min(held.values()) >= 1, f"every socket landed on one worker: {held}"
        await ws_upstream.conn(count=len(conns))
        ups = list(ws_upstream.conns)
        r = await fresh().request("POST", "/auth/logout-all", token=token, headers={"Connection": "close"})
        assert r.code == 204, r.body
        logged_out = time.monotonic()
        codes = []
        for conn in conns:
            code, _ = await wait_client_closed(conn, max(0.5, 5 - (time.monotonic() - logged_out)))
            codes.append(code)
        assert codes == [4401] * len(conns), (codes, held)
        for up in ups:
            assert (await up.wait_closed(5))[0] == 1001
    finally:
        for conn in conns:
            conn.close()
        for c in clients:
            c.close()
        err = stop(proc)
    assert proc.returncode == 0, err


@pytest.mark.gen_test(timeout=90)
async def test_sigterm_closes_open_sockets_and_the_gateway_exits(ws_upstream, tmp_path):
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_serve_config(cfg, port=port, ws_url=ws_upstream.url, db=tmp_path / "p.db")
    cfg.write_text(cfg.read_text().replace("workers = 1", 'workers = 1\nshutdown_timeout = "2s"'))
    proc = spawn(cfg)
    client = Client(f"http://127.0.0.1:{port}")
    conns: list[tornado.websocket.WebSocketClientConnection] = []
    try:
        await wait_listening(proc, port)
        token = (await client.register())["token"]
        conns = [await connect(port, token=token) for _ in range(3)]
        for c in conns:
            await echo(c, "up")
        proc.send_signal(signal.SIGTERM)
        codes = [(await wait_client_closed(c, 15))[0] for c in conns]
        # 1001 Going Away (RFC 6455 7.4.1: "a server going down"); not 4401,
        # which tells the client its session ended and it must log in again.
        assert codes == [1001] * 3, codes
        for up in ws_upstream.conns:
            await up.wait_closed(15)
        for _ in range(300):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.poll() is not None, "the gateway did not exit after SIGTERM"
    finally:
        for c in conns:
            c.close()
        client.close()
        err = stop(proc)
    assert proc.returncode == 0, err


# ---------------------------------------------------------------------------
# 1,000 idle sockets on one worker
# ---------------------------------------------------------------------------


@pytest.fixture
def many_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if now < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        pytest.skip(f"1,000 proxied sockets need ~2,500 file descriptors per process; RLIMIT_NOFILE allows {now}")
    yield now
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.gen_test(timeout=300)
async def test_a_thousand_idle_sockets_cost_bounded_memory_and_all_still_echo(many_descriptors, ws_upstream, tmp_path):
    port = free_port()
    cfg = tmp_path / "gateway.toml"
    write_serve_config(cfg, port=port, ws_url=ws_upstream.url, db=tmp_path / "p.db")
    proc = spawn(cfg)
    client = Client(f"http://127.0.0.1:{port}")
    conns: list[tornado.websocket.WebSocketClientConnection] = []
    try:
        await wait_listening(proc, port)
        workers = children_of(proc.pid)
        pid = workers[0] if len(workers) == 1 else proc.pid
        token = (await client.register())["token"]
        # Warm up the code paths, then take the baseline.
        warm = [await connect(port, token=token) for _ in range(20)]
        for c in warm:
            await echo(c, "warm")
            c.close()
        await asyncio.sleep(1)
        baseline = rss_bytes(pid)
        for start_at in range(0, 1000, 100):
            batch = await asyncio.gather(*(connect(port, token=token) for _ in range(100)))
            conns.extend(batch)
        assert len(conns) == 1000
        await ws_upstream.conn(count=1020, within=30)
        await asyncio.sleep(2)
        grown = rss_bytes(pid) - baseline
        assert grown < 100 << 20, f"RSS grew by {grown / (1 << 20):.1f} MiB for 1,000 idle sockets"

        async def check(i: int, conn: tornado.websocket.WebSocketClientConnection) -> None:
            await conn.write_message(f"still there {i}")
            got = await read(conn, 60)
            assert got == f"still there {i}", (i, got)

        await asyncio.gather(*(check(i, c) for i, c in enumerate(conns)))
        assert proc.poll() is None
    finally:
        for conn in conns:
            conn.close()
        client.close()
        err = stop(proc)
    assert proc.returncode == 0, err
