"""Raw HTTP/1.1 on loopback sockets, for tests where framing and timing matter.

- :class:`RawUpstream`: an upstream on asyncio streams that parses requests
  itself, so a test sees exactly what arrives and when; it hashes bodies as
  they arrive, and can hold them unread, stall, reset or misbehave through
  its ``respond`` callable (:func:`answer_digest`, :func:`big_response`...).
- A socket client: :func:`connect`, :func:`request_head`, :func:`chunk`,
  :func:`send_blocks`, :func:`read_head`, :func:`iter_body`,
  :func:`read_response`, :func:`check_error`, :func:`close_quietly`, and
  :func:`upload` / :func:`warm_up` built on them.
- Bytes generated on the fly: :func:`pattern` and :func:`digest_of`, so a
  transfer of any size holds nothing big and is checked by its SHA-256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol, Sequence

import tornado.httputil

__all__ = [
    "GiB",
    "KiB",
    "MiB",
    "Digest",
    "RawUpstream",
    "Respond",
    "UpRequest",
    "answer_digest",
    "big_response",
    "check_error",
    "chunk",
    "close_quietly",
    "connect",
    "digest_of",
    "iter_body",
    "parse_request_head",
    "pattern",
    "read_head",
    "read_request_body",
    "read_response",
    "request_head",
    "send_blocks",
    "send_json",
    "upload",
    "warm_up",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


class Digest(Protocol):
    """What :mod:`hashlib` hashes offer."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...

    def copy(self) -> Digest: ...


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
    """The SHA-256 (hex) of ``pattern(total, block, seed)``."""
    h = hashlib.sha256()
    for b in pattern(total, block, seed):
        h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# A raw HTTP/1.1 upstream
# ---------------------------------------------------------------------------


def _sha256() -> Digest:
    return hashlib.sha256()


@dataclass
class UpRequest:
    """A request as :class:`RawUpstream` received it (so far)."""

    conn: int  # which connection it came on (0, 1, ...)
    index: int  # its position on that connection (0 = first request)
    method: str
    target: str
    headers: list[tuple[str, str]]
    length: int  # Content-Length (0 when absent or chunked)
    chunked: bool
    received: int = 0  # body bytes (decoded) received so far
    digest: Digest = field(default_factory=_sha256)
    data: bytearray = field(default_factory=bytearray)  # the first KEEP bytes of the body
    complete: bool = False  # the whole body arrived (for chunked: the last chunk)
    aborted: bool = False  # the connection ended before the body did

    KEEP = 1 << 20

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        """The header names, lowercased."""
        return {k.lower() for k, _ in self.headers}

    @property
    def sha256(self) -> str:
        """The SHA-256 (hex) of the body bytes received so far."""
        return self.digest.copy().hexdigest()

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


#: ``respond(request, reader, writer)``: answers a request whose body is in;
#: returning False closes the connection.
Respond = Callable[[UpRequest, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]


class RawUpstream:
    """An upstream that parses requests itself and hashes bodies as they
    arrive.  ``respond(req, reader, writer)`` answers a request once its
    body is in (returning False closes the connection); the default,
    :func:`answer_digest`, answers 200 with the body's SHA-256 and length.
    ``hold`` (an Event), when set up, keeps the body unread until it is set.
    """

    def __init__(self, respond: Respond | None = None) -> None:
        self.respond: Respond = respond or answer_digest
        self.requests: list[UpRequest] = []
        self.connections = 0
        self.open_connections = 0
        self.sent = 0  # body bytes written by generating responders
        self.sent_digest: Digest = hashlib.sha256()
        self.hold: asyncio.Event | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        """Listen on a free loopback port (in the running event loop)."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MiB)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and abort every connection."""
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
    """An :class:`UpRequest` from a request head (up to the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    req = UpRequest(conn, index, method, target, headers, 0, False)
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
    """Read ``req``'s body (Content-Length or chunked) into ``req``."""
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
    """Write a whole JSON response."""
    data = json.dumps(obj).encode()
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


async def answer_digest(req: UpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """200 with JSON ``{"sha256", "length", "method", "path"}`` of the request."""
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


# ---------------------------------------------------------------------------
# A raw client
# ---------------------------------------------------------------------------


async def connect(port: int, limit: int = 64 * KiB) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``127.0.0.1:port``."""
    return await asyncio.open_connection("127.0.0.1", port, limit=limit)


def request_head(method: str, path: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A request head with ``Host: gateway.test`` and ``headers``."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def read_head(reader: asyncio.StreamReader) -> tuple[int, tornado.httputil.HTTPHeaders]:
    """A response's status and headers."""
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
    """A whole response: status, headers, body."""
    status, headers = await read_head(reader)
    data = b"".join([part async for part in iter_body(reader, headers, status, method)])
    return status, headers, data


def check_error(status: int, headers: tornado.httputil.HTTPHeaders, data: bytes, expected: int, code: str,
                contains: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """The gateway's JSON error: this status and code, a message for people
    (holding one of ``contains``, in any case), no stack trace (other
    members, such as a 401's ``reason``, may be there too)."""
    assert status == expected, (status, data[:500])
    assert headers.get("Content-Type", "").startswith("application/json"), headers.get("Content-Type")
    assert b"Traceback" not in data
    obj = json.loads(data)
    assert isinstance(obj, dict) and {"error", "message"} <= set(obj) and obj["error"] == code, obj
    assert isinstance(obj["message"], str) and obj["message"]
    if contains is not None:
        words = (contains,) if isinstance(contains, str) else contains
        assert any(w.lower() in obj["message"].lower() for w in words), (words, obj)
    return obj


def _unframed(block: bytes) -> bytes:
    return block


async def send_blocks(writer: asyncio.StreamWriter, blocks: Iterator[bytes], digest: Digest | None = None,
                      *, framing: Callable[[bytes], bytes] = _unframed) -> int:
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
    """Abort the connection, whatever state it is in."""
    with contextlib.suppress(Exception):
        writer.transport.abort()


async def upload(port: int, path: str, total: int, *, chunked: bool = False,
                 headers: Sequence[tuple[str, str]] = ()) -> tuple[int, dict[str, Any] | bytes, str, int]:
    """POST ``total`` generated bytes; (status, JSON or raw body, sha256 sent, bytes sent)."""
    reader, writer = await connect(port)
    try:
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(total))]
        writer.write(request_head("POST", path, [("Content-Type", "application/octet-stream"), *framing,
                                                 *headers]))
        digest = hashlib.sha256()
        sent = await send_blocks(writer, pattern(total), digest, framing=chunk if chunked else _unframed)
        if chunked and sent == total:
            writer.write(b"0\r\n\r\n")
        status, _, data = await read_response(reader)
        try:
            parsed: dict[str, Any] | bytes = json.loads(data)
        except ValueError:
            parsed = data
        return status, parsed, digest.hexdigest(), sent
    finally:
        close_quietly(writer)


async def warm_up(port: int, path: str) -> None:
    """A few transfers first, so that a baseline (memory, say) is taken with
    the gateway's code paths (imports, pools, buffers) already in use."""
    for _ in range(3):
        status, data, _, _ = await upload(port, path, 4 * MiB)
        assert status == 200, data
        reader, writer = await connect(port)
        try:
            writer.write(request_head("GET", path + "?warm"))
            await read_response(reader)
        finally:
            close_quietly(writer)
