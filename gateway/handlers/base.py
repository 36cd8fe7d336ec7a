"""The base request handler: one place that renders errors as JSON, reads
bounded JSON bodies, finds the caller's session and guards against CSRF.

Every handler of the gateway, and every handler a plugin contributes,
should subclass :class:`BaseHandler`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from functools import cached_property
from typing import Any, Awaitable, Sequence
from urllib.parse import urlsplit

import tornado.escape
import tornado.web
from tornado.concurrent import Future

from gateway.api import Principal
from gateway.app import Gateway
from gateway import audit, metrics
from gateway.errors import GatewayError, StoreUnavailable, error_body_for_status, invalid_request, unauthenticated
from gateway.plugins import plugin_failure
from gateway.proxy.policy import new_id
from gateway.ratelimit import RateLimited
from gateway.sessions.manager import Session, SupersededToken

log = logging.getLogger("gateway.app")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MISSING = object()


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Streams the body into memory up to ``server.max_body_size`` (413 beyond)."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def initialize(self, **kwargs: Any) -> None:
        """Route kwargs become attributes (``{"provider": p}`` -> ``self.provider``)."""
        for name, value in kwargs.items():
            setattr(self, name, value)
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._token_source: str | None = None
        self._principal: Principal | None = None
        self._principal_resolved = False
        #: the gateway token this request presented that opened no session
        self._stale_token: str | None = None

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.application.settings["gateway"]  # (asked many times a request: no cast() call)
        return gateway

    # -- body ---------------------------------------------------------------

    @property
    def max_body_size(self) -> int:
        """The body limit of the gateway's own endpoints (JSON, small)."""
        return self.gateway.config.server.auth_max_body_size

    def count_in_flight(self) -> None:
        """Count this request as in flight until it finishes or its client
        leaves (while the gateway drains, :meth:`flush` tells the client to
        close)."""
        self.gateway.requests_in_flight += 1
        self._in_flight = True
        # In the request's own task: audit lines recorded while it is served name it.
        audit.bind_request(lambda: {"request_id": self.request_id, "ip": self.client_ip})

    #: the RateLimit headers of this request's limits (set by gateway.ratelimit)
    rate_limit_headers: dict[str, str] | None = None
    #: the response head went out (set by :meth:`flush`, which finish() calls)
    head_sent = False
    #: finish() was called
    response_finished = False
    #: bytes of response body written (for the access log)
    bytes_sent = 0
    #: the error this response renders (set by :meth:`write_error`), for the access log
    rendered_error: GatewayError | None = None

    def write(self, chunk: str | bytes | dict[str, Any]) -> None:
        super().write(chunk)
        if isinstance(chunk, bytes):
            self.bytes_sent += len(chunk)
        elif isinstance(chunk, str):
            self.bytes_sent += len(chunk.encode("utf-8"))
        else:  # as Tornado encodes a dict
            self.bytes_sent += len(tornado.escape.json_encode(chunk).replace("</", "<\\/").encode("utf-8"))

    def flush(self, include_footers: bool = False) -> "Future[None]":
        if not self.head_sent:
            self.head_sent = True
            # A response whose head goes out while the gateway drains tells
            # its client not to send another request on this connection.
            if self.gateway.draining:
                self.set_header("Connection", "close")
        return super().flush(include_footers)

    def finish(self, chunk: Any = None) -> "Future[None]":
        self.response_finished = True
        return super().finish(chunk)

    def _not_in_flight(self) -> None:
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            self.gateway.requests_in_flight -= 1

    async def prepare(self) -> None:
        self.count_in_flight()
        limit = self.max_body_size
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise invalid_request("Content-Length is not a number") from None
            if declared > limit:
                raise self._too_large(limit)
        # Leave room past the limit so that data_received, not the connection,
        # notices an oversized chunked body and answers with a JSON 413.
        self.request.connection.set_max_body_size(2 * limit + 65536)  # type: ignore[union-attr]
        limits = self.gateway.rate_limits.for_path(self.request.path)
        if limits and self.request.method in self.allowed_methods():  # (a 405 or a preflight is not counted)
            # before the endpoint works (a login, a registration, a refresh)
            await self.gateway.rate_limits.check(self, limits, resolve=self.principal_for_limits)

    def on_finish(self) -> None:
        self._not_in_flight()

    def on_connection_close(self) -> None:
        """The client left: nothing of this request counts as in flight any
        more, and a handler waiting for the body is released."""
        super().on_connection_close()
        self._not_in_flight()
        self._chunks = []

    def _too_large(self, limit: int) -> GatewayError:
        return GatewayError("payload_too_large", f"the request body exceeds the {limit}-byte limit")

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.response_finished:
            return None
        self._body_size += len(chunk)
        if self._body_size > self.max_body_size:
            # A chunked body has no Content-Length to refuse up front: answer
            # now (raising here would only drop the connection) and let the
            # connection close once the response is out.
            self._chunks = []
            self.send_error(413, exc_info=(GatewayError, self._too_large(self.max_body_size), None))
            return None
        self._chunks.append(chunk)
        return None

    @property
    def body(self) -> bytes:
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object, or a 400 that says what is wrong
        (parsed once per request)."""
        parsed: dict[str, Any] | None = getattr(self, "_json_body", None)
        if parsed is None:
            parsed = self._json_body = self._parse_json_body()
        return parsed

    def _parse_json_body(self) -> dict[str, Any]:
        if not self.body.strip():
            raise invalid_request("the request body must be a JSON object")
        # Required, not assumed: a cross-site page can post a body without
        # a CORS preflight only as text/plain or a form, never as JSON.
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise invalid_request(f"expected Content-Type application/json, got {ctype or 'none'}")
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid_request(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise invalid_request("the request body is not valid JSON: nested too deeply") from None
        if not isinstance(value, dict):
            raise invalid_request("the request body must be a JSON object")
        return value

    def field(self, body: dict[str, Any], name: str, kind: type = str, *, default: Any = _MISSING, max_length: int = 4096) -> Any:
        """``body[name]`` checked to be of ``kind`` (400 naming the field otherwise)."""
        if name not in body or body[name] is None:
            if default is _MISSING:
                raise invalid_request(f"missing field: {name}")
            return default
        value = body[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise invalid_request(f"field {name} must be a {_type_name(kind)}")
        if isinstance(value, str):
            if len(value) > max_length:
                raise invalid_request(f"field {name} is longer than {max_length} characters")
            if value == "" :
                raise invalid_request(f"field {name} must not be empty")
            try:  # JSON may carry lone surrogates ("\ud800"), which no UTF-8 consumer accepts
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid_request(f"field {name} is not valid Unicode text") from None
        return value

    # -- errors ---------------------------------------------------------------

    def allowed_methods(self) -> list[str]:
        """The methods this resource answers, for ``Allow`` on a 405 (RFC 9110
        §15.5.6): those of :attr:`SUPPORTED_METHODS` the class implements,
        ``OPTIONS`` only where it is more than this class's CORS preflight.
        A handler whose methods depend on its route overrides this."""
        methods = []
        for method in self.SUPPORTED_METHODS:
            implemented = getattr(type(self), method.lower(), None)
            inherited = BaseHandler.options if method == "OPTIONS" else getattr(
                tornado.web.RequestHandler, method.lower(), None)
            if implemented is not None and implemented is not inherited:
                methods.append(method)
        return methods

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        for name, value in (self.rate_limit_headers or {}).items():  # what the request's limits said, kept
            self.set_header(name, value)
        if isinstance(exc, GatewayError):
            metrics.error_rendered(exc.status, exc.limit if isinstance(exc, RateLimited) else exc.code,
                                   exc.store if isinstance(exc, StoreUnavailable) else None)
            self.rendered_error = exc
            if isinstance(exc, StoreUnavailable):
                self.gateway.store_failed_at = time.monotonic()
            body = exc.body()
            for name, value in exc.headers.items():
                self.set_header(name, value)
            retry = exc.headers.get("Retry-After", "")
            if exc.status == 429 and retry.isdigit():
                body.setdefault("retry_after", int(retry))  # every 429 says it in its body too
        elif isinstance(exc, tornado.web.HTTPError):
            body = error_body_for_status(status_code, exc.reason if exc.reason else None)
        else:
            body = error_body_for_status(status_code, "an internal error occurred" if status_code >= 500 else None)
        if not isinstance(exc, GatewayError):
            self.rendered_error = GatewayError(body["error"], body["message"], status=status_code)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        if self.request.method != "HEAD":
            self.finish(json.dumps(body))
        else:
            self.finish()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, GatewayError):
            if value.status >= 500 or value.detail:
                log.warning("%s %s -> %s %s%s", self.request.method, self.request.path, value.status, value.code,
                            f": {value.detail}" if value.detail else "")
        elif isinstance(value, tornado.web.HTTPError):
            log.warning("%s %s -> %s", self.request.method, self.request.path, value.status_code)
        else:
            log.error("uncaught exception in %s %s", self.request.method, self.request.path, exc_info=(typ, value, tb))

    def set_default_headers(self) -> None:
        # Every response, errors included, names its request for the logs,
        # and carries CORS headers for an allowed origin.
        self.clear_header("Server")
        self.set_header("X-Request-Id", self.request_id)
        origin = self.allowed_origin()
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")
            self.set_header("Access-Control-Expose-Headers",
                            "Retry-After, WWW-Authenticate, X-Request-Id, RateLimit, RateLimit-Policy")
        self.set_header("Vary", "Origin")

    def allowed_origin(self) -> str | None:
        """The request's Origin if it is in ``sessions.allowed_origins``."""
        origin = (self.request.headers.get("Origin") or "").lower()
        return origin if origin and origin in self.gateway.config.sessions.allowed_origins else None

    def answer_preflight(self) -> None:
        """A CORS preflight: allowed (with credentials) for an origin in
        ``allowed_origins``, 403 for any other."""
        if self.allowed_origin() is None:
            origin = (self.request.headers.get("Origin") or "")[:200]
            raise GatewayError("forbidden", "this origin is not allowed to call this endpoint",
                               log_message=f"CORS preflight from origin {origin!r}, which is not in "
                                           "sessions.allowed_origins")
        requested = self.request.headers.get("Access-Control-Request-Headers", "")
        # the methods this resource answers, as Allow on a 405 names them
        self.set_header("Access-Control-Allow-Methods", ", ".join(self.allowed_methods()))
        if requested:
            self.set_header("Access-Control-Allow-Headers", re.sub(r"[^A-Za-z0-9_,\- ]", "", requested)[:1024])
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    async def options(self, *args: Any) -> None:
        """The gateway's own endpoints answer CORS preflights themselves."""
        if not (self.request.headers.get("Origin") and self.request.headers.get("Access-Control-Request-Method")):
            raise GatewayError("method_not_allowed", "OPTIONS is only answered as a CORS preflight")
        self.answer_preflight()

    @property
    def request_id(self) -> str:
        """The client's well-formed X-Request-Id, or a fresh one."""
        rid = getattr(self, "_request_id", None)
        if rid is None:
            given = self.request.headers.get("X-Request-Id", "")
            rid = given if _REQUEST_ID.match(given) else new_id(128)
            self._request_id = rid
        return rid

    # -- who is calling ---------------------------------------------------------

    @property
    def client_ip(self) -> str:
        """The client's address: the peer, or the right-most address in
        X-Forwarded-For that is not a trusted proxy (only when the peer is one)."""
        cached: str | None = getattr(self, "_client_ip", None)
        if cached is not None:
            return cached
        peer = self.request.remote_ip or ""
        ip = peer
        trusted = self.gateway.config.server.trusted_proxies
        if trusted and _in_networks(peer, trusted):
            hops = [h.strip() for h in ",".join(self.request.headers.get_list("X-Forwarded-For")).split(",") if h.strip()]
            for hop in reversed(hops):
                ip = hop
                if not _in_networks(hop, trusted):
                    break
        self._client_ip = ip
        return ip

    @cached_property
    def peer_is_trusted(self) -> bool:
        trusted = self.gateway.config.server.trusted_proxies
        return bool(trusted) and _in_networks(self.request.remote_ip or "", trusted)

    @property
    def client_scheme(self) -> str:
        if self.peer_is_trusted:
            proto = self.request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                return proto
        return self.request.protocol

    @property
    def client_host(self) -> str:
        """The Host the client addressed (a trusted proxy's X-Forwarded-Host)."""
        if self.peer_is_trusted:
            forwarded = self.request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            if forwarded:
                return forwarded
        return self.request.host

    def session_token(self) -> str | None:
        """The gateway token this request presents (Bearer first, then cookie)."""
        auth = self.request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip().startswith("gws_"):
            self._token_source = "bearer"
            return value.strip()
        cookie = self.get_cookie(self.gateway.config.sessions.cookie_name)
        if cookie:
            self._token_source = "cookie"
            return cookie
        return None

    def credential_headers(self) -> list[str]:
        """The request headers that carry a provider's credential (an API
        key, say), as the enabled providers name them."""
        cached = getattr(self, "_credential_headers", None)
        if cached is None:
            cached = []
            for provider in self.gateway.providers.values():
                try:
                    cached.extend(provider.credential_headers(self.request))
                except Exception as exc:  # fail closed: a credential must not slip through
                    raise plugin_failure(f"provider {provider.name}", "credential_headers", exc) from exc
            self._credential_headers = cached
        return cached

    async def get_principal(self, *, allow_superseded: bool = True) -> Principal | None:
        """Who is calling: a session, else whatever a plugin's
        ``gateway_authenticate`` says.  A credential sent explicitly beside a
        session cookie (an API key from a browser tool) speaks for the
        request, and is refused if it is bad.  Store outages raise 503."""
        if self._principal_resolved:
            return self._principal
        token = self.session_token()
        principal = None
        if token and self._token_source == "cookie" and self.credential_headers():
            principal = await self.gateway.authenticate_request(self.request)
            if principal is not None:
                self._principal, self._principal_resolved = principal, True
                return principal
        if token:
            try:
                session = await self.gateway.sessions.authenticate(token, ip=self.client_ip, allow_superseded=allow_superseded)
            except SupersededToken:
                # Still in its grace: the cookie is left alone, for the
                # browser may hold the newer one already (a concurrent /refresh).
                raise unauthenticated("this token was already refreshed; use the newer token",
                                      reason="superseded") from None
            if session is not None:
                principal = Principal(user_id=session.user_id, provider=session.provider, session=session)
            else:
                self._stale_token = token
        if principal is None and not (token and self._token_source == "bearer"):
            principal = await self.gateway.authenticate_request(self.request)
        self._principal, self._principal_resolved = principal, True
        return principal

    async def principal_for_limits(self) -> Principal | None:
        """The caller, for a rate limit keyed by user or session on one of
        the gateway's own endpoints; not kept, so that the endpoint still
        resolves it its own way (``/refresh`` refuses a replaced token)."""
        if self._principal_resolved:
            return self._principal
        try:
            return await self.get_principal()
        except GatewayError as exc:
            if exc.code != "unauthenticated":
                raise
            return None  # the endpoint will say why
        finally:
            self._principal, self._principal_resolved, self._stale_token = None, False, None

    @property
    def resolved_principal(self) -> Principal | None:
        """Who is calling, as far as :meth:`get_principal` already found
        out (never a lookup of its own): for the access log."""
        return self._principal if self._principal_resolved else None

    async def own_session(self, *, allow_superseded: bool = True) -> tuple[Principal, Session]:
        """:meth:`require_session`, with the gateway's own session record."""
        principal = await self.require_session(allow_superseded=allow_superseded)
        if not isinstance(principal.session, Session):  # a plugin's principal claiming a session
            raise unauthenticated(reason="invalid")
        return principal, principal.session

    async def require_session(self, *, allow_superseded: bool = True) -> Principal:
        principal = await self.get_principal(allow_superseded=allow_superseded)
        if principal is None or principal.session is None:
            raise await self.unauthenticated_error()
        self.check_csrf()
        return principal

    async def unauthenticated_error(self, stale_token: str | None = None) -> GatewayError:
        """The 401 for a request whose credential opened no session, with
        its ``reason``: ``missing`` when it presented none, else why the
        gateway token (``stale_token``, by default the one
        :meth:`get_principal` found dead) opens nothing, as the store still
        knows it; ``invalid`` for any other credential.  A dead cookie is
        cleared, since the browser cannot drop an ``HttpOnly`` cookie itself
        (only here, where the store answered: an outage raises 503 first)."""
        token = stale_token or self._stale_token
        if token is not None:
            reason = await self.gateway.sessions.ended_reason(token)
            if self._token_source == "cookie":
                self.clear_session_cookie()
        elif self._token_source is not None or "Authorization" in self.request.headers \
                or self.credential_headers():
            reason = "invalid"
        else:
            reason = "missing"
        return unauthenticated(reason=reason)

    def check_csrf(self) -> None:
        """A cookie-authenticated unsafe request needs an allowed Origin (or
        Referer), the same origin as the gateway, or X-Requested-With."""
        if self._token_source != "cookie" or self.request.method not in UNSAFE_METHODS:
            return
        if self._principal is not None and self._principal.session is None:
            return  # authenticated by a plugin (an API key), not by the cookie
        if self.request.headers.get("X-Requested-With"):
            return
        origin = self.request.headers.get("Origin")
        if not origin or origin == "null":
            referer = self.request.headers.get("Referer")
            if referer:
                try:
                    parts = urlsplit(referer)
                    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
                except ValueError:  # not a URL: no origin to believe
                    origin = None
        if origin:
            origin = origin.lower()
            own = f"{self.client_scheme}://{self.client_host}".lower()
            if origin == own or origin in self.gateway.config.sessions.allowed_origins:
                return
        raise GatewayError(
            "csrf",
            "a cookie-authenticated request must come from an allowed Origin or carry X-Requested-With",
            log_message=f"cookie-authenticated {self.request.method} from origin {origin[:200]!r}, neither the "
                        "gateway's own nor in sessions.allowed_origins" if origin else
                        f"cookie-authenticated {self.request.method} with no Origin, Referer or X-Requested-With",
        )

    # -- cookies ----------------------------------------------------------------

    def set_session_cookie(self, token: str, max_age: float | None) -> None:
        """The session cookie: persistent for ``max_age`` seconds, or a
        browser-session cookie (neither ``Max-Age`` nor ``Expires``) for ``None``."""
        s = self.gateway.config.sessions
        self.set_cookie(
            s.cookie_name, token, path="/", httponly=True, secure=s.cookie_secure,
            samesite=s.cookie_samesite, max_age=None if max_age is None else max(1, int(max_age)),
            domain=s.cookie_domain or None,
        )

    def clear_session_cookie(self) -> None:
        s = self.gateway.config.sessions
        self.clear_cookie(s.cookie_name, path="/", domain=s.cookie_domain or None,
                          httponly=True, secure=s.cookie_secure, samesite=s.cookie_samesite)

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(value, ensure_ascii=False))


def _in_networks(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Is ``address`` in one of ``networks``?  Each request asks it of its
    peer and of its X-Forwarded-For hops, with the same few networks: the
    answers for up to :data:`_MEMBERSHIP_MAX` short addresses are kept per
    process (a longer text, which no address is, is judged every time)."""
    if not networks:
        return False
    if len(address) > _ADDRESS_MAX:
        return _in_networks_uncached(address, networks)
    key = (address, tuple(networks))
    found = _membership.get(key)
    if found is None:
        if len(_membership) >= _MEMBERSHIP_MAX:
            _membership.clear()
        found = _membership[key] = _in_networks_uncached(address, networks)
    return found


def _in_networks_uncached(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


#: how many (address, networks) answers :func:`_in_networks` keeps
_MEMBERSHIP_MAX = 4096
#: the longest text :func:`_in_networks` keeps an answer for (an IPv6 address with a zone fits)
_ADDRESS_MAX = 64
_membership: dict[tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]], bool] = {}


def _type_name(kind: type) -> str:
    return {str: "string", int: "integer", bool: "boolean", dict: "JSON object", list: "JSON array"}.get(kind, kind.__name__)
