"""The proxy's HTTP handler: everything not under ``auth_prefix`` goes upstream.

Order of work for every request:

1. From the request head alone (:meth:`ProxyHandler.prepare`): the route,
   the path's safety, the body's declared size, credentials in the wrong
   place, who is calling and whether the route lets them in.  A refusal is
   answered before any body byte is read (and ``Expect: 100-continue`` is
   answered only after this step, by Tornado).
2. The exchange with the upstream runs as its own task.  A request body is
   handed to it chunk by chunk through a :class:`BodyChannel`: Tornado reads
   the next chunk from the client only once the upstream client took the
   previous one, so memory does not grow with the body.
3. The response is relayed as it arrives: each part is written and flushed
   to the client before the next is read from the upstream, so a slow
   reader costs at most the upstream client's read buffer.

A client that goes away cancels the exchange, which aborts the upstream
request and frees everything at once.
"""

from __future__ import annotations

import asyncio
import logging
from http.client import responses
from typing import Any, AsyncIterator, Callable, cast

import tornado.httputil
import tornado.iostream
from tornado.http1connection import HTTP1Connection

from gateway import metrics, tracing
from gateway.errors import GatewayError, invalid_request, not_found
from gateway.handlers.base import BaseHandler
from gateway.proxy import policy
from gateway.proxy.upstream import (
    UpstreamBusy,
    UpstreamError,
    UpstreamFailed,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.api import Principal
from gateway.routing import Route

log = logging.getLogger("gateway.proxy")

#: Tornado's limit on a connection's body when a route sets none.
UNLIMITED = 1 << 62


class ClientStalled(Exception):
    """The client sent no body byte for the route's ``read_timeout``."""


class BodyAborted(Exception):
    """The request body was cut off before its end."""


class BodyChannel:
    """Hands request-body chunks from Tornado to the upstream client, one
    at a time: :meth:`put` returns a future that resolves when the chunk
    was taken, which Tornado awaits before reading more."""

    def __init__(self, read_timeout: float, on_end: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._on_end = on_end
        self._chunk: bytes | None = None
        self._taken: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closed = False
        self._aborted = False
        self.ended = False
        self.stalled = False

    def put(self, chunk: bytes) -> "asyncio.Future[None] | None":
        if self._closed:
            return None  # nobody will take it: drop it
        self._chunk = chunk
        self._wake()
        self._taken = self._loop.create_future()
        return self._taken

    def end(self) -> None:
        """The whole body arrived."""
        self.ended = True
        self.close()

    def close(self) -> None:
        """No more chunks: release a waiting producer and the consumer."""
        self._closed = True
        if self._taken is not None and not self._taken.done():
            self._taken.set_result(None)
        self._wake()

    def abort(self) -> None:
        """The body will never be complete (the client left, or crossed the
        limit): the consumer raises, so the upstream never sees an end."""
        self._aborted = True
        self._chunk = None
        self.close()

    def _wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._aborted:
                raise BodyAborted()
            chunk = self._chunk
            if chunk is None:
                if self._closed:
                    break
                self._ready = self._loop.create_future()
                try:
                    async with asyncio.timeout(self._read_timeout):
                        await self._ready
                except TimeoutError:
                    self.stalled = True
                    raise ClientStalled() from None
                continue
            self._chunk = None
            taken, self._taken = self._taken, None
            if taken is not None and not taken.done():
                taken.set_result(None)
            yield chunk
        if self.ended:
            self._on_end()


class ProxyHandler(BaseHandler):
    """Catch-all: route, authenticate, forward, stream back."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    route: Route
    _exchange: "asyncio.Task[None] | None" = None
    _running: "asyncio.Task[Any] | None" = None
    _client_left = False
    _channel: BodyChannel | None = None
    _received = 0
    #: the upstream request's headers, for a request without a body
    _upstream_request_headers: list[tuple[str, str]] | None = None
    #: the running exchange's deadline
    _deadline: asyncio.Timeout | None = None
    #: ``X-Consent`` for the upstream, set by :meth:`admit` on a route with ``require_consent``
    _consent: tuple[tuple[str, str], ...] = ()
    #: seconds from sending the request upstream to its response head (once it came)
    upstream_seconds: float | None = None
    #: the W3C trace id this request travels upstream with (for the access log)
    trace_id: str | None = None

    def compute_etag(self) -> None:
        return None  # the upstream's ETag, if any, is relayed as is

    @property
    def max_body_size(self) -> int:
        return self.route.max_body_size

    # -- 1. the head ---------------------------------------------------------------

    def find_route(self) -> Route:
        """Count the request in flight and find its route (404 without one;
        400 for a path an upstream could read as another route's)."""
        self.count_in_flight()
        route = policy.route_for(self.gateway.routes, self.request.path)
        if route is None:
            raise not_found(f"no route for {self.request.path}")
        self.route = route
        return route

    async def prepare(self) -> None:
        route = self.find_route()
        request = self.request
        headers = request.headers
        length = headers.get("Content-Length")
        chunked = "Transfer-Encoding" in headers
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise invalid_request("Content-Length is not a number") from None
        else:
            declared = 0
        has_body = declared > 0 or chunked
        if has_body and request.method in ("GET", "HEAD"):
            raise invalid_request(f"a {request.method} request must not have a body")
        limit = route.max_body_size
        if limit and declared > limit:
            raise self._too_large(limit)
        if route.auth != "public" and policy_is_preflight(request):
            # Answered here: an unauthenticated OPTIONS must not reach an
            # upstream that may not check the method.
            return self.answer_preflight()
        principal = await self.admit(route)
        upstream_headers = await self.build_upstream_headers(route, principal)
        connection = self._connection()
        if has_body:
            if connection is not None:
                connection.set_max_body_size(2 * limit + 65536 if limit else UNLIMITED)
            self._channel = BodyChannel(route.read_timeout, self._body_complete)
            # The body flows while the exchange runs: the exchange gets a task of its own.
            self._exchange = asyncio.ensure_future(self._forward(upstream_headers, self._channel))
            self._exchange.add_done_callback(self._exchange_done)
        else:
            self._upstream_request_headers = upstream_headers

    async def admit(self, route: Route, *, websocket: bool = False) -> Principal | None:
        """Who is calling, and may they use ``route``?  Refuses credentials
        sent where the gateway does not read them, a missing or dead one
        where it matters (401, clearing a dead cookie), route policy (403),
        cross-site cookie requests (403 ``csrf``) and, last, a caller lacking
        the route's ``require_consent`` (403 ``consent_required``).  The
        route's rate limits (429 ``rate_limited``) are taken once the caller
        is known, before the consent check."""
        request = self.request
        credentials = self.gateway.credentials
        where = policy.stray_credential(request.headers.get_all(), request.query,
                                        self.gateway.config.sessions.cookie_name, credentials)
        if where is not None:
            raise invalid_request(f"a gateway token or API key was found in {where}; send it only as "
                                  f"{credentials.places} or the session cookie")
        limits = self.gateway.rate_limits.routes.get(route.prefix)  # None on a route without limits
        if route.auth == "public":
            if limits:
                await self.gateway.rate_limits.check(self, limits)
            return None
        principal = await self.get_principal()
        if principal is None:
            if route.auth == "required" or self.presented_credential():
                raise await self.unauthenticated_error()  # with its reason; a dead cookie is cleared
            if limits:
                await self.gateway.rate_limits.check(self, limits)
            return None
        self.check_authorised(route, principal)
        if websocket:
            if self._token_source == "cookie" and principal.session is not None:
                self.check_websocket_origin()
        else:
            self.check_csrf()
        if limits:  # after the cheap refusals, before the consent read and the upstream
            await self.gateway.rate_limits.check(self, limits, principal)
        if route.require_consent:  # the one store read of consent, on such routes only (after the cheap checks)
            self._consent = ((policy.CONSENT_HEADER,
                              await self.gateway.consent.admit(principal.user_id, route.require_consent)),)
        return principal

    def check_websocket_origin(self) -> None:
        """Browsers send cookies on cross-site WebSocket handshakes, and no
        CORS applies: the Origin must be the gateway's own or allowed."""
        origin = (self.request.headers.get("Origin") or "").lower()
        own = f"{self.client_scheme}://{self.client_host}".lower()
        if origin and (origin == own or origin in self.gateway.config.sessions.allowed_origins):
            return
        raise GatewayError("csrf", "a cookie-authenticated WebSocket must come from an allowed Origin")

    def presented_credential(self) -> bool:
        """Did the request carry a credential at all (a token, a cookie, a
        provider's credential header)?"""
        return self._token_source is not None or bool(self.credential_headers())

    @staticmethod
    def check_authorised(route: Route, principal: Principal) -> None:
        """Route policy: sessions pass where ``allow_sessions``; any other
        caller (an API key) must hold every one of the route's ``scopes``."""
        if principal.session is not None:
            if not route.allow_sessions:
                raise GatewayError("forbidden", "this route does not accept sessions; use an API key")
            return
        missing = [s for s in route.scopes if s not in (principal.scopes or ())]
        if missing:
            raise GatewayError("forbidden", "this route requires the scope(s): " + " ".join(missing))

    async def gateway_identity_headers(self, route: Route, principal: Principal | None) -> list[tuple[str, str]]:
        """What the gateway itself tells the upstream about ``principal``:
        the identity headers, ``X-Consent``, the ``[profiles]``
        upstream_headers and, on a route with ``assertion``, the signed
        ``X-Gateway-Assertion`` (nothing for an anonymous request)."""
        if principal is None:
            return []
        identity = policy.identity_headers(principal.user_id, principal.provider, principal.session_id,
                                           principal.scopes)
        # X-Consent, and the [profiles] upstream_headers (cached per process)
        identity += [*self._consent, *await self.gateway.preferences.upstream_headers(principal.user_id)]
        if route.assertion:  # signed once per request, with the key parsed at start-up
            identity.append((policy.ASSERTION_HEADER, self.gateway.assertions.sign(
                principal, audience=route.audience, origin=f"{self.client_scheme}://{self.client_host}")))
        return identity

    async def with_plugin_headers(self, out: list[tuple[str, str]], route: Route,
                                  principal: Principal | None) -> list[tuple[str, str]]:
        """``out`` with the headers the caller's provider and the
        ``gateway_upstream_headers`` hooks add (replacing any of the same
        name; never a gateway-owned, hop-by-hop or ``Host`` header)."""
        extras = await self.gateway.upstream_headers(self.request, principal, route)
        for extra in extras:
            for name, value in extra.items():
                key = policy.canonical(name)
                if key not in policy.GATEWAY_OWNED and key not in policy.HOP_BY_HOP and key != "host":
                    out = [(n, v) for n, v in out if policy.canonical(n) != key]
                    out.append((name, value))
        return out

    async def build_upstream_headers(self, route: Route, principal: Principal | None,
                                     *, websocket: bool = False) -> list[tuple[str, str]]:
        request = self.request
        strip = {policy.canonical(h) for h in (principal.headers_to_strip if principal else ())}
        strip.update(policy.canonical(h) for h in self.credential_headers())
        trusted = self.peer_is_trusted
        identity = await self.gateway_identity_headers(route, principal)
        out = policy.upstream_request_headers(
            list(request.headers.get_all()),
            strip=strip,
            reserved=self.gateway.reserved_headers,
            cookie_name=self.gateway.config.sessions.cookie_name,
            peer_trusted=trusted,
            prior_forwarded_for=",".join(request.headers.get_list("X-Forwarded-For")) if trusted else "",
            peer=request.remote_ip or "",
            scheme=self.client_scheme,
            host=self.client_host,
            request_id=self.request_id,
            upstream_host=request.host if route.preserve_host else route.upstream_host,
            identity=identity,
            websocket=websocket,
            credentials=self.gateway.credentials,
        )
        out, self.trace_id = policy.with_trace_context(out, request.headers.get("traceparent"))
        out, traced = tracing.upstream_headers(self, route, out)  # [tracing] on: the upstream call's span
        self.trace_id = traced or self.trace_id
        return await self.with_plugin_headers(out, route, principal)

    # -- 2. the body -----------------------------------------------------------------

    def data_received(self, chunk: bytes) -> "asyncio.Future[None] | None":
        channel = self._channel
        if channel is None or self.response_finished:
            return None
        self._received += len(chunk)
        limit = self.route.max_body_size
        if limit and self._received > limit:
            # A chunked body has no Content-Length to refuse up front: cut the
            # upstream request and answer now (the connection then closes).
            channel.abort()
            self._abort_exchange()
            if not self.head_sent:
                self.send_error(413, exc_info=(GatewayError, self._too_large(limit), None))
            return None
        return channel.put(chunk)

    def _body_complete(self) -> None:
        """The upstream took the whole body: now its answer is due within
        ``request_timeout``."""
        deadline = self._deadline
        if deadline is not None and deadline.when() is None:
            deadline.reschedule(asyncio.get_running_loop().time() + self.route.request_timeout)

    def _exchange_done(self, task: "asyncio.Task[None]") -> None:
        # The exchange ended before the body did (an early answer, a failure):
        # stop waiting for the client's chunks.
        if self._channel is not None:
            self._channel.close()

    async def _handle(self, *args: Any) -> None:
        if self._channel is None:
            headers = self._upstream_request_headers
            if headers is None:
                return  # answered in prepare() (a preflight)
            # No body: the exchange runs right here, in the request's own task,
            # which on_connection_close() cancels when the client leaves.
            task = self._running = asyncio.current_task()
            try:
                await self._forward(headers, None)
            except asyncio.CancelledError:
                if self._client_left and task is not None and task.uncancel() == 0:
                    return  # our own abort: nobody is left to answer
                raise
            finally:
                self._running = None
            return
        self._channel.end()
        exchange = self._exchange
        try:
            if exchange is not None:
                await exchange
        except asyncio.CancelledError:
            if exchange is not None and exchange.cancelled() and not _cancelling():
                return  # aborted by us: the client left, or the body was refused
            raise
        finally:
            self._exchange = self._channel = None

    get = head = post = delete = patch = put = options = _handle

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._client_left = True
        if self._channel is not None and not self._channel.ended:
            self._channel.abort()
        self._abort_exchange()
        if self._running is not None:
            self._running.cancel()

    def _abort_exchange(self) -> None:
        task = self._exchange
        if task is not None and not task.done():
            task.cancel()

    # -- 3. the response ---------------------------------------------------------------

    async def _forward(self, headers: list[tuple[str, str]], channel: BodyChannel | None) -> None:
        """The exchange, under one deadline: ``request_timeout`` for the
        response head (counted from the end of the body when there is one),
        then ``read_timeout`` for each part of the response body."""
        route = self.route
        request = self.request
        pool = self.gateway.upstream_client.pool(route.upstream)
        url = route.upstream_url(request.path, request.query)
        loop = asyncio.get_running_loop()
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout_at(None if channel else loop.time() + route.request_timeout) as deadline:
                self._deadline = deadline
                sent = loop.time()
                response = await pool.send(request.method or "GET", url, headers,
                                           channel.chunks() if channel is not None else None,
                                           connect_timeout=route.connect_timeout,
                                           request_timeout=route.request_timeout, deadline=deadline)
                self.upstream_seconds = loop.time() - sent  # for the access log
                metrics.upstream_answered(route.prefix, self.upstream_seconds)
                tracing.upstream_answered(self, response.status)
                if channel is not None and channel.stalled:
                    return self._client_stalled()
                await self._relay(response, deadline)
        except UpstreamError as exc:
            if response is None:
                return self._failed(exc)
            return self._cut(exc.detail)
        except TimeoutError:
            if response is None:  # no head within request_timeout
                return self._failed(UpstreamTimeout(pool.name, f"no response within {route.request_timeout:g}s"))
            return self._cut(f"sent nothing for {route.read_timeout:g}s mid-response")
        except ClientStalled:
            return self._client_stalled()
        except BodyAborted:
            return  # already answered (413) or nobody left to answer
        finally:
            if response is not None:
                response.close(abort=True)  # a no-op once released

    def _client_stalled(self) -> None:
        log.info("%s %s: the client sent nothing for %gs; request cut off", self.request.method,
                 self.request.path, self.route.read_timeout)
        self._close_connection()

    async def _relay(self, response: UpstreamResponse, deadline: asyncio.Timeout) -> None:
        """Write the response as it arrives; ``deadline`` bounds each wait
        for the upstream, never a wait for the client."""
        self._start_response(response)
        if self.request.method == "HEAD" or response.status in (204, 304):
            response.close()
            self.finish()
            return
        expected = response.content_length
        loop = asyncio.get_running_loop()
        read_timeout = self.route.read_timeout
        sent = 0
        try:
            while True:
                deadline.reschedule(loop.time() + read_timeout)
                chunk = await response.read()
                deadline.reschedule(None)
                if not chunk:
                    break
                sent += len(chunk)
                self.write(chunk)
                if expected is not None and sent >= expected:
                    break  # the whole body: finish() sends it with the head
                await self.flush()
            response.close()
            if not self.response_finished:
                self.finish()
        except tornado.iostream.StreamClosedError:
            return  # the client left

    def _start_response(self, response: UpstreamResponse) -> None:
        code = response.status
        self.set_status(code, response.reason or responses.get(code, "Unknown"))
        for name in ("Content-Type", "Date", "Server"):
            self.clear_header(name)
        if policy.does_own_cors(response.headers):  # the upstream does its own CORS: its headers, not ours
            for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
                         "Access-Control-Expose-Headers"):
                self.clear_header(name)
        for name, value in policy.upstream_response_headers(code, response.headers,
                                                             self.gateway.config.sessions.cookie_name):
            self.add_header(name, value)

    def _cut(self, why: str) -> None:
        """Part of the response went out: all we can do is cut it short."""
        log.warning("upstream %s failed mid-response for %s %s: %s", self.route.upstream,
                    self.request.method, self.request.path, why)
        self._close_connection()

    def _connection(self) -> HTTP1Connection | None:
        """The client's connection: Tornado types it as the HTTPConnection
        interface, but its HTTP server always gives an HTTP1Connection, which
        has the body limit and close() used here."""
        return cast("HTTP1Connection | None", self.request.connection)

    def _close_connection(self) -> None:
        connection = self._connection()
        if connection is not None:
            connection.close()

    def _failed(self, exc: UpstreamError) -> None:
        """No response came: answer with the documented error (one log line)."""
        tracing.upstream_failed(self, exc)
        prefix = self.route.prefix
        if isinstance(exc, UpstreamTimeout):
            error = GatewayError("gateway_timeout", f"the upstream for {prefix} did not answer in time")
        elif isinstance(exc, UpstreamBusy):
            error = GatewayError("unavailable", f"the upstream for {prefix} ({exc.upstream}) has no free "
                                 "connection; try again later", headers={"Retry-After": "1"})
        elif isinstance(exc, UpstreamFailed) and exc.maybe_processed and \
                (self.request.method not in ("GET", "HEAD", "OPTIONS") or self._channel is not None):
            error = GatewayError("bad_gateway", f"the upstream for {prefix} failed before answering; "
                                 "the request may have been processed")
        elif isinstance(exc, UpstreamUnreachable):
            error = GatewayError("bad_gateway", f"the upstream for {prefix} could not be reached")
        else:
            error = GatewayError("bad_gateway", f"the upstream for {prefix} answered with an error")
        log.warning("%s %s -> %d: upstream %s", self.request.method, self.request.path, error.status, exc)
        if self.response_finished:
            return
        if self.head_sent:
            self._close_connection()
            return
        self.send_error(error.status, exc_info=(GatewayError, error, None))


def policy_is_preflight(request: tornado.httputil.HTTPServerRequest) -> bool:
    """A browser's CORS preflight (which never carries credentials)."""
    h = request.headers
    return request.method == "OPTIONS" and bool(h.get("Origin")) and bool(h.get("Access-Control-Request-Method"))


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
