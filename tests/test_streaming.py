"""The proxy's data path: request bodies streamed to the upstream with
backpressure, route policy decided from the headers before any body byte,
body limits, the read and request timeouts of long transfers, slow clients,
and how a misbehaving upstream is answered.

The upstreams here are raw asyncio servers on loopback that parse HTTP/1.1
themselves, so they see exactly what arrives and when, and can stall, reset
or misbehave on cue.  Clients are raw sockets where framing matters.
Transfers of 1 GiB go through a `bin/gateway serve` subprocess whose memory
is read from /proc/<pid>/status (VmRSS); their bytes are generated on the
fly and hashed on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest
import tornado.httpclient
import tornado.httputil

from conftest import FAST_ARGON2, ROOT, base_config, body, free_port, rss_bytes

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------
# Waiting (bounded)
# ---------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` (a text, or a
    callable giving one, evaluated then) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


async def plateau(value: Callable[[], int], *, quiet: float = 1.5, limit: float = 30.0) -> int:
    """Wait until ``value()`` has not changed for ``quiet`` s (at most ``limit`` s); return it."""
    deadline = time.monotonic() + limit
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return value()


# ---------------------------------------------------------------------------
# Bytes generated on the fly
# ---------------------------------------------------------------------------


def pattern(total: int, block: int = MiB, seed: int = 1234) -> Iterator[bytes]:
    """``total`` bytes in blocks: a seeded random block, each copy stamped
    with its index, so no two blocks are equal and nothing big is held."""
    base = random.Random(seed).randbytes(block)
    sent, i = 0, 0
    while sent < total:
        n = min(block, total - sent)
        yield (i.to_bytes(8, "big") + base[8:])[:n]
        sent += n
        i += 1


def digest_of(total: int, block: int = MiB, seed: int = 1234) -> str:
    h = hashlib.sha256()
    for b in pattern(total, block, seed):
        h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# A raw HTTP/1.1 upstream
# ---------------------------------------------------------------------------


@dataclass
class UpRequest:
    conn: int  # which connection it came on (0, 1, ...)
    index: int  # its position on that connection (0 = first request)
    method: str
    target: str
    headers: list[tuple[str, str]]
    length: int  # Content-Length (0 when absent or chunked)
    chunked: bool
    received: int = 0  # body bytes (decoded) received so far
    digest: Any = field(default_factory=hashlib.sha256)
    data: bytearray = field(default_factory=bytearray)  # the first KEEP bytes of the body
    complete: bool = False  # the whole body arrived (for chunked: the last chunk)
    aborted: bool = False  # the connection ended before the body did

    KEEP = 1 << 20

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def sha256(self) -> str:
        return self.digest.copy().hexdigest()

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


Respond = Callable[[UpRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]


class RawUpstream:
    """An upstream that parses requests itself and hashes bodies as they
    arrive.  ``respond(req, reader, writer)`` answers a request once its
    body is in (returning False closes the connection); the default answers
    200 with the body's SHA-256 and length.  ``hold`` (an Event), when set
    up, keeps the body unread until it is set."""

    def __init__(self, respond: Respond | None = None) -> None:
        self.respond = respond or answer_digest
        self.requests: list[UpRequest] = []
        self.connections = 0
        self.open_connections = 0
        self.sent = 0  # body bytes written by generating responders
        self.sent_digest = hashlib.sha256()
        self.hold: asyncio.Event | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RawUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MiB)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.transport.abort()
        if self.hold is not None:
            self.hold.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        self.open_connections += 1
        self.writers.append(writer)
        req: UpRequest | None = None
        try:
            index = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                req = parse_request_head(conn, index, head)
                index += 1
                self.requests.append(req)
                if self.hold is not None:
                    await self.hold.wait()
                await read_request_body(reader, req)
                if await self.respond(req, reader, writer) is False:
                    return
                req = None
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass
        finally:
            if req is not None and not req.complete:
                req.aborted = True
            self.open_connections -= 1
            writer.transport.abort()


def parse_request_head(conn: int, index: int, head: bytes) -> UpRequest:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:] if line]
    req = UpRequest(conn, index, method, target, headers, 0, False)  # type: ignore[arg-type]
    req.chunked = "chunked" in (req.header("Transfer-Encoding") or "").lower()
    if not req.chunked and req.header("Content-Length") is not None:
        req.length = int(req.header("Content-Length") or 0)
    return req


async def _read_exactly_into(reader: asyncio.StreamReader, req: UpRequest, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, 256 * KiB))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)
        req.received += len(data)
        req.digest.update(data)
        if len(req.data) < req.KEEP:
            req.data += data[: req.KEEP - len(req.data)]


async def read_request_body(reader: asyncio.StreamReader, req: UpRequest) -> None:
    if req.chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            await _read_exactly_into(reader, req, size)
            if await reader.readexactly(2) != b"\r\n":
                raise ValueError("bad chunk")
    else:
        await _read_exactly_into(reader, req, req.length)
    req.complete = True


async def send_json(writer: asyncio.StreamWriter, status: int, obj: Any, reason: str = "OK") -> None:
    data = json.dumps(obj).encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


async def answer_digest(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await send_json(writer, 200, {"sha256": req.sha256, "length": req.received, "method": req.method,
                                  "path": req.path})


def big_response(up: RawUpstream, total: int, *, small_buffer: bool = True) -> Respond:
    """A responder sending ``total`` generated bytes (Content-Length), as
    fast as the gateway reads them; ``up.sent`` counts what it wrote."""

    async def respond(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if small_buffer:
            writer.transport.set_write_buffer_limits(high=64 * KiB)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {total}\r\n\r\n".encode())
        for block in pattern(total):
            writer.write(block)
            up.sent += len(block)
            up.sent_digest.update(block)
            await writer.drain()

    return respond


@pytest.fixture
def raw_up(io_loop):
    """``await raw_up(respond=None)`` -> a started :class:`RawUpstream`."""
    started: list[RawUpstream] = []

    async def make(respond: Respond | None = None) -> RawUpstream:
        up = await RawUpstream(respond).start()
        started.append(up)
        return up

    yield make

    async def close_all() -> None:
        for up in started:
            await up.close()

    io_loop.run_sync(close_all)


# ---------------------------------------------------------------------------
# A raw client
# ---------------------------------------------------------------------------


async def connect(port: int, limit: int = 64 * KiB) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=limit)


def request_head(method: str, path: str, headers: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def read_head(reader: asyncio.StreamReader) -> tuple[int, tornado.httputil.HTTPHeaders]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    return status, tornado.httputil.HTTPHeaders.parse("\r\n".join(lines[1:]))


async def iter_body(reader: asyncio.StreamReader, headers: tornado.httputil.HTTPHeaders,
                    status: int = 200, method: str = "GET") -> AsyncIterator[bytes]:
    """The response body, as it arrives (Content-Length, chunked or until close)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            left = size
            while left:
                data = await reader.read(min(left, MiB))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data
            await reader.readexactly(2)
    elif "Content-Length" in headers:
        left = int(headers["Content-Length"])
        while left:
            data = await reader.read(min(left, MiB))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
    else:
        while data := await reader.read(MiB):
            yield data


async def read_response(reader: asyncio.StreamReader, method: str = "GET"
                        ) -> tuple[int, tornado.httputil.HTTPHeaders, bytes]:
    status, headers = await read_head(reader)
    data = b"".join([part async for part in iter_body(reader, headers, status, method)])
    return status, headers, data


def check_error(status: int, headers: tornado.httputil.HTTPHeaders, data: bytes, expected: int, code: str,
                contains: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """The gateway's JSON error: this status and code, a message for people."""
    assert status == expected, (status, data[:500])
    assert headers.get("Content-Type", "").startswith("application/json"), headers.get("Content-Type")
    assert b"Traceback" not in data
    obj = json.loads(data)
    assert set(obj) == {"error", "message"} and obj["error"] == code, obj
    assert isinstance(obj["message"], str) and obj["message"]
    if contains is not None:
        words = (contains,) if isinstance(contains, str) else contains
        assert any(w.lower() in obj["message"].lower() for w in words), (words, obj)
    return obj


async def send_blocks(writer: asyncio.StreamWriter, blocks: Iterator[bytes], digest: Any | None = None,
                      *, framing: Callable[[bytes], bytes] = lambda b: b) -> int:
    """Write ``blocks`` with backpressure; returns the bytes sent before the
    peer hung up (everything, when it did not)."""
    sent = 0
    for block in blocks:
        try:
            writer.write(framing(block))
            await writer.drain()
        except (ConnectionError, OSError):
            return sent
        if digest is not None:
            digest.update(block)
        sent += len(block)
    return sent


def close_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


# ---------------------------------------------------------------------------
# `bin/gateway serve` as a subprocess
# ---------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path: Path, config: dict[str, Any]) -> None:
    out: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        out.append(f"[{name}]")
        nested = {}
        for k, v in values.items():
            if isinstance(v, dict):
                nested[k] = v
            else:
                out.append(f"{k} = {toml_value(v)}")
        out.append("")
        for k, v in nested.items():
            table(f"{name}.{k}", v)

    for name, values in config.items():
        if name == "routes":
            for route in values:
                out.append("[[routes]]")
                out.extend(f"{k} = {toml_value(v)}" for k, v in route.items())
                out.append("")
        else:
            table(name, values)
    path.write_text("\n".join(out))


class GatewayProcess:
    """`bin/gateway serve` (one process) on a free port; its output goes to a file."""

    def __init__(self, tmp_path: Path, routes: list[dict[str, Any]], server: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.config = {
            "server": {"host": "127.0.0.1", "port": self.port, "workers": 1, **(server or {})},
            "sessions": {"store": "memory", "cookie_secure": False},
            "profiles": {"store": "sqlite", "sqlite_path": str(tmp_path / "gateway-profiles.db")},
            "providers": {"password": dict(FAST_ARGON2)},
            "routes": routes,
        }
        self.log_path = tmp_path / "gateway.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> "GatewayProcess":
        cfg = self.tmp_path / "gateway.toml"
        write_toml(cfg, self.config)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(ROOT / "bin" / "gateway"), "serve", "--config", str(cfg)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}: {self.output()}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("gateway did not start listening: " + self.output()) from None
                await asyncio.sleep(0.1)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss(self) -> int:
        """VmRSS in bytes."""
        return rss_bytes(self.pid)

    async def stop(self, timeout: float = 15.0) -> float:
        """SIGTERM; the seconds it took to exit.  One that does not exit
        within ``timeout`` is killed and fails the test."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None:
            if time.monotonic() - started > timeout:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"the gateway did not exit within {timeout:g} s of SIGTERM")
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                await self.stop()
        finally:
            self.log.close()


class RssWatch:
    """Samples a process's VmRSS every 50 ms while the block runs; ``peak``."""

    def __init__(self, gp: GatewayProcess) -> None:
        self.gp = gp
        self.peak = 0
        self._task: asyncio.Task | None = None

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.gp.rss())
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> "RssWatch":
        self.peak = self.start = self.gp.rss()
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, self.gp.rss())
        print(f"gateway RSS: {self.start >> 20} MiB at the start, {self.peak >> 20} MiB at the peak")


async def upload(port: int, path: str, total: int, *, chunked: bool = False,
                 headers: list[tuple[str, str]] = ()) -> tuple[int, dict[str, Any] | bytes, str, int]:  # type: ignore[assignment]
    """POST ``total`` generated bytes; (status, JSON or raw body, sha256 sent, bytes sent)."""
    reader, writer = await connect(port)
    try:
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(total))]
        writer.write(request_head("POST", path, [("Content-Type", "application/octet-stream"), *framing,
                                                 *headers]))
        digest = hashlib.sha256()
        sent = await send_blocks(writer, pattern(total), digest, framing=chunk if chunked else (lambda b: b))
        if chunked and sent == total:
            writer.write(b"0\r\n\r\n")
        status, rheaders, data = await read_response(reader)
        try:
            parsed: dict[str, Any] | bytes = json.loads(data)
        except ValueError:
            parsed = data
        return status, parsed, digest.hexdigest(), sent
    finally:
        close_quietly(writer)


async def warm_up(port: int, path: str) -> None:
    """A few transfers first, so that the baseline RSS is taken with the
    gateway's code paths (imports, pools, buffers) already in use."""
    for _ in range(3):
        status, data, sent_sha, _ = await upload(port, path, 4 * MiB)
        assert status == 200, data
        reader, writer = await connect(port)
        try:
            writer.write(request_head("GET", path + "?warm"))
            status, headers, data = await read_response(reader)
        finally:
            close_quietly(writer)


def upstream_config(up_url: str, tmp_path: Path, routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return base_config(up_url, tmp_path, routes=routes, **sections)


# ---------------------------------------------------------------------------
# 1. Request bodies
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_401_for_a_huge_post_is_answered_at_once_and_nothing_reaches_the_upstream(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/api/", "upstream": up.url, "auth": "required", "max_body_size": "2GiB"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/upload", [("Content-Type", "application/octet-stream"),
                                                          ("Content-Length", str(GiB))]) + b"hello")
        await writer.drain()
        # Only 5 of the 1 GiB announced were sent: an answer means the
        # decision was made from the headers.
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 401, "unauthenticated")
    await asyncio.sleep(0.3)
    assert up.connections == 0 and up.requests == []


@pytest.mark.gen_test(timeout=30)
async def test_route_policy_refuses_a_huge_post_from_its_headers(make_gateway, raw_up, tmp_path):
    """A session on a route for scripts only (allow_sessions = false): 403 at once."""
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/scripts/", "upstream": up.url, "auth": "required", "allow_sessions": False,
         "max_body_size": "2GiB"}]))
    token = (await rg.client.register())["token"]
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/scripts/import", [
            ("Content-Type", "application/octet-stream"), ("Content-Length", str(GiB)),
            ("Authorization", f"Bearer {token}")]) + b"hello")
        await writer.drain()
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 403, "forbidden")
    await asyncio.sleep(0.3)
    assert up.connections == 0 and up.requests == []


@pytest.mark.gen_test(timeout=30)
async def test_expect_100_continue_only_once_the_request_is_allowed(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/api/", "upstream": up.url, "auth": "required"}]))
    payload = b'{"order": 42}'

    # Unauthenticated: the 401 is the first (and only) answer, never a 100.
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/orders", [("Content-Type", "application/json"),
                                                          ("Content-Length", str(len(payload))),
                                                          ("Expect", "100-continue")]))
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 401, status
        data = b"".join([p async for p in iter_body(reader, headers, status)])
        check_error(status, headers, data, 401, "unauthenticated")
    finally:
        close_quietly(writer)
    assert up.requests == []

    # Allowed, but announcing more than the route takes: the 413, never a 100.
    token = (await rg.client.register())["token"]
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/orders", [("Content-Type", "application/json"),
                                                          ("Content-Length", str(20 * MiB)),
                                                          ("Authorization", f"Bearer {token}"),
                                                          ("Expect", "100-continue")]))
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 413, status
        data = b"".join([p async for p in iter_body(reader, headers, status)])
        check_error(status, headers, data, 413, "payload_too_large")
    finally:
        close_quietly(writer)
    assert up.requests == []

    # Authenticated: 100 Continue, then the body goes through.
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/api/orders", [("Content-Type", "application/json"),
                                                          ("Content-Length", str(len(payload))),
                                                          ("Authorization", f"Bearer {token}"),
                                                          ("Expect", "100-continue")]))
        await writer.drain()
        status, _ = await asyncio.wait_for(read_head(reader), 5)
        assert status == 100, status
        assert up.requests == [] or up.requests[0].received == 0
        writer.write(payload)
        status, headers, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        close_quietly(writer)
    assert status == 200, data
    assert json.loads(data)["sha256"] == hashlib.sha256(payload).hexdigest()
    assert [r.method for r in up.requests] == ["POST"]
    assert up.requests[0].header("Expect") is None  # the gateway answered it; hop-by-hop


@pytest.mark.gen_test(timeout=30)
async def test_content_length_over_the_route_limit_is_413_before_anything_is_forwarded(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/small/", "upstream": up.url, "auth": "public", "max_body_size": "1KiB"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/small/x", [("Content-Type", "application/octet-stream"),
                                                       ("Content-Length", "2048")]) + b"0123456789")
        await writer.drain()
        status, headers, data = await asyncio.wait_for(read_response(reader), 5)
    finally:
        close_quietly(writer)
    check_error(status, headers, data, 413, "payload_too_large")
    await asyncio.sleep(0.3)
    assert up.requests == []
    # Exactly the limit passes.
    r = await rg.client.request("POST", "/small/x", body=b"a" * 1024)
    assert r.code == 200, r.body
    assert body(r)["length"] == 1024


@pytest.mark.gen_test(timeout=30)
async def test_chunked_body_crossing_the_limit_is_cut_and_the_upstream_request_aborted(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    limit = 64 * KiB
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/small/", "upstream": up.url, "auth": "public", "max_body_size": "64KiB"}]))
    reader, writer = await connect(rg.port)
    answer = asyncio.ensure_future(read_response(reader))
    try:
        writer.write(request_head("POST", "/small/x", [("Content-Type", "application/octet-stream"),
                                                       ("Transfer-Encoding", "chunked")]))
        for i in range(40):  # 640 KiB at most, far past the limit
            if answer.done():
                break
            try:
                writer.write(chunk(bytes([65 + i % 26]) * (16 * KiB)))
                await writer.drain()
            except (ConnectionError, OSError):
                break
            await asyncio.sleep(0.02)
        try:
            status, headers, data = await asyncio.wait_for(answer, 5)
        except (ConnectionError, asyncio.IncompleteReadError):
            status = None  # cut with a reset before the answer could be read
    finally:
        close_quietly(writer)
    if status is not None:
        check_error(status, headers, data, 413, "payload_too_large")
    # The upstream never saw a complete request, nor a byte past the limit,
    # and its request was ended.
    await until(lambda: all(r.aborted for r in up.requests), 5, lambda: "the upstream request is aborted: "
                + repr([(r.received, r.complete, r.aborted) for r in up.requests]))
    assert not any(r.complete for r in up.requests), [(r.received, r.complete) for r in up.requests]
    assert all(r.received <= limit for r in up.requests), [r.received for r in up.requests]


@pytest.mark.gen_test(timeout=30)
async def test_request_body_reaches_the_upstream_as_it_arrives(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public"}]))
    total = 4 * MiB
    blocks = list(pattern(total, block=256 * KiB))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/up/file", [("Content-Type", "application/octet-stream"),
                                                       ("Content-Length", str(total))]))
        writer.write(blocks[0])
        await writer.drain()
        await until(lambda: bool(up.requests) and up.requests[0].received >= len(blocks[0]), 5,
                    "the upstream receives the first 256 KiB before the rest is sent")
        assert not up.requests[0].complete
        for b in blocks[1:]:
            writer.write(b)
            await writer.drain()
        status, _, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        close_quietly(writer)
    assert status == 200, data
    assert json.loads(data) == {"sha256": hashlib.sha256(b"".join(blocks)).hexdigest(), "length": total,
                                "method": "POST", "path": "/up/file"}


@pytest.mark.gen_test(timeout=30)
async def test_chunked_request_body_streams_too(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public"}]))
    parts = [os.urandom(100_000), os.urandom(70_000), os.urandom(123_457)]
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("POST", "/up/chunks", [("Content-Type", "application/octet-stream"),
                                                         ("Transfer-Encoding", "chunked")]))
        so_far = 0
        for p in parts:
            writer.write(chunk(p))
            await writer.drain()
            so_far += len(p)
            await until(lambda: bool(up.requests) and up.requests[0].received >= so_far, 5,
                        f"the upstream receives each chunk as it is sent ({so_far} bytes)")
            assert not up.requests[0].complete
        writer.write(b"0\r\n\r\n")
        status, _, data = await asyncio.wait_for(read_response(reader), 10)
    finally:
        close_quietly(writer)
    assert status == 200, data
    assert json.loads(data)["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert up.requests[0].complete and up.requests[0].received == sum(map(len, parts))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.gen_test(timeout=30)
async def test_client_stalling_mid_body_is_cut_after_read_timeout(make_gateway, raw_up, tmp_path, framing):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public", "read_timeout": "1s"}]))
    reader, writer = await connect(rg.port)
    try:
        if framing == "chunked":
            writer.write(request_head("POST", "/up/stall", [("Content-Type", "application/octet-stream"),
                                                            ("Transfer-Encoding", "chunked")])
                         + chunk(b"s" * (64 * KiB)))
        else:
            writer.write(request_head("POST", "/up/stall", [("Content-Type", "application/octet-stream"),
                                                            ("Content-Length", str(MiB))]) + b"s" * (64 * KiB))
        await writer.drain()
        await until(lambda: bool(up.requests), 5, "the upload starts upstream")
        # Then the client goes silent: within a few read_timeouts the
        # gateway hangs up on it (with or without an error answer).
        try:
            rest = await asyncio.wait_for(reader.read(), 8)
        except ConnectionError:
            rest = b""
        except asyncio.TimeoutError:
            raise AssertionError("the gateway kept waiting for a stalled request body") from None
    finally:
        close_quietly(writer)
    assert not rest.startswith(b"HTTP/1.1 2"), rest[:200]
    await until(lambda: all(r.aborted for r in up.requests), 5, lambda: "the upstream request is aborted: "
                + repr([(r.received, r.complete, r.aborted) for r in up.requests]))
    assert not any(r.complete for r in up.requests)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.gen_test(timeout=30)
async def test_client_going_away_mid_body_aborts_the_upstream_request(make_gateway, raw_up, tmp_path, framing):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public"}]))
    reader, writer = await connect(rg.port)
    part = b"g" * (100 * KiB)
    try:
        if framing == "chunked":
            writer.write(request_head("POST", "/up/gone", [("Content-Type", "application/octet-stream"),
                                                           ("Transfer-Encoding", "chunked")]) + chunk(part))
        else:
            writer.write(request_head("POST", "/up/gone", [("Content-Type", "application/octet-stream"),
                                                           ("Content-Length", str(MiB))]) + part)
        await writer.drain()
        await until(lambda: bool(up.requests) and up.requests[0].received >= len(part), 5,
                    "the first 100 KiB reach the upstream")
    finally:
        writer.close()  # the client goes away mid-body
    await until(lambda: all(r.aborted for r in up.requests), 5, lambda: "the upstream request is aborted: "
                + repr([(r.received, r.complete, r.aborted) for r in up.requests]))
    assert not any(r.complete for r in up.requests)


@pytest.mark.parametrize("limit", ["100MiB", 0], ids=["100MiB", "no-limit"])
@pytest.mark.gen_test(timeout=60)
async def test_20_mb_upload_passes_intact(make_gateway, raw_up, tmp_path, limit):
    """Past server.max_body_size (10 MiB) on a route that allows more, or has no limit (0)."""
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/up/", "upstream": up.url, "auth": "public", "max_body_size": limit}]))
    payload = random.Random(20).randbytes(20_000_000)
    r = await rg.client.request("POST", "/up/big", body=payload, headers={"Content-Type": "application/octet-stream"})
    assert r.code == 200, r.body[:500]
    assert body(r)["sha256"] == hashlib.sha256(payload).hexdigest()
    assert body(r)["length"] == len(payload)


@pytest.mark.gen_test(timeout=120)
async def test_upstream_not_reading_the_body_stops_the_client_upload(tmp_path, raw_up):
    """Backpressure: while the upstream reads nothing, the gateway stops
    reading from the client (the client's writes block) and holds little."""
    up = await raw_up()
    up.hold = asyncio.Event()
    total = 512 * MiB
    async with GatewayProcess(tmp_path, [{"prefix": "/up/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "1GiB", "read_timeout": "60s"}]) as gp:
        up.hold.set()
        await warm_up(gp.port, "/up/warm")
        up.hold = asyncio.Event()
        base = gp.rss()
        reader, writer = await connect(gp.port)
        digest = hashlib.sha256()
        sent = 0
        blocks = pattern(total)
        try:
            writer.transport.set_write_buffer_limits(high=64 * KiB)
            writer.write(request_head("POST", "/up/held", [("Content-Type", "application/octet-stream"),
                                                           ("Content-Length", str(total))]))
            async with RssWatch(gp) as watch:
                stalled = False
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    block = next(blocks)
                    writer.write(block)
                    digest.update(block)
                    sent += len(block)
                    try:
                        await asyncio.wait_for(writer.drain(), 2)
                    except asyncio.TimeoutError:
                        stalled = True
                        break
                assert stalled, f"the client sent {sent >> 20} MiB while the upstream read nothing"
                assert sent < 128 * MiB, sent
                held_peak = watch.peak
            assert held_peak - base < 50 * MiB, (base >> 20, held_peak >> 20)
            # Released: the rest flows, intact.
            up.hold.set()
            for block in blocks:
                writer.write(block)
                digest.update(block)
                sent += len(block)
                await writer.drain()
            status, _, data = await asyncio.wait_for(read_response(reader), 60)
        finally:
            close_quietly(writer)
    assert status == 200, data
    assert json.loads(data)["sha256"] == digest.hexdigest() and sent == total


@pytest.mark.gen_test(timeout=300)
async def test_1_gib_upload_through_a_subprocess_with_bounded_memory(tmp_path, raw_up):
    up = await raw_up()
    async with GatewayProcess(tmp_path, [{"prefix": "/up/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "2GiB", "read_timeout": "60s"}]) as gp:
        await warm_up(gp.port, "/up/warm")
        base = gp.rss()
        async with RssWatch(gp) as watch:
            status, data, sent_sha, sent = await upload(gp.port, "/up/huge", GiB)
    assert status == 200, data
    assert sent == GiB
    assert data == {"sha256": sent_sha, "length": GiB, "method": "POST", "path": "/up/huge"}
    assert watch.peak - base < 50 * MiB, (base >> 20, watch.peak >> 20)


@pytest.mark.gen_test(timeout=300)
async def test_1_gib_download_through_a_subprocess_with_bounded_memory(tmp_path, raw_up):
    up = await raw_up()
    total = GiB

    async def respond(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if "warm" in req.target:
            return await answer_digest(req, reader, writer)
        return await big_response(up, total, small_buffer=False)(req, reader, writer)

    up.respond = respond
    async with GatewayProcess(tmp_path, [{"prefix": "/down/", "upstream": up.url, "auth": "public",
                                          "max_body_size": "64MiB"}]) as gp:
        await warm_up(gp.port, "/down/warm")
        base = gp.rss()
        got = hashlib.sha256()
        received = 0
        async with RssWatch(gp) as watch:
            reader, writer = await connect(gp.port, limit=4 * MiB)
            try:
                writer.write(request_head("GET", "/down/huge"))
                status, headers = await asyncio.wait_for(read_head(reader), 10)
                assert status == 200
                async for part in iter_body(reader, headers, status):
                    got.update(part)
                    received += len(part)
            finally:
                close_quietly(writer)
    assert received == total == up.sent
    assert got.hexdigest() == up.sent_digest.hexdigest()
    assert watch.peak - base < 50 * MiB, (base >> 20, watch.peak >> 20)


# ---------------------------------------------------------------------------
# 2. Long responses
# ---------------------------------------------------------------------------


async def wait_for_close(reader: asyncio.StreamReader, limit: float) -> None:
    """Hold the upstream's side open until the gateway hangs up (at most ``limit`` s)."""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        while await asyncio.wait_for(reader.read(65536), limit):
            pass


@pytest.mark.gen_test(timeout=30)
async def test_request_timeout_bounds_the_wait_for_the_response_head(make_gateway, raw_up, tmp_path):
    async def never_answers(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await wait_for_close(reader, 10)
        return False

    up = await raw_up(never_answers)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/slow/", "upstream": up.url, "auth": "public", "request_timeout": "0.5s",
         "read_timeout": "30s"}]))
    started = time.monotonic()
    r = await rg.client.request("GET", "/slow/x")
    elapsed = time.monotonic() - started
    assert r.code == 504, r.body
    assert body(r)["error"] == "gateway_timeout"
    assert elapsed < 5, elapsed  # not hanging for the read_timeout
    await until(lambda: up.open_connections == 0, 5, "the upstream request is abandoned")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.gen_test(timeout=30)
async def test_read_timeout_cuts_a_stalled_response_body(make_gateway, raw_up, tmp_path, framing):
    async def stalls(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(b"p" * 1000))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n"
                         + b"p" * 1000)
        await writer.drain()
        await wait_for_close(reader, 15)
        return False

    up = await raw_up(stalls)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/s/", "upstream": up.url, "auth": "public", "request_timeout": "30s", "read_timeout": "1s"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("GET", "/s/x"))
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 200
        try:
            rest = await asyncio.wait_for(reader.read(), 8)
        except ConnectionError:
            rest = b""
        except asyncio.TimeoutError:
            raise AssertionError("the stalled response was not cut") from None
    finally:
        close_quietly(writer)
    assert b"HTTP/1." not in rest, rest[:300]  # no second status line
    if framing == "chunked":
        assert "chunked" in headers.get("Transfer-Encoding", "")
        assert not rest.endswith(b"0\r\n\r\n"), "a cut response must not look complete"
    else:
        assert int(headers.get("Content-Length", "100000")) == 100000
        assert len(rest) < 100000
    assert b"p" * 1000 in rest
    await until(lambda: up.open_connections == 0, 5, "the upstream transfer is aborted")


@pytest.mark.gen_test(timeout=60)
async def test_server_sent_events_stream_unbuffered_through_quiet_gaps(make_gateway, raw_up, tmp_path):
    n = 4
    seen = [asyncio.Event() for _ in range(n)]
    problems: list[str] = []

    async def events(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(n):
            if i == n - 1:
                await asyncio.sleep(2.5)  # quiet for longer than request_timeout
            writer.write(chunk(f"id: {i}\ndata: event {i}\n\n".encode()))
            await writer.drain()
            try:
                await asyncio.wait_for(seen[i].wait(), 5)
            except asyncio.TimeoutError:
                problems.append(f"event {i} did not reach the client while the upstream waited")
                break
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    up = await raw_up(events)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/events/", "upstream": up.url, "auth": "public", "read_timeout": "10m",
         "request_timeout": "1s"}]))
    received = bytearray()

    def on_chunk(data: bytes) -> None:
        received.extend(data)
        for i in range(n):
            if f"data: event {i}\n\n".encode() in received:
                seen[i].set()

    r = await rg.client.request("GET", "/events/feed", headers={"Accept": "text/event-stream"},
                                streaming_callback=on_chunk)
    assert problems == []
    assert r.code == 200, bytes(received)[:300]
    assert r.headers.get("Content-Type") == "text/event-stream"
    assert bytes(received) == b"".join(f"id: {i}\ndata: event {i}\n\n".encode() for i in range(n))


@pytest.mark.gen_test(timeout=120)
async def test_slow_client_pauses_the_upstream_and_resumes(tmp_path, raw_up):
    total = 256 * MiB
    up = await raw_up()

    async def respond(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if "warm" in req.target:
            return await answer_digest(req, reader, writer)
        return await big_response(up, total)(req, reader, writer)

    up.respond = respond
    async with GatewayProcess(tmp_path, [{"prefix": "/down/", "upstream": up.url, "auth": "public"}]) as gp:
        await warm_up(gp.port, "/down/warm")
        base = gp.rss()
        reader, writer = await connect(gp.port, limit=64 * KiB)
        try:
            writer.write(request_head("GET", "/down/big"))
            status, headers = await asyncio.wait_for(read_head(reader), 10)
            assert status == 200
            async with RssWatch(gp) as watch:
                # The client reads nothing more: the upstream's writes block.
                held = await plateau(lambda: up.sent)
                assert held < 128 * MiB, f"the gateway read {held >> 20} MiB for a client that reads nothing"
            assert watch.peak - base < 50 * MiB, (base >> 20, watch.peak >> 20)
            got = hashlib.sha256()
            received = 0
            async for part in iter_body(reader, headers, status):
                got.update(part)
                received += len(part)
        finally:
            close_quietly(writer)
    assert received == total == up.sent
    assert got.hexdigest() == up.sent_digest.hexdigest()


@pytest.mark.gen_test(timeout=30)
async def test_client_going_away_mid_response_aborts_the_upstream_transfer(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    up.respond = big_response(up, 1 << 30)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/down/", "upstream": up.url, "auth": "public"}]))
    reader, writer = await connect(rg.port)
    try:
        writer.write(request_head("GET", "/down/big"))
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        assert status == 200
        await reader.readexactly(MiB)
    finally:
        writer.close()
    await until(lambda: up.open_connections == 0, 5, "the upstream transfer is aborted")
    assert up.sent < 1 << 30


# ---------------------------------------------------------------------------
# 3. Upstream behaviour
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_post_reset_on_a_reused_connection_is_502_and_never_sent_twice(make_gateway, raw_up, tmp_path):
    async def resets_reused_posts(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        if req.method == "POST" and req.index > 0:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST: the POST was read, no answer comes
            return False
        return await answer_digest(req, reader, writer)

    up = await raw_up(resets_reused_posts)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/shop/", "upstream": up.url, "auth": "public"}]))
    r = await rg.client.request("GET", "/shop/cart")
    assert r.code == 200, r.body
    await asyncio.sleep(0.2)
    r = await rg.client.request("POST", "/shop/orders", body=b'{"item": 1}',
                                headers={"Content-Type": "application/json"})
    posts = [q for q in up.requests if q.method == "POST"]
    assert posts and posts[0].index > 0, "the POST did not go on the pooled connection the GET used"
    assert len(posts) == 1, f"the upstream received the POST {len(posts)} times"
    data = body(r)
    assert r.code == 502, r.body
    assert data["error"] == "bad_gateway"
    assert "may" in data["message"].lower() and "processed" in data["message"].lower(), data


@pytest.mark.gen_test(timeout=30)
async def test_malformed_upstream_header_is_502_and_one_log_line(make_gateway, raw_up, tmp_path, caplog):
    async def malformed(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nThis line is not a header\r\n"
                     b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        return False

    up = await raw_up(malformed)
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/m/", "upstream": up.url, "auth": "public"}]))
    caplog.set_level(logging.INFO, logger="gateway")
    caplog.clear()
    r = await rg.client.request("GET", "/m/x")
    assert r.code == 502, r.body
    assert body(r)["error"] == "bad_gateway"
    assert b"Traceback" not in r.body and b"This line" not in r.body
    await asyncio.sleep(0.2)
    records = [rec for rec in caplog.records if rec.name.startswith("gateway")]
    naming = [rec for rec in records if rec.name != "gateway.access" and f"127.0.0.1:{up.port}" in rec.getMessage()]
    assert len(naming) == 1, [(rec.name, rec.getMessage()) for rec in records]
    assert naming[0].levelno >= logging.WARNING
    for rec in records:
        assert rec.exc_info is None and not rec.exc_text, (rec.name, rec.getMessage())
        assert "Traceback" not in rec.getMessage() and "\n" not in rec.getMessage(), rec.getMessage()


ALLOWED_ADDED = {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
                 "content-length", "transfer-encoding"}  # (framing is the transport's, not an addition)


@pytest.mark.gen_test(timeout=30)
async def test_no_header_is_added_upstream_that_the_client_did_not_send(make_gateway, raw_up, tmp_path):
    up = await raw_up()
    rg = await make_gateway(upstream_config(up.url, tmp_path, [
        {"prefix": "/public/", "upstream": up.url, "auth": "public"}]))
    for method, payload in (("POST", b"hello"), ("GET", b""), ("PUT", b"")):
        reader, writer = await connect(rg.port)
        try:
            extra = [("Content-Length", str(len(payload)))] if method != "GET" else []
            writer.write(request_head(method, "/public/bare", [("X-Custom", "1"), *extra]) + payload)
            status, _, data = await asyncio.wait_for(read_response(reader), 5)
        finally:
            close_quietly(writer)
        assert status == 200, data
        seen = up.requests[-1]
        assert seen.method == method and bytes(seen.data) == payload
        added = seen.names() - ALLOWED_ADDED - {"x-custom"}
        assert added == set(), (method, seen.headers)
        for name in ("content-type", "accept", "accept-encoding", "user-agent"):
            assert name not in seen.names(), (method, seen.headers)
