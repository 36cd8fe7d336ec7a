"""Shared fixtures: a real redis-server on a free port, a recording upstream
HTTP server on loopback, and a factory that starts a gateway on a free port.

Everything here is a real server; nothing of the gateway is patched.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.web

from gateway.app import Gateway
from gateway.config import load_config

ROOT = Path(__file__).resolve().parent.parent

# Fast hashing in tests: the cost parameters are configuration, not behaviour.
FAST_ARGON2 = {"time_cost": 1, "memory_cost": 64, "parallelism": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# processes, as /proc shows them
# ---------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------------------
# redis-server
# ---------------------------------------------------------------------------


class RedisServer:
    """A redis-server process of our own, on a free loopback port."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.workdir = workdir
        # persistent: data survives a restart on the same port (append-only file)
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; `make test` installs it with apt")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self.persistence,
             "--dir", str(self.workdir)],
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

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def command(self, *args: str) -> str:
        """Run a command with redis-cli-like raw RESP and return the raw reply."""
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload.encode())
            time.sleep(0.05)
            return s.recv(1 << 20).decode("utf-8", "replace")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def session_section(request) -> dict[str, Any]:
    """The [sessions] store settings, once for each store."""
    if request.param == "redis":
        return {"store": "redis", "redis_url": request.getfixturevalue("redis_url")}
    return {"store": "memory"}


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.command("FLUSHALL")
    return redis_server.url


# ---------------------------------------------------------------------------
# A recording upstream
# ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}


@dataclass
class Upstream:
    url: str
    port: int
    seen: list[Seen] = field(default_factory=list)

    @property
    def last(self) -> Seen:
        return self.seen[-1]


class RecordingHandler(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def compute_etag(self) -> None:
        return None

    async def _any(self, *args: str) -> None:
        r = self.request
        self.upstream.seen.append(Seen(r.method or "", r.path, r.query, list(r.headers.get_all()), r.body))
        path = r.path
        if path.endswith("/slow"):
            await asyncio.sleep(float(self.get_query_argument("s", "3")))
        if "/status/" in path:
            code = int(path.rsplit("/", 1)[1])
            self.set_status(code)
            if code in (204, 304):
                return self.finish()
        if path.endswith("/cookies"):
            self.add_header("Set-Cookie", "a=1; Path=/")
            self.add_header("Set-Cookie", "b=2; Path=/")
        if path.endswith("/stream"):
            for i in range(5):
                self.write(f"chunk{i}\n")
                await self.flush()
            return self.finish()
        if path.endswith("/big"):
            return self.finish(b"x" * (3 * 1024 * 1024))
        self.set_header("Content-Type", "application/json")
        self.set_header("X-Upstream", "yes")
        self.finish(json.dumps({"method": r.method, "path": r.path, "query": r.query,
                                "body": r.body.decode("utf-8", "replace")}))

    get = head = post = delete = patch = put = options = _any


@pytest.fixture
def upstream(io_loop) -> Upstream:
    port = free_port()
    up = Upstream(url=f"http://127.0.0.1:{port}", port=port)
    app = tornado.web.Application([(r".*", RecordingHandler, {"upstream": up})])
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, "127.0.0.1")
    yield up
    server.stop()


# ---------------------------------------------------------------------------
# The gateway under test
# ---------------------------------------------------------------------------


def base_config(upstream_url: str, tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A configuration dict for tests: memory sessions, SQLite in tmp_path."""
    config: dict[str, Any] = {
        "sessions": {"store": "memory", "cookie_secure": False},
        "profiles": {"store": "sqlite", "sqlite_path": str(tmp_path / "profiles.db")},
        "routes": [
            {"prefix": "/api/", "upstream": upstream_url, "auth": "required"},
            {"prefix": "/opt/", "upstream": upstream_url, "auth": "optional"},
            {"prefix": "/public/", "upstream": upstream_url, "auth": "public"},
        ],
        "providers": {"password": dict(FAST_ARGON2)},
    }
    for name, values in sections.items():
        if name == "routes":
            config["routes"] = values
        elif name == "providers":
            for pname, pvalues in values.items():
                config["providers"].setdefault(pname, {}).update(pvalues)
        else:
            config.setdefault(name, {}).update(values)
    return config


class Client:
    """A tiny JSON client for the gateway under test."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = tornado.httpclient.AsyncHTTPClient(force_instance=True)

    async def request(self, method: str, path: str, *, json_body: Any = None, body: bytes | str | None = None,
                      token: str | None = None, headers: dict[str, str] | None = None,
                      **kwargs: Any) -> tornado.httpclient.HTTPResponse:
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            body = json.dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""
        return await self.http.fetch(self.base_url + path, method=method, headers=hdrs, body=body,
                                     raise_error=False, allow_nonstandard_methods=True,
                                     follow_redirects=False, request_timeout=20, **kwargs)

    async def register(self, username: str = "alice", password: str = "correct horse", **kw: Any) -> dict[str, Any]:
        r = await self.request("POST", "/auth/password/register",
                               json_body={"username": username, "password": password}, **kw)
        assert r.code == 201, r.body
        return json.loads(r.body)

    async def login(self, username: str = "alice", password: str = "correct horse", **kw: Any) -> dict[str, Any]:
        r = await self.request("POST", "/auth/password/login",
                               json_body={"username": username, "password": password}, **kw)
        assert r.code == 200, r.body
        return json.loads(r.body)

    def close(self) -> None:
        self.http.close()


@dataclass
class RunningGateway:
    gateway: Gateway
    server: tornado.httpserver.HTTPServer
    port: int
    client: Client

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def make_gateway(io_loop, tmp_path):
    """``await make_gateway(config_dict)`` -> a started :class:`RunningGateway`."""
    running: list[RunningGateway] = []

    async def start(config: dict[str, Any], *, environ: dict[str, str] | None = None,
                    pm: Any = None) -> RunningGateway:
        cfg = load_config(data=config, environ=environ or {})
        gw = Gateway(cfg, pm=pm)
        await gw.start()
        port = free_port()
        server = tornado.httpserver.HTTPServer(gw.make_app(), max_body_size=cfg.server.max_body_size + 1)
        server.listen(port, "127.0.0.1")
        rg = RunningGateway(gw, server, port, Client(f"http://127.0.0.1:{port}"))
        running.append(rg)
        return rg

    yield start

    async def stop_all() -> None:
        for rg in running:
            rg.server.stop()
            await rg.server.close_all_connections()
            rg.client.close()
            await rg.gateway.stop()

    io_loop.run_sync(stop_all)


@pytest.fixture
def gw(make_gateway, upstream, tmp_path, io_loop) -> RunningGateway:
    """A gateway with the default test configuration."""
    return io_loop.run_sync(lambda: make_gateway(base_config(upstream.url, tmp_path)))


def body(response: tornado.httpclient.HTTPResponse) -> Any:
    return json.loads(response.body) if response.body else None


def cookie_header(response: tornado.httpclient.HTTPResponse, name: str = "gw_session") -> str | None:
    for value in response.headers.get_list("Set-Cookie"):
        if value.startswith(name + "="):
            return value
    return None


def cookie_value(response: tornado.httpclient.HTTPResponse, name: str = "gw_session") -> str | None:
    header = cookie_header(response, name)
    return header.split(";", 1)[0].split("=", 1)[1] if header else None



def assert_error(r: tornado.httpclient.HTTPResponse, status: int, code: str, *,
                 contains: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """``r`` is the gateway's JSON error: this status and code, a message for
    people (holding one of ``contains``), no stack trace."""
    assert r.code == status, (r.code, r.body)
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers.get("Content-Type")
    assert b"Traceback" not in r.body
    data = body(r)
    assert set(data) == {"error", "message"}, data
    assert data["error"] == code, data
    assert isinstance(data["message"], str) and data["message"]
    if contains is not None:
        words = (contains,) if isinstance(contains, str) else contains
        assert any(w in data["message"] for w in words), (words, data)
    return data
