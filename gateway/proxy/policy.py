"""Proxy policy: pure functions, no I/O.

Which route a path belongs to (refusing paths that some upstream could read
as another route's), which request headers go upstream and which response
headers come back, what identity and client facts the upstream is told, and
where a client may have put a gateway credential that must not travel on.

Identity travels upstream only in headers the gateway sets itself: every
incoming variant of those names (any case, ``_`` or ``-``) is dropped first,
and the gateway's own credential (its cookie, a Bearer session token, an API
key) is never passed on.
"""

from __future__ import annotations

import base64
import binascii
import random
import re
from typing import Iterable, Sequence
from urllib.parse import unquote, unquote_plus

from gateway.errors import invalid_request
from gateway.routing import Route, RouteTable, fold

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
#: Header names only the gateway may set (compared after lower-casing and ``_`` -> ``-``).
IDENTITY_HEADERS = ("X-User-Id", "X-Auth-Provider", "X-Session-Id", "X-Auth-Scopes")
#: The caller's accepted current consent documents (on routes with ``require_consent``).
CONSENT_HEADER = "X-Consent"
#: The signed identity (on routes with ``assertion``; :mod:`gateway.assertion`).
ASSERTION_HEADER = "X-Gateway-Assertion"
GATEWAY_OWNED = frozenset(h.lower() for h in IDENTITY_HEADERS) | {
    CONSENT_HEADER.lower(), ASSERTION_HEADER.lower(), "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
}
#: Believed by upstreams as facts about the client or the original request:
#: passed on only from a trusted proxy (any ``X-Forwarded-*`` name too).
CLIENT_FACTS = frozenset({
    "forwarded", "x-forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "x-cluster-client-ip",
    "cf-connecting-ip", "fastly-client-ip", "x-original-url", "x-original-uri", "x-rewrite-url",
    "x-original-host", "x-host", "x-scheme", "x-url-scheme", "front-end-https",
})
#: Never forwarded: the gateway sets Host itself and answers Expect itself.
DROPPED = frozenset({"host", "expect"})
#: WebSocket handshake headers, which the upstream client makes anew.
WEBSOCKET_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept",
    "sec-websocket-protocol",
})
#: ``.``/``..`` segments, also with ``;params`` (``..;/``, as servlet containers
#: read it) and with ``\`` as a separator (as some upstreams read it).
_DOT_SEGMENT = re.compile(r"(^|[/\\])\.\.?(;[^/\\]*)?([/\\]|$)")
#: Control characters, and a raw ``#`` (a client never sends a fragment; an
#: upstream would cut the path there).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f#]")


class Credentials:
    """How the gateway's credentials look: its session tokens' prefix and
    those its providers declare (``credential_prefixes``), and the headers
    providers read credentials from (``credential_header_names``)."""

    def __init__(self, prefixes: Sequence[str], headers: Iterable[str] = ()) -> None:
        self.prefixes = tuple(dict.fromkeys(prefixes))
        #: where a client may send a credential, for messages
        self.places = ", ".join(["Authorization: Bearer", *dict.fromkeys(headers)])
        #: canonical names of the headers providers read credentials from
        self.headers = frozenset(canonical(h) for h in headers)
        alternatives = "|".join(re.escape(p) for p in self.prefixes) or r"(?!)"
        #: a credential wherever it appears (at least 16 characters after its prefix)
        self.pattern = re.compile(rf"(?:{alternatives})[A-Za-z0-9_\-]{{16,}}")
        hints: set[str] = set()
        for p in self.prefixes:
            hints.update({p, p.replace("_", "%5f"), p.replace("_", "%5F")})
        self._hints = tuple(sorted(hints))

    def begins(self, value: str) -> bool:
        """Does ``value`` hold any credential prefix (a cheap first look)?"""
        return any(p in value for p in self.prefixes)

    def within(self, value: str) -> bool:
        """Does ``value``, as sent or form-decoded, hold a credential?"""
        if not any(h in value for h in self._hints):
            return False
        return bool(self.pattern.search(value) or self.pattern.search(unquote_plus(value)))


#: Only the gateway's own session tokens (no provider loaded).
SESSION_TOKENS = Credentials(("gws_",))


def canonical(name: str) -> str:
    """How Django, Flask or PHP see a header name: case and ``_``/``-`` folded."""
    return name.lower().replace("_", "-")


# -- routes and paths -------------------------------------------------------------


def path_readings(path: str) -> list[str]:
    """The ways an upstream may read ``path``: percent-decoded, with ``\\``
    as ``/``, repeated slashes collapsed and ``;params`` removed."""
    decoded = unquote(path)
    folded = re.sub(r"[/\\]+", "/", decoded)
    return [decoded, folded, re.sub(r"/+", "/", re.sub(r";[^/]*", "", folded))]


def route_for(table: RouteTable, path: str) -> Route | None:
    """The route for ``path``, refusing (400) paths an upstream could read
    as belonging to another route (which would bypass that route's auth)."""
    if _FORBIDDEN.search(path):
        raise invalid_request("the path must not contain control characters or a raw '#'")
    route = table.match(path)
    if path.isascii() and "%" not in path and "\\" not in path and "//" not in path and ";" not in path \
            and "/." not in path and table.match(path.lower(), fold_case=True) is route:
        return route  # the common case: no other reading to check
    if _FORBIDDEN.search(unquote(path).replace("#", "")) or "#" in unquote(path):
        raise invalid_request("the path must not contain control characters or a raw '#'")
    readings = path_readings(path)
    if _DOT_SEGMENT.search(readings[0]):
        raise invalid_request("the path must not contain . or .. segments")
    if any(table.match(r) is not route for r in readings) or \
            any(table.match(fold(r), fold_case=True) is not route for r in readings):
        raise invalid_request("the path is ambiguous: an upstream could read it as another route's path "
                              "(percent-encoded prefix, '\\', '//', ';' parameters, letter case or "
                              "compatibility characters)")
    return route


# -- credentials in the wrong place ---------------------------------------------------


def stray_credential(headers: Iterable[tuple[str, str]], query: str, cookie_name: str,
                     credentials: Credentials = SESSION_TOKENS) -> str | None:
    """Where, outside the places the gateway reads (``Authorization: Bearer``,
    the providers' credential headers and its own cookie), this request
    carries a credential of the gateway or of a provider; ``None`` when
    nowhere.  Such a request is refused rather
    than forwarded with the credential in it."""
    if query and credentials.within(query):
        return "the query string"
    for name, value in headers:
        key = canonical(name)
        if key == "authorization":
            parts = value.strip().split(None, 1)
            scheme = parts[0].lower() if parts else ""
            rest = parts[1] if len(parts) > 1 else ""
            if scheme == "bearer":
                continue
            if scheme == "basic":
                try:
                    decoded = base64.b64decode(rest.strip(), validate=False).decode("utf-8", "replace")
                except (binascii.Error, ValueError):
                    decoded = ""
                if credentials.within(decoded):
                    return "the Authorization header's Basic credentials"
            if credentials.within(value):
                return "the Authorization header"
            continue
        if key in credentials.headers:
            continue  # read (and judged) by the provider that declares it
        if key == "cookie":
            for part in value.split(";"):
                cname, _, cvalue = part.strip().partition("=")
                if cname.strip() != cookie_name and credentials.within(cvalue):
                    return f"the cookie {cname.strip()[:64]!r}"
            continue
        if credentials.within(value):
            return f"the {name[:64]} header"
    return None


# -- request headers -------------------------------------------------------------------


def connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Names a ``Connection`` header lists (hop-by-hop for this connection)."""
    out: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            out.update(canonical(t.strip()) for t in value.split(","))
    return out


def upstream_request_headers(
    incoming: Sequence[tuple[str, str]],
    *,
    strip: set[str] | frozenset[str],
    reserved: frozenset[str] = frozenset(),
    cookie_name: str,
    peer_trusted: bool,
    prior_forwarded_for: str,
    peer: str,
    scheme: str,
    host: str,
    request_id: str,
    upstream_host: str,
    identity: Sequence[tuple[str, str]] = (),
    websocket: bool = False,
    credentials: Credentials = SESSION_TOKENS,
) -> Headers:
    """The headers sent upstream: the client's, minus hop-by-hop ones, the
    gateway-owned names, client facts from untrusted peers, credentials
    (``strip``: canonical names), names providers reserve (``reserved``)
    and the gateway's cookie; then the
    ``X-Forwarded-*`` chain, ``X-Request-Id``, ``Host`` and the identity."""
    listed = connection_listed(incoming)
    out: Headers = []
    for name, value in incoming:
        key = canonical(name)
        if key in HOP_BY_HOP or key in GATEWAY_OWNED or key in DROPPED or key in strip or key in reserved \
                or key in listed:
            continue
        if websocket and key in WEBSOCKET_HANDSHAKE:
            continue
        if not peer_trusted and (key in CLIENT_FACTS or key.startswith("x-forwarded-")):
            continue
        if (key == "authorization" or key in credentials.headers) and credentials.begins(value):
            continue  # a credential of the gateway or of a provider
        if key == "cookie":
            value = without_cookie(value, cookie_name)
            if not value:
                continue
        out.append((name, value))
    out.append(("X-Forwarded-For", f"{prior_forwarded_for}, {peer}" if prior_forwarded_for.strip() else peer))
    out.append(("X-Forwarded-Proto", scheme))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Request-Id", request_id))
    out.append(("Host", upstream_host))
    out.extend(identity)
    return out


def identity_headers(user_id: str, provider: str, session_id: str | None, scopes: Sequence[str] | None) -> Headers:
    out = [("X-User-Id", user_id), ("X-Auth-Provider", provider)]
    if session_id is not None:
        out.append(("X-Session-Id", session_id))
    if scopes is not None:
        out.append(("X-Auth-Scopes", " ".join(scopes)))
    return out


def without_cookie(header: str, name: str) -> str:
    """The Cookie header minus the gateway's own cookie."""
    parts = [p.strip() for p in header.split(";")]
    return "; ".join(p for p in parts if p and p.split("=", 1)[0].strip() != name)


# -- response headers ------------------------------------------------------------------


def upstream_response_headers(status: int, headers: Sequence[tuple[str, str]], cookie_name: str) -> Headers:
    """The upstream's response headers the client receives: without
    hop-by-hop ones (and those its ``Connection`` lists), its
    ``X-Request-Id`` (the gateway's own is sent), a ``Content-Length`` that
    cannot be believed (beside ``Transfer-Encoding``, on a 204), and any
    ``Set-Cookie`` for the gateway's cookie."""
    listed = connection_listed(headers)
    chunked = any(n.lower() == "transfer-encoding" for n, _ in headers)
    out: Headers = []
    for name, value in headers:
        key = canonical(name)
        if key in HOP_BY_HOP or key in listed or key == "x-request-id":
            continue
        if key == "content-length" and (status == 204 or chunked or status < 200):
            continue
        if key == "set-cookie" and sets_gateway_cookie(value, cookie_name):
            continue
        out.append((name, value))
    return out


def sets_gateway_cookie(set_cookie: str, name: str) -> bool:
    """Would a browser read this Set-Cookie as (or as smuggling) the
    gateway's cookie?  Only the gateway sets it: no session fixation by an
    upstream.  A nameless cookie (``=gw_session=...`` or no ``=`` at all) is
    sent back as its bare value, so it counts too."""
    pair = set_cookie.split(";", 1)[0]
    cookie, sep, _ = pair.partition("=")
    return not sep or not cookie.strip() or cookie.strip() == name


def does_own_cors(headers: Sequence[tuple[str, str]]) -> bool:
    return any(n.lower() == "access-control-allow-origin" for n, _ in headers)


def is_websocket_upgrade(headers: Iterable[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name.lower() == "upgrade" and value.strip().lower() == "websocket":
            return True
    return False


# -- W3C trace context -------------------------------------------------------------------

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a W3C ``traceparent`` of version 00 with non-zero
    ids (the only version this gateway understands), else ``None``."""
    if value is None:
        return None
    value = value.strip().lower()
    m = _TRACEPARENT.match(value)
    if m is None or set(m.group(1)) == {"0"} or set(m.group(2)) == {"0"}:
        return None
    return value


def new_id(bits: int) -> str:
    """A random non-zero id of ``bits`` bits in lower-case hex, for request
    and trace ids: unique, not secret (no system call per request; the
    generator is reseeded in every forked worker)."""
    return f"{random.getrandbits(bits) or 1:0{bits // 4}x}"


def new_traceparent() -> str:
    """A ``traceparent`` starting a new, sampled trace."""
    return f"00-{new_id(128)}-{new_id(64)}-01"


def with_trace_context(headers: Headers, incoming: str | None) -> tuple[Headers, str]:
    """``headers`` with a valid ``traceparent`` (the client's, or a new one
    when it sent none or a malformed one, whose ``tracestate`` then goes
    too, as the W3C recommendation says) and the trace id."""
    kept = valid_traceparent(incoming)
    if kept is None:
        headers = [(n, v) for n, v in headers if canonical(n) not in ("traceparent", "tracestate")]
        kept = new_traceparent()
        headers.append(("traceparent", kept))
    return headers, kept.split("-")[1]

