"""The upstream HTTP client: pooled keep-alive connections per upstream,
bodies streamed both ways, failures as typed exceptions.

It stands behind a small interface of our own (:class:`UpstreamClient`,
:class:`UpstreamResponse` and the :class:`UpstreamError` family), so that the
handler knows nothing of the library underneath.  That library is aiohttp's
client (chosen by measurement, see the README): it keeps a bounded pool of
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
from typing import AsyncIterable, Sequence
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


class UpstreamClient:
    """One :class:`UpstreamPool` per upstream origin, made on first use."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.pools: dict[str, UpstreamPool] = {}

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
