"""The upstream HTTP client: pooled keep-alive connections per upstream,
bodies streamed both ways, failures as typed exceptions.

It stands behind a small interface of our own (:class:`UpstreamClient`,
:class:`UpstreamResponse` and the :class:`UpstreamError` family), so that the
handler knows nothing of the library underneath.  That library is aiohttp's
client (chosen by measurement, see docs/operations.md): it keeps a bounded pool of
keep-alive connections, parses responses in C, streams a request body from
an async iterator and never resends a request that is not idempotent.

Each upstream origin has its own pool of ``max_connections``.  A request
waits at most its ``connect_timeout`` for a free connection
(:class:`UpstreamBusy`, 503), so slow readers of one upstream never starve
another.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterable, Sequence
from urllib.parse import urlsplit

import aiohttp
import yarl

log = logging.getLogger("gateway.proxy")

#: Methods a failed exchange may be retried for, when no body was sent (RFC 9110 §9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Headers aiohttp would otherwise add on its own.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class UpstreamError(Exception):
    """An exchange with an upstream failed; ``str()`` is for the log."""

    def __init__(self, upstream: str, detail: str) -> None:
        detail = " ".join(detail.split())  # one log line, whatever the library's text
        super().__init__(f"{upstream}: {detail}")
        self.upstream = upstream
        self.detail = detail


class UpstreamTimeout(UpstreamError):
    """No connection within ``connect_timeout``, or no response head within
    ``request_timeout`` (504), or a body stalled past ``read_timeout``."""


class UpstreamUnreachable(UpstreamError):
    """The connection was refused or could not be made (502); nothing was sent."""


class UpstreamBusy(UpstreamError):
    """Every pooled connection to this upstream stayed busy for
    ``connect_timeout`` (503)."""


class UpstreamFailed(UpstreamError):
    """The upstream hung up or answered something unusable (502).
    ``maybe_processed``: the request had been sent, so it may have acted on it."""

    def __init__(self, upstream: str, detail: str, *, maybe_processed: bool) -> None:
        super().__init__(upstream, detail)
        self.maybe_processed = maybe_processed


class UpstreamResponse:
    """A response whose head has arrived; read its body with :meth:`read`,
    then :meth:`close` it (which returns the connection to the pool when
    the body was read to its end)."""

    def __init__(self, pool: "UpstreamPool", response: aiohttp.ClientResponse) -> None:
        self._pool = pool
        self._response: aiohttp.ClientResponse | None = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: list[tuple[str, str]] = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
        ]
        length = response.content_length
        self.content_length: int | None = length

    async def read(self) -> bytes:
        """The next part of the body as it arrives; ``b""`` at its end."""
        assert self._response is not None
        try:
            return await self._response.content.readany()
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamFailed(self._pool.name, f"the response body was cut short ({exc})", maybe_processed=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(self._pool.name, f"failed while sending its response ({exc!r})", maybe_processed=True) from None

    def close(self, *, abort: bool = False) -> None:
        """Done with this response: the connection goes back to the pool
        when the body was read to its end, else (or with ``abort``) it is
        closed.  Safe to call more than once."""
        response, self._response = self._response, None
        if response is None:
            return
        if abort:
            response.close()
        else:
            response.release()
        self._pool.slots.release()


class UpstreamPool:
    """Connections to one upstream origin."""

    def __init__(self, origin: str, max_connections: int) -> None:
        self.name = origin
        self.slots = asyncio.Semaphore(max_connections)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=60),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterable[bytes] | None,
        *,
        connect_timeout: float,
        request_timeout: float,
        deadline: asyncio.Timeout | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for its response head.

        ``request_timeout`` bounds the wait for the head once the request
        (and its body) has been sent; a caller streaming a body passes the
        ``deadline`` (an :func:`asyncio.timeout` it reschedules when the body
        is complete) instead.
        """
        if self.slots.locked():
            try:
                async with asyncio.timeout(connect_timeout):
                    await self.slots.acquire()
            except TimeoutError:
                raise UpstreamBusy(self.name, f"all connections stayed busy for {connect_timeout:g}s") from None
        else:
            await self.slots.acquire()
        sent_body = body is not None
        target = yarl.URL(url, encoded=True)  # as the client sent it: no re-encoding
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        try:
            try:
                if deadline is not None:
                    response = await self.session.request(
                        method, target, headers=headers, data=body, allow_redirects=False, timeout=timeout)
                else:
                    async with asyncio.timeout(request_timeout):
                        response = await self.session.request(
                            method, target, headers=headers, data=body, allow_redirects=False, timeout=timeout)
            except aiohttp.ServerTimeoutError as exc:  # (sock_connect)
                raise UpstreamTimeout(self.name, f"no connection within {connect_timeout:g}s ({exc})") from None
            except TimeoutError:
                raise UpstreamTimeout(self.name, f"no response within {request_timeout:g}s") from None
            except aiohttp.ClientConnectorError as exc:
                raise UpstreamUnreachable(self.name, f"cannot connect ({exc.os_error!r})") from None
            except aiohttp.ClientResponseError as exc:
                raise UpstreamFailed(self.name, f"answered with a malformed response ({exc.message})",
                                     maybe_processed=True) from None
            except (aiohttp.ClientError, OSError) as exc:
                maybe = sent_body or method not in IDEMPOTENT
                raise UpstreamFailed(self.name, f"closed the connection without an answer ({exc!r})",
                                     maybe_processed=maybe) from None
        except BaseException:
            self.slots.release()
            raise
        return UpstreamResponse(self, response)

    async def close(self) -> None:
        await self.session.close()


class UpstreamSocket:
    """An open WebSocket to an upstream.  :meth:`receive` answers
    ``(kind, data, reason)`` with kind ``"text"``, ``"binary"``, ``"ping"``,
    ``"pong"`` or ``"close"`` (then ``data`` is the close code or ``None``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.protocol: str | None = ws.protocol
        self._closing: "asyncio.Task[Any] | None" = None

    async def receive(self) -> tuple[str, Any, str]:
        msg = await self._ws.receive()
        kind = msg.type
        if kind == aiohttp.WSMsgType.TEXT:
            return "text", msg.data, ""
        if kind == aiohttp.WSMsgType.BINARY:
            return "binary", msg.data, ""
        if kind == aiohttp.WSMsgType.PING:
            return "ping", msg.data, ""
        if kind == aiohttp.WSMsgType.PONG:
            return "pong", msg.data, ""
        if kind == aiohttp.WSMsgType.CLOSE:
            return "close", msg.data, msg.extra or ""
        if kind == aiohttp.WSMsgType.ERROR and isinstance(msg.data, aiohttp.WebSocketError):
            return "close", msg.data.code, "message too big" if msg.data.code == 1009 else "protocol error"
        return "close", self._ws.close_code, ""

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._ws.send_bytes(message)
        else:
            await self._ws.send_str(message)

    async def ping(self, data: bytes) -> None:
        await self._ws.ping(data)

    async def pong(self, data: bytes) -> None:
        await self._ws.pong(data)

    @property
    def closed(self) -> bool:
        return self._ws.closed

    def close(self, code: int | None = None, reason: str | None = "") -> None:
        """Start the closing handshake (without waiting for it)."""
        if self._closing is None and not self._ws.closed:
            self._closing = asyncio.ensure_future(
                self._ws.close(code=code or 1000, message=(reason or "").encode("utf-8")[:123]))


class UpstreamClient:
    """One :class:`UpstreamPool` per upstream origin, made on first use;
    WebSockets on connections of their own (they are long-lived, so they
    do not take slots from the pools)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.pools: dict[str, UpstreamPool] = {}
        self._sockets: aiohttp.ClientSession | None = None

    async def websocket(self, url: str, headers: Sequence[tuple[str, str]], *, protocols: Sequence[str],
                        max_message_size: int, connect_timeout: float, request_timeout: float) -> UpstreamSocket:
        """Open a WebSocket upstream: the handshake must answer 101 within
        ``request_timeout`` (raises :class:`UpstreamTimeout`,
        :class:`UpstreamUnreachable` or :class:`UpstreamFailed`)."""
        if self._sockets is None:
            self._sockets = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True), cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_NO_AUTO_HEADERS, timeout=aiohttp.ClientTimeout(total=None))
        parts = urlsplit(url)
        name = f"{parts.scheme}://{parts.netloc}"
        try:
            async with asyncio.timeout(request_timeout):
                ws = await self._sockets.ws_connect(
                    yarl.URL(url, encoded=True), headers=headers, protocols=tuple(protocols), autoping=False,
                    max_msg_size=max_message_size + 1, compress=0,  # (aiohttp refuses a message of exactly its limit)
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamFailed(name, f"refused the WebSocket handshake ({exc.status})", maybe_processed=True) from None
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamTimeout(name, f"no connection within {connect_timeout:g}s ({exc})") from None
        except TimeoutError:
            raise UpstreamTimeout(name, f"no handshake answer within {request_timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(name, f"cannot connect ({exc.os_error!r})") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(name, f"failed the WebSocket handshake ({exc!r})", maybe_processed=True) from None
        return UpstreamSocket(ws)

    def pool(self, url: str) -> UpstreamPool:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        pool = self.pools.get(origin)
        if pool is None:
            pool = self.pools[origin] = UpstreamPool(origin, self.max_connections)
        return pool

    async def close(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            await pool.close()
        if self._sockets is not None:
            await self._sockets.close()
            self._sockets = None
