"""The reverse proxy: everything not under ``auth_prefix`` goes upstream.

Identity travels upstream only in headers the gateway sets itself; every
incoming variant of those names (any case, ``_`` or ``-``) is dropped first,
and the gateway's own credential (its cookie, a Bearer session token) is
never passed on.  The upstream's response is streamed back as it arrives.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import tornado.httpclient
import tornado.httputil
import tornado.ioloop
import tornado.iostream

from gateway.errors import GatewayError, invalid_request, not_found, unauthenticated
from gateway.handlers.base import BaseHandler
from gateway.requestinfo import Principal
from gateway.routing import Route

if TYPE_CHECKING:  # pragma: no cover
    from gateway.app import Gateway

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
#: Header names only the gateway may set (compared after lower-casing and ``_`` -> ``-``).
IDENTITY_HEADERS = ("X-User-Id", "X-Auth-Provider", "X-Session-Id", "X-Auth-Scopes")
GATEWAY_OWNED = frozenset(h.lower() for h in IDENTITY_HEADERS) | {
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
}
#: Believed by upstreams as facts about the client or the original request:
#: passed on only from a trusted proxy (any ``X-Forwarded-*`` name too).
CLIENT_FACTS = frozenset({
    "forwarded", "x-forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip",
    "cf-connecting-ip", "fastly-client-ip", "x-original-url", "x-original-uri", "x-rewrite-url",
    "x-original-host", "x-host", "x-scheme", "x-url-scheme", "front-end-https",
})
#: Never forwarded: recomputed by the client library or meaningless after buffering.
DROPPED = frozenset({"host", "content-length", "expect"})
#: Content-Length is kept: the body is relayed byte for byte (no decompression).
RESPONSE_DROPPED = HOP_BY_HOP
#: ``.``/``..`` segments, also with ``;params`` (``..;/``, as servlet containers
#: read it) and with ``\`` as a separator (as some upstreams read it).
_DOT_SEGMENT = re.compile(r"(^|[/\\])\.\.?(;[^/\\]*)?([/\\]|$)")
#: Control characters, and a raw ``#`` (a client never sends a fragment; the
#: upstream client would cut the path there).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f#]")
#: Stop reading from the upstream while this much is still queued for a slow client...
HIGH_WATER = 4 << 20
#: ...and start again once it is down to this.
LOW_WATER = 1 << 20


def path_readings(path: str) -> list[str]:
    """The ways an upstream may read ``path``: percent-decoded, with ``\\``
    as ``/``, repeated slashes collapsed and ``;params`` removed."""
    decoded = unquote(path)
    folded = re.sub(r"[/\\]+", "/", decoded)
    return [decoded, folded, re.sub(r";[^/]*", "", folded)]


def is_cors_preflight(request: tornado.httputil.HTTPServerRequest) -> bool:
    """A browser's CORS preflight (which never carries credentials)."""
    h = request.headers
    return (request.method == "OPTIONS" and bool(h.get("Origin"))
            and bool(h.get("Access-Control-Request-Method")))


def canonical(name: str) -> str:
    """How Django, Flask or PHP see a header name: case and ``_``/``-`` folded."""
    return name.lower().replace("_", "-")


class ProxyHandler(BaseHandler):
    """Catch-all: route, authenticate, forward, stream back."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def compute_etag(self) -> None:
        return None  # the upstream's ETag, if any, is relayed as is

    def route_for(self, path: str) -> Route | None:
        """The route for ``path``, refusing paths an upstream could read as
        belonging to another route (which would bypass that route's auth)."""
        if _FORBIDDEN.search(path) or _FORBIDDEN.search(unquote(path).replace("#", "")):
            raise invalid_request("the path must not contain control characters or a raw '#'")
        readings = path_readings(path)
        if _DOT_SEGMENT.search(readings[0]):
            raise invalid_request("the path must not contain . or .. segments")
        route = self.gateway.routes.match(path)
        if any(self.gateway.routes.match(r) is not route for r in readings) or \
                self.gateway.routes.match(readings[-1], fold_case=True) is not route:
            raise invalid_request("the path is ambiguous: an upstream could read it as another route's path "
                                  "(percent-encoded prefix, '\\', '//', ';' parameters or letter case)")
        return route

    async def _handle(self, *args: Any) -> None:
        route = self.route_for(self.request.path)
        if route is None:
            raise not_found(f"no route for {self.request.path}")
        if self.request.method in ("GET", "HEAD") and self.body:
            # The upstream client cannot send one (libcurl would turn a HEAD into a PUT).
            raise invalid_request(f"a {self.request.method} request must not have a body")
        if route.auth != "public" and is_cors_preflight(self.request):
            # Answered here: an unauthenticated OPTIONS must not reach an
            # upstream that may not check the method.
            return self.answer_preflight()
        principal: Principal | None = None
        if route.auth != "public":
            principal = await self.get_principal()
            if principal is None and route.auth == "required":
                raise unauthenticated()
            if principal is not None:
                self.check_authorised(route, principal)
                self.check_csrf()
        await self.forward(route, principal)

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

    get = head = post = delete = patch = put = options = _handle

    def upstream_request_headers(self, route: Route, principal: Principal | None) -> tornado.httputil.HTTPHeaders:
        incoming = self.request.headers
        connection_listed = {canonical(t.strip()) for v in incoming.get_list("Connection") for t in v.split(",")}
        strip = {canonical(h) for h in (principal.headers_to_strip if principal else ())}
        strip.update(canonical(h) for h in self.credential_headers())
        strip.update(self.gateway.reserved_headers)
        out = tornado.httputil.HTTPHeaders()
        cookie_name = self.gateway.config.sessions.cookie_name
        for name, value in incoming.get_all():
            key = canonical(name)
            if key in HOP_BY_HOP or key in connection_listed or key in GATEWAY_OWNED or key in DROPPED or key in strip:
                continue
            if (key in CLIENT_FACTS or key.startswith("x-forwarded-")) and not self.peer_is_trusted:
                continue
            if key in ("authorization", "x-api-key") and ("gws_" in value or "gwk_" in value):
                continue  # the gateway's own credentials, whichever plugins are loaded
            if key == "cookie":
                value = _without_cookie(value, cookie_name)
                if not value:
                    continue
            out.add(name, value)
        # X-Forwarded-*: extend a trusted proxy's chain, else start one.
        prior = ",".join(incoming.get_list("X-Forwarded-For")) if self.peer_is_trusted else ""
        peer = self.request.remote_ip or ""
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior.strip() else peer
        out["X-Forwarded-Proto"] = self.client_scheme
        out["X-Forwarded-Host"] = self.client_host
        out["X-Request-Id"] = self.request_id
        for name in ("Accept", "User-Agent"):
            if name not in out:
                out[name] = ""  # an empty value stops libcurl adding one of its own
        out["Host"] = self.request.host if route.preserve_host else route.upstream_host
        if principal is not None:
            out["X-User-Id"] = principal.user_id
            out["X-Auth-Provider"] = principal.provider
            if principal.session is not None:
                out["X-Session-Id"] = principal.session.id
            if principal.scopes is not None:
                out["X-Auth-Scopes"] = " ".join(principal.scopes)
        return out

    async def forward(self, route: Route, principal: Principal | None) -> None:
        headers = self.upstream_request_headers(route, principal)
        for extra in await self.gateway.upstream_headers(self.request, principal, route):
            for name, value in extra.items():
                if canonical(name) not in GATEWAY_OWNED and canonical(name) not in HOP_BY_HOP:
                    headers[name] = value
        method = self.request.method or "GET"
        body = self.body
        upstream_response = self._relay = _ResponseRelay(self)
        request = tornado.httpclient.HTTPRequest(
            route.upstream_url(self.request.path, self.request.query),
            method=method,
            headers=headers,
            body=body if (body or method in ("POST", "PUT", "PATCH")) else None,
            connect_timeout=route.connect_timeout,
            request_timeout=route.request_timeout,
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,
            header_callback=upstream_response.on_header_line,
            streaming_callback=upstream_response.on_chunk,
            prepare_curl_callback=upstream_response.attach,
        )
        upstream_response.timeout = route.request_timeout
        upstream_response.request = request
        try:
            response = await self.gateway.upstream_client.fetch(request, raise_error=False)
        except (tornado.httpclient.HTTPClientError, OSError, tornado.iostream.StreamClosedError) as exc:
            # raise_error=False: only transport failures (timeouts, refused
            # connections, the upstream hanging up) arrive here.
            response = tornado.httpclient.HTTPResponse(request, 599, error=exc)
        finally:
            upstream_response.done = True
        if response.code == 599 or upstream_response.status is None:
            if upstream_response.abort_reason == "client_gone":
                return
            error = response.error or ValueError("no or unreadable response status line")
            if self._headers_written:
                # Part of the response already went out: all we can do is cut it short.
                log.warning("upstream %s failed mid-response: %r", route.upstream, error)
                self.request.connection.close()  # type: ignore[union-attr]
                return
            raise self._upstream_failure(route, error, timed_out=upstream_response.abort_reason == "timeout")
        upstream_response.drain()
        if not upstream_response.failed_client:
            self.finish()

    def on_connection_close(self) -> None:
        relay = getattr(self, "_relay", None)
        if relay is not None:
            relay.client_gone()

    def _upstream_failure(self, route: Route, exc: BaseException | None, timed_out: bool = False) -> GatewayError:
        text = repr(exc)
        timed_out = timed_out or getattr(exc, "errno", None) == 28 or "Timeout" in type(exc).__name__ or "timed out" in text.lower() or "timeout" in text.lower()
        if timed_out:
            return GatewayError("gateway_timeout", f"the upstream for {route.prefix} did not answer in time",
                                log_message=f"upstream {route.upstream} timed out: {exc!r}")
        return GatewayError("bad_gateway", f"the upstream for {route.prefix} could not be reached",
                            log_message=f"upstream {route.upstream} failed: {exc!r}")


_STATUS_LINE = re.compile(r"^HTTP/\d(?:\.\d)?\s+(\d{3})(?:\s+(.*))?$")


class _ResponseRelay:
    """Turns the upstream's header lines and body chunks into our response.

    The client library may hand over a body chunk before the header lines
    have been delivered, so chunks wait until the headers of the final
    (non-1xx) response are complete.  While more than :data:`HIGH_WATER`
    bytes wait for a slow client, reading from the upstream is paused.
    """

    def __init__(self, handler: ProxyHandler) -> None:
        self.handler = handler
        self.request: tornado.httpclient.HTTPRequest | None = None
        self.status: tuple[int, str] | None = None
        self.lines: list[str] = []
        self.headers_done = False
        self.started = False
        self.pending: list[bytes] = []
        self.failed_client = False
        self.done = False
        self.curl: Any = None
        self.timeout = 30.0
        self.abort_reason: str | None = None
        self.started_at = self.last_activity = time.monotonic()
        self.last_received = 0
        self.paused = False
        self.buffered = 0  # written to the handler, not yet flushed
        self.in_flight = 0  # flushed, not yet on the wire

    # -- flow control (libcurl only) ---------------------------------------------

    def attach(self, curl: Any) -> None:
        """``prepare_curl_callback``: keep the handle (to pause it), speak
        HTTP/1.1 (the relay's own client gets HTTP/1.1), and time the
        transfer ourselves: ``request_timeout`` bounds the wait for the
        response head and any stall of the body, but not a body that a slow
        client is still reading."""
        import pycurl

        self.curl = curl
        self.started_at = self.last_activity = time.monotonic()
        curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        curl.setopt(pycurl.TIMEOUT_MS, 0)
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self._progress)
        self._watch()

    def _watch(self) -> None:
        """Every quarter second, check the deadlines; libcurl calls the
        progress callback only while it is driven, so nudge it when one
        has passed."""
        if self.done:
            return
        if self._overdue() or self.failed_client:
            self._nudge()
        tornado.ioloop.IOLoop.current().call_later(0.25, self._watch)

    def _overdue(self) -> bool:
        now = time.monotonic()
        if self.paused:
            self.last_activity = now
        waited = now - (self.last_activity if self.headers_done else self.started_at)
        return waited > self.timeout

    def _nudge(self) -> None:
        if self._owns_curl():
            import pycurl

            try:  # unpausing makes libcurl run the transfer (and its callbacks) at once
                self.curl.pause(pycurl.PAUSE_RECV)
                self.curl.pause(pycurl.PAUSE_CONT)
            except pycurl.error:
                pass

    def _progress(self, dltotal: int, dlnow: int, ultotal: int, ulnow: int) -> int:
        """libcurl's progress callback: a non-zero answer aborts the transfer."""
        now = time.monotonic()
        if self.failed_client:
            self.abort_reason = "client_gone"  # nobody is left to read it: free the connection
            return 1
        if dlnow != self.last_received:
            self.last_received, self.last_activity = dlnow, now
        if self._overdue():
            self.abort_reason = "timeout"
            return 1
        return 0

    def _owns_curl(self) -> bool:
        # Tornado marks a handle busy with the request it serves and clears
        # the mark before the handle can serve another request.
        # (The client wraps our request in a proxy object that holds it.)
        info = getattr(self.curl, "info", None)
        if self.done or not isinstance(info, dict):
            return False
        serving = info.get("request")
        return serving is self.request or getattr(serving, "request", None) is self.request

    def _pause(self, pause: bool) -> None:
        if pause == self.paused or not self._owns_curl():
            return
        import pycurl

        try:
            self.curl.pause(pycurl.PAUSE_RECV if pause else pycurl.PAUSE_CONT)
            self.paused = pause
            self.last_activity = time.monotonic()
        except pycurl.error:  # the transfer already failed; its error arrives on its own
            pass
        # (libcurl >= 7.69 wakes a resumed transfer through its timer callback.)

    def client_gone(self) -> None:
        self.failed_client = True
        self.pending = []
        self._pause(False)  # so that the progress callback runs and aborts the transfer

    # -- headers -------------------------------------------------------------------

    def on_header_line(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.lines = [line]  # a new response (after a 1xx): start over
            self.headers_done = False
            m = _STATUS_LINE.match(line.rstrip("\r\n"))
            self.status = (int(m.group(1)), (m.group(2) or "").strip()) if m else None
        elif line.strip():
            self.lines.append(line)
        elif self.status is not None and self.status[0] >= 200:
            self.headers_done = True
            self.drain()

    def start(self) -> None:
        if self.started or self.status is None:
            return
        self.started = True
        h = self.handler
        code, reason = self.status
        h.set_status(code, reason or _reason_phrase(code))
        headers = tornado.httputil.HTTPHeaders.parse("".join(self.lines[1:]))
        connection_listed = {canonical(t.strip()) for v in headers.get_list("Connection") for t in v.split(",")}
        for name in ("Content-Type", "Date", "Server"):
            h.clear_header(name)
        if "Access-Control-Allow-Origin" in headers:  # the upstream does its own CORS: its headers, not ours
            for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
                         "Access-Control-Expose-Headers"):
                h.clear_header(name)
        cookie_name = h.gateway.config.sessions.cookie_name
        chunked = "Transfer-Encoding" in headers  # then a Content-Length is not to be believed
        for name, value in headers.get_all():
            key = canonical(name)
            if key in RESPONSE_DROPPED or key in connection_listed or key == "x-request-id" \
                    or (key == "content-length" and (code == 204 or chunked)):
                continue
            if key == "set-cookie" and _sets_gateway_cookie(value, cookie_name):
                continue
            h.add_header(name, value)

    # -- body ----------------------------------------------------------------------

    def on_chunk(self, chunk: bytes) -> None:
        if self.failed_client:
            return
        self.pending.append(chunk)
        if self.headers_done:
            self.drain()

    def drain(self) -> None:
        self.start()
        h = self.handler
        chunks, self.pending = self.pending, []
        if self.failed_client or h.request.method == "HEAD" or h.get_status() in (204, 304):
            return
        for chunk in chunks:
            h.write(chunk)
            self.buffered += len(chunk)
        self._flush()
        if self.buffered + self.in_flight > HIGH_WATER:
            self._pause(True)

    def _flush(self) -> None:
        # One flush at a time: Tornado resolves only the latest flush's future.
        if self.in_flight or not self.buffered or self.failed_client:
            return
        self.in_flight, self.buffered = self.buffered, 0
        self.handler.flush().add_done_callback(self._flushed)

    def _flushed(self, fut: Any) -> None:
        self.in_flight = 0
        if fut.exception() is not None:
            self.client_gone()
            return
        if self.paused and self.buffered <= LOW_WATER:
            self._pause(False)
        self._flush()


def _reason_phrase(code: int) -> str:
    return tornado.httputil.responses.get(code, "Unknown")


def _sets_gateway_cookie(set_cookie: str, name: str) -> bool:
    """Would a browser read this Set-Cookie as (or as smuggling) the
    gateway's cookie?  Only the gateway sets it: no session fixation by an
    upstream.  A nameless cookie (``=gw_session=...`` or no ``=`` at all) is
    sent back as its bare value, so it counts too."""
    pair = set_cookie.split(";", 1)[0]
    cookie, sep, value = pair.partition("=")
    return not sep or not cookie.strip() or cookie.strip() == name


def _without_cookie(header: str, name: str) -> str:
    """The Cookie header minus the gateway's own cookie."""
    parts = [p.strip() for p in header.split(";")]
    return "; ".join(p for p in parts if p and p.split("=", 1)[0].strip() != name)


def routes(gateway: "Gateway") -> list[tuple[Any, ...]]:
    return [(r".*", ProxyHandler)]

