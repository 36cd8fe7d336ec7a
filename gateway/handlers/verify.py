"""``GET {auth_prefix}/verify``: forward auth, for a proxy in front of the
upstreams (nginx ``auth_request``, Traefik ``ForwardAuth``).

The proxy asks, for each request it is about to forward, whether the
gateway lets it through: it sends the client's headers (cookie,
``Authorization``, ``Origin``...) and the original method and URI, in
``X-Original-Method``/``X-Original-URI`` (nginx) or
``X-Forwarded-Method``/``X-Forwarded-Uri`` (Traefik).  The endpoint is
off (404) unless ``server.forward_auth``; those headers are believed
only from a peer in ``server.trusted_proxies``: any other peer gets 403,
a request naming no original URI 400, and nothing is evaluated (a spoofed
original URI must never pick a laxer route).

The original URI picks the route exactly as the proxy does (the same table,
the same refusals of ambiguous paths), and the request is admitted by the
proxy's own code (:meth:`gateway.proxy.handler.ProxyHandler.admit`): its
credentials, ``auth``, ``scopes``, ``allow_sessions``, CSRF for unsafe
original methods, rate limits and ``require_consent``.  Allowed: 200 with
no body, carrying the headers the proxy would send upstream for this
caller (identity, consent, profile headers, the signed assertion, a
provider's and plugins' headers), for the proxy to copy.  Refused: the
usual JSON error (401 with ``WWW-Authenticate``, a dead cookie cleared,
403, 404 for no route, 429...).  Nothing is fetched upstream.

``X-Gateway-Verify: refusal`` marks the proxy's second question about a
refused request (nginx's ``error_page``), whose answer goes to the client:
then an allowed request is answered 503 "try again", never 200 (the
upstream never saw it), and a CORS preflight to a non-public route, which
is never let through, gets the proxy's own answer.

``{auth_prefix}/verify/envoy/<original path>`` is the same judgement for
Envoy's HTTP ``ext_authz``, which names the original request by the
authorization request itself: its method, and its path and query after the
configured ``path_prefix`` (:class:`EnvoyVerifyHandler`).  Envoy lets a
request through on 200 only and relays any other answer to the client as it
is, so there is no second question, and a CORS preflight gets the proxy's
own answer (204, never 200) at once.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar, Mapping

from gateway.errors import GatewayError, StoreUnavailable, invalid_request, not_found
from gateway.openapi import Operation
from gateway.proxy import policy
from gateway.proxy.handler import ProxyHandler

#: where a proxy puts the original method and URI: (method header, URI header), nginx's first
ORIGINAL_HEADERS = (("X-Original-Method", "X-Original-URI"), ("X-Forwarded-Method", "X-Forwarded-Uri"))
#: the original methods verify judges (those the proxy forwards)
METHODS = frozenset(ProxyHandler.SUPPORTED_METHODS)
#: how long after a store failure the proxy's second question is answered 503 without the store
STORE_FAILURE_MEMORY = 1.0
_TOKEN = re.compile(r"^[A-Z]{1,16}$")


class VerifyHandler(ProxyHandler):
    """Admits the original request as the proxy would, without forwarding it."""

    SUPPORTED_METHODS = ("GET",)  # type: ignore[assignment]  # the original method is a header

    operations: ClassVar[Mapping[str, Operation]] = {"get": Operation(
        "Forward auth: may the original request through, and as whom",
        {200: None},
        errors=(400, 401, 403, 404, 429, 503),
        description="For a proxy in front of the upstreams (nginx `auth_request`, Traefik `ForwardAuth`), "
                    "with `server.forward_auth = true` (404 otherwise), from a peer in `server.trusted_proxies` "
                    "only (403 for any other). The original request is "
                    "named by `X-Original-Method` and `X-Original-URI` (or `X-Forwarded-Method` and "
                    "`X-Forwarded-Uri`) and judged by the route its path matches, as the proxy judges it. "
                    "200 (no body) carries the headers the proxy would send upstream: `X-User-Id`, "
                    "`X-Auth-Provider`, `X-Session-Id`, `X-Auth-Scopes`, `X-Gateway-Assertion` on a route "
                    "with `assertion`, and the others a provider or a plugin adds. Envoy's HTTP `ext_authz` "
                    "asks `/auth/verify/envoy/<original path>` with the original method instead (not "
                    "described here: each such path stands for an upstream's).",
    )}

    #: the original request's method (for CSRF and preflights)
    original_method = "GET"

    #: answering a preflight, which names the methods the proxy forwards, as the proxy's answer does
    _preflight = False

    #: the proxy in front lets a request through on 200 only and relays any other answer to the
    #: client as it is (Envoy): a preflight is answered at once, as the gateway's proxy answers it
    relays_non_200: ClassVar[bool] = False

    def allowed_methods(self) -> list[str]:
        return list(ProxyHandler.SUPPORTED_METHODS) if self._preflight else ["GET"]

    async def prepare(self) -> None:
        self.count_in_flight()
        if not self.gateway.config.server.forward_auth:  # off: as unknown as any other path under auth_prefix
            raise not_found(f"no gateway endpoint {self.request.path}")
        if not self.peer_is_trusted:
            raise GatewayError(
                "forbidden", "forward auth answers only proxies listed in server.trusted_proxies; this peer "
                f"({self.request.remote_ip}) is not one, so no original method or URI it names is believed")
        if self._second_question() and time.monotonic() - self.gateway.store_failed_at < STORE_FAILURE_MEMORY:
            # A store just failed (the likely reason of the refusal asked about): the answer the
            # client gets, at once, instead of a second wait for a store that does not answer.
            raise StoreUnavailable("session store", log_message="a store failed a moment ago: the proxy's second "
                                   "question is answered without asking it again")
        method, uri = self._original()
        self._check_upgrade_and_cookie()
        path = uri.split("?", 1)[0]
        auth = self.gateway.config.server.auth_prefix.rstrip("/")
        # (auth_prefix "/": every path is the gateway's own, and no route may exist; route_for finds none)
        if auth and (path == auth or path.startswith(auth + "/")):
            raise invalid_request(f"the original URI is under {auth}/, the gateway's own endpoints, which are "
                                  "no route to verify: proxy them to the gateway itself")
        route = policy.route_for(self.gateway.routes, path)  # 400 for a path an upstream could read otherwise
        if route is None:
            raise not_found(f"no route for {path}")
        self.route = route
        self.original_method = method
        headers = self.request.headers
        if route.auth != "public" and method == "OPTIONS" and headers.get("Origin") \
                and headers.get("Access-Control-Request-Method"):  # a CORS preflight, which carries no credential
            # Never let through (the proxy answers it itself: an unauthenticated OPTIONS must not
            # reach an upstream that may not check the method); asked again, answered as the proxy does.
            if self.allowed_origin() is None or self.relays_non_200 or self._second_question():
                self._preflight = True
                return self.answer_preflight()  # 403 for an origin not in allowed_origins
            raise GatewayError("forbidden", "a CORS preflight to this route is answered by the gateway itself, "
                               "never forwarded: ask again with X-Gateway-Verify: refusal for its answer")
        websocket = policy.is_websocket_upgrade(headers.get_all())
        if websocket and (not route.websocket or method != "GET"):
            raise invalid_request(f"the route {route.prefix} does not accept WebSocket upgrades"
                                  if not route.websocket else "a WebSocket upgrade must be a GET")
        principal = await self.admit(route, websocket=websocket)
        if self._second_question():  # nginx's error_page: the first answer was a refusal, already relayed
            raise GatewayError("unavailable", "the request was refused a moment ago; try again",
                               headers={"Retry-After": "1"})
        self._upstream_request_headers = await self.with_plugin_headers(
            await self.gateway_identity_headers(route, principal), route, principal)

    def _second_question(self) -> bool:
        """Is this the proxy's second question about a request it was
        refused (``X-Gateway-Verify: refusal``, from a trusted peer)?  Its
        answer goes to the client: never a 2xx that lets the request through."""
        return any(v.strip().lower() == "refusal" for v in self.request.headers.get_list("X-Gateway-Verify"))

    def _check_upgrade_and_cookie(self) -> None:
        """400 for an ``Upgrade`` other than ``websocket`` (an upgraded
        connection would be a tunnel no later request of is asked about),
        and for a ``Cookie`` holding the session cookie more than twice or
        with a blank before its ``=`` (a proxy cutting it out by pattern, as
        the shipped nginx configuration does, would pass it on)."""
        headers = self.request.headers
        upgrades = headers.get_list("Upgrade")
        if upgrades and not policy.is_websocket_upgrade(headers.get_all()) or len(upgrades) > 1:
            raise invalid_request("the only Upgrade forward auth lets through is websocket (one Upgrade: websocket "
                                  "header); send this request without Upgrade")
        name = self.gateway.config.sessions.cookie_name
        found = [part.split("=", 1)[0] for value in headers.get_list("Cookie") for part in value.split(";")
                 if "=" in part and part.split("=", 1)[0].strip() == name]
        if len(found) > 2 or any(key.lstrip(" \t") != name for key in found):
            raise invalid_request(f"the Cookie header holds the session cookie {name} {len(found)} times or in an "
                                  f"unusual form; send it at most twice (a host and a domain cookie), as {name}=...")

    def _original(self) -> tuple[str, str]:
        """The original method and URI, from one pair of headers (both
        pairs present must agree: a client's own copy of the other pair
        must not pick another route)."""
        found: list[tuple[str, str]] = []
        for method_name, uri_name in ORIGINAL_HEADERS:
            methods = self.request.headers.get_list(method_name)
            uris = self.request.headers.get_list(uri_name)
            if len(methods) > 1 or len(uris) > 1:
                raise invalid_request(f"{method_name} and {uri_name} must each be sent once")
            if uris or methods:
                if not uris or not methods:
                    raise invalid_request(f"forward auth needs both {method_name} and {uri_name}")
                found.append((methods[0].strip(), uris[0].strip()))
        if not found:
            raise invalid_request("forward auth needs the original request: X-Original-Method and X-Original-URI "
                                  "(nginx) or X-Forwarded-Method and X-Forwarded-Uri (Traefik), from a proxy "
                                  "in server.trusted_proxies")
        if len(set(found)) > 1:
            raise invalid_request("X-Original-Method/-URI and X-Forwarded-Method/-Uri disagree")
        method, uri = found[0]
        if not _TOKEN.match(method) or method not in METHODS:
            raise invalid_request(f"the original method must be one of {', '.join(sorted(METHODS))}")
        if not uri.startswith("/"):
            raise invalid_request("the original URI must be a path (beginning with '/'), with its query if any")
        return method, uri

    def check_csrf(self) -> None:
        """CSRF as the proxy checks it, for the original method (this
        request itself is a GET)."""
        actual = self.request.method
        self.request.method = self.original_method
        try:
            super().check_csrf()
        finally:
            self.request.method = actual

    async def get(self, *args: Any) -> None:
        for name, value in self._upstream_request_headers or ():
            self.add_header(name, value)
        self.clear_header("Content-Type")
        self.set_header("Cache-Control", "no-store")
        self.set_status(200)
        self.finish()


class EnvoyVerifyHandler(VerifyHandler):
    """Forward auth for Envoy's HTTP ``ext_authz``: the authorization
    request is the original request's method, with its path and query after
    ``path_prefix`` (``{auth_prefix}/verify/envoy``), and no body.

    Judged exactly as :class:`VerifyHandler` judges the request its headers
    name; only the way of reading the original request differs.  The path
    is taken from the raw request target, never from a decoded capture, so
    an encoded ``/`` or a dot segment is refused as the proxy refuses it.
    ``X-Gateway-Verify`` means nothing here (Envoy asks once).  Not in the
    OpenAPI document: the "endpoint" is every path under the prefix, with
    every method the proxy forwards, each standing for an upstream's."""

    SUPPORTED_METHODS = ProxyHandler.SUPPORTED_METHODS  # type: ignore[assignment]  # the original method is its own
    operations: ClassVar[Mapping[str, Operation]] = {}
    relays_non_200 = True

    def allowed_methods(self) -> list[str]:
        return list(ProxyHandler.SUPPORTED_METHODS)

    def _second_question(self) -> bool:
        return False  # Envoy relays its one answer: a refusal marker is a client's, and ignored

    def _original(self) -> tuple[str, str]:
        """The request's own method, and its target after the prefix.  A
        body (``with_request_body``) is refused unread: the gateway never
        reads one in forward auth, and reading it would cost memory for nothing."""
        headers = self.request.headers
        length = headers.get("Content-Length", "0").strip()
        if "Transfer-Encoding" in headers or not length.isdigit() or int(length) != 0:
            raise invalid_request("the authorization request must carry no body (Content-Length: 0): leave "
                                  "Envoy's with_request_body unset; forward auth never reads a body")
        prefix = envoy_prefix(self.gateway.config.server.auth_prefix)
        uri = self.request.uri or ""
        if not uri.startswith(prefix + "/"):  # (the route's pattern matched the path: never the case)
            raise not_found(f"no gateway endpoint {self.request.path}")
        return self.request.method or "GET", uri[len(prefix):]

    get = head = post = delete = patch = put = options = VerifyHandler.get


def envoy_prefix(auth_prefix: str) -> str:
    """The ``path_prefix`` Envoy is given: ``{auth_prefix}/verify/envoy``."""
    return auth_prefix.rstrip("/") + "/verify/envoy"


def routes(pattern: str, auth_prefix: str = "/auth") -> list[tuple[Any, ...]]:
    """The verify route, at ``pattern`` (``auth_path("verify")``), and
    Envoy's, every path under :func:`envoy_prefix`."""
    return [(pattern, VerifyHandler), (re.escape(envoy_prefix(auth_prefix)) + "/(.*)", EnvoyVerifyHandler)]
