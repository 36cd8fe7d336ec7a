"""The WebSocket relay: ``Upgrade: websocket`` requests on routes with
``websocket = true``.

Everything that decides whether the socket may open happens before the
upgrade, with the same code as for HTTP (route, path safety, credentials in
the wrong place, who is calling, route policy), plus the WebSocket CSRF
check: a cookie-authenticated handshake must come from an allowed
``Origin``.  Then the upstream handshake is made (with the identity
headers); only when the upstream accepted is the client's upgrade answered,
with the subprotocol the upstream chose.  Any refusal is a JSON error, never
an upgrade.

Messages are relayed one at a time in each direction: the next frame is
read only when the previous one was written, so a slow side slows the other
instead of filling memory.  A :class:`SocketWatcher` per process checks the
sessions of open sockets every :data:`WATCH_INTERVAL` seconds and closes a
socket whose session ended (code 4401 to the client, 1001 upstream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import tornado.httputil
import tornado.routing
import tornado.web
import tornado.websocket

from gateway import metrics
from gateway.errors import GatewayError, StoreUnavailable, invalid_request
from gateway.proxy.handler import ProxyHandler
from gateway.proxy.upstream import UpstreamError, UpstreamFailed, UpstreamSocket, UpstreamTimeout
from gateway.api import Principal
from gateway.app import Gateway
from gateway.sessions.manager import Session

log = logging.getLogger("gateway.proxy")

#: How often the sessions of open sockets are checked (a session's end
#: reaches its sockets within this, in every process).
WATCH_INTERVAL = 2.0
#: Close codes: the session ended (client side) / going away (upstream side).
SESSION_ENDED = 4401
GOING_AWAY = 1001


class UpgradeMatcher(tornado.routing.Matcher):
    """Matches ``Upgrade: websocket`` requests (whatever their path)."""

    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        upgrade = request.headers.get("Upgrade")
        if upgrade is not None and upgrade.strip().lower() == "websocket":
            return {}
        return None


class WebSocketProxyHandler(tornado.websocket.WebSocketHandler, ProxyHandler):
    """Authenticates a handshake like any proxied request, opens the
    upstream socket, then relays messages both ways."""

    upstream: UpstreamSocket | None = None
    principal: Principal | None = None
    _pump: "asyncio.Task[None] | None" = None
    _closing_reason: str | None = None
    #: counted in gateway_websocket_connections (from open() until on_close())
    _counted = False

    # -- before the upgrade --------------------------------------------------------

    async def prepare(self) -> None:
        route = self.find_route()
        request = self.request
        if not route.websocket:
            raise invalid_request(f"the route {route.prefix} does not accept WebSocket upgrades")
        if request.method != "GET":
            raise invalid_request("a WebSocket upgrade must be a GET")
        self.principal = await self.admit(route, websocket=True)
        headers = await self.build_upstream_headers(route, self.principal, websocket=True)
        await self._connect_upstream(headers)

    async def _connect_upstream(self, headers: list[tuple[str, str]]) -> None:
        route = self.route
        url = route.upstream_url(self.request.path, self.request.query)
        url = "ws" + url[4:] if url.startswith("http") else url
        protocols = [p.strip() for v in self.request.headers.get_list("Sec-WebSocket-Protocol")
                     for p in v.split(",") if p.strip()]
        try:
            self.upstream = await self.gateway.upstream_client.websocket(
                url, headers, protocols=protocols, max_message_size=route.websocket_max_message_size,
                connect_timeout=route.connect_timeout, request_timeout=route.request_timeout)
        except UpstreamTimeout as exc:
            raise self._handshake_failed("did not answer in time", exc, timeout=True) from None
        except UpstreamFailed as exc:
            raise self._handshake_failed("refused the WebSocket handshake", exc) from None
        except UpstreamError as exc:
            raise self._handshake_failed("could not be reached", exc) from None

    def _handshake_failed(self, what: str, exc: BaseException, *, timeout: bool = False) -> GatewayError:
        code = "gateway_timeout" if timeout else "bad_gateway"
        return GatewayError(code, f"the upstream for {self.route.prefix} {what}",
                            log_message=f"WebSocket upstream {exc}")

    def check_origin(self, origin: str) -> bool:
        return True  # decided in prepare(): Origin matters only for cookie-authenticated sockets

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        chosen = self.upstream.protocol if self.upstream is not None else None
        return chosen if chosen in subprotocols else None

    @property
    def max_message_size(self) -> int:
        return self.route.websocket_max_message_size

    @property
    def ping_interval(self) -> float | None:
        return self.route.websocket_ping_interval or None

    def data_received(self, chunk: bytes) -> None:
        return None  # a handshake has no body

    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)
        if self.ws_connection is None and self.upstream is not None:
            # The client's handshake was not acceptable after all.
            self.upstream.close(GOING_AWAY)
            self.upstream = None

    # -- after the upgrade ---------------------------------------------------------------

    def open(self, *args: Any, **kwargs: Any) -> None:
        self._not_in_flight()  # an open socket is not a request a graceful stop waits for
        watcher(self.gateway).add(self)
        metrics.websocket_opened(self.route.prefix)
        self._counted = True
        self._pump = asyncio.ensure_future(self._from_upstream())

    async def on_message(self, message: str | bytes) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            try:
                await upstream.send(message)
            except (ConnectionError, RuntimeError):
                pass  # the pump sees the upstream's close and ends this side

    def on_ping(self, data: bytes) -> None:
        # (Tornado has answered it already.)
        self._to_upstream("ping", data)

    def on_pong(self, data: bytes) -> None:
        self._to_upstream("pong", data)

    def _to_upstream(self, kind: str, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            send = upstream.ping if kind == "ping" else upstream.pong
            asyncio.ensure_future(send(data)).add_done_callback(_quiet)

    async def _from_upstream(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        code: int | None = None
        reason = ""
        while True:
            kind, data, reason = await upstream.receive()
            try:
                if kind == "text":
                    await self.write_message(data)
                elif kind == "binary":
                    await self.write_message(data, binary=True)
                elif kind == "ping":
                    self.ping(data)
                elif kind == "close":
                    code = data
                    break
            except tornado.websocket.WebSocketClosedError:
                return
        if self.ws_connection is not None and self._closing_reason is None:
            if code is None:  # the upstream went away without a close frame
                code, reason = 1011, "the upstream went away"
            self.close(code if code not in (1005, 1006) else None, reason)

    def on_close(self) -> None:
        watcher(self.gateway).discard(self)
        if self._counted:
            self._counted = False
            metrics.websocket_closed(self.route.prefix)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            code, reason = self.close_code, self.close_reason
            if self._closing_reason is not None:
                code, reason = GOING_AWAY, self._closing_reason
            upstream.close(code if code not in (1005, 1006) else None, reason)
        self._not_in_flight()

    def end(self, reason: str, code: int = SESSION_ENDED) -> None:
        """Close both sides: the session behind this socket ended (4401 to
        the client), or the gateway is going away (1001)."""
        self._closing_reason = reason
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close(GOING_AWAY, reason)
        self.close(code, reason)

    def on_connection_close(self) -> None:
        if self.ws_connection is None:
            ProxyHandler.on_connection_close(self)
            if self.upstream is not None:
                self.upstream.close(GOING_AWAY)
                self.upstream = None
            return
        super().on_connection_close()

    def send_error(self, *args: Any, **kwargs: Any) -> None:
        if self.ws_connection is None and self.upstream is not None:
            self.upstream.close(GOING_AWAY)
            self.upstream = None
        super().send_error(*args, **kwargs)


class SocketWatcher:
    """Closes sockets whose session ended: one check of every open socket's
    session (or API key) each :data:`WATCH_INTERVAL`, per process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.sockets: set[WebSocketProxyHandler] = set()
        self._task: "asyncio.Task[None] | None" = None

    def add(self, handler: WebSocketProxyHandler) -> None:
        if handler.principal is None:
            return  # an anonymous socket on an optional or public route: nothing to end
        self.sockets.add(handler)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def discard(self, handler: WebSocketProxyHandler) -> None:
        self.sockets.discard(handler)

    async def _run(self) -> None:
        while self.sockets:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self.check()
            except Exception:
                log.exception("checking the sessions of open WebSockets failed")

    async def check(self) -> None:
        now = time.time()
        store = self.gateway.session_store
        for handler in list(self.sockets):
            principal = handler.principal
            if principal is None or handler not in self.sockets:
                continue
            try:
                if principal.session is not None:
                    record = await store.get(principal.session.id)
                    session = Session.from_record(record) if record is not None else None
                    alive = session is not None and _live(session, now)
                    if session is not None and alive:
                        await self._touch(session, now)
                else:
                    again = await self.gateway.authenticate_request(handler.request)
                    alive = again is not None and again.user_id == principal.user_id
            except StoreUnavailable:
                continue  # cannot tell now: keep the socket, look again next time
            except GatewayError as exc:
                if exc.status >= 500:
                    continue
                alive = False  # the credential is refused now (a revoked or expired key)
            if not alive and handler in self.sockets:
                self.sockets.discard(handler)
                handler.end("session ended")

    async def _touch(self, session: Session, now: float) -> None:
        """An open socket is a user at work: push its session's idle
        deadline forward, as a request would (at most once per
        ``touch_interval``; never past the absolute deadline)."""
        manager = self.gateway.sessions
        if now - session.last_seen_at < manager.touch_interval:
            return
        session.last_seen_at = now
        session.expires_at = manager.idle_deadline(session, now)  # a remembered session's own timeout
        ttl = max(min(session.expires_at, session.absolute_expires_at) - now, 1.0)
        await self.gateway.session_store.save(session.to_record(), ttl)

    def close_all(self) -> None:
        for handler in list(self.sockets):
            handler.end("the gateway is stopping", GOING_AWAY)
        if self._task is not None:
            self._task.cancel()


def _quiet(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()  # a ping to a closing socket: nothing to do


def _live(session: Session, now: float) -> bool:
    return now < session.expires_at and now < session.absolute_expires_at


def watcher(gateway: Gateway) -> SocketWatcher:
    """The process's watcher (made on first use)."""
    found: SocketWatcher | None = gateway.socket_watcher
    if found is None:
        found = gateway.socket_watcher = SocketWatcher(gateway)
    return found
