"""Upstream routes: longest-prefix match over ``[[routes]]``."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote, urlsplit

from gateway.config import RouteConfig

_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str
    auth: str
    strip_prefix: bool
    connect_timeout: float
    request_timeout: float
    preserve_host: bool = False
    scopes: tuple[str, ...] = ()
    allow_sessions: bool = True
    #: consent documents a caller must have accepted (their current versions)
    require_consent: tuple[str, ...] = ()
    read_timeout: float = 60.0
    #: bytes; 0 = no limit
    max_body_size: int = 10 << 20
    websocket: bool = False
    websocket_max_message_size: int = 1 << 20
    websocket_ping_interval: float = 30.0
    #: send a signed ``X-Gateway-Assertion`` (:mod:`gateway.assertion`)
    assertion: bool = False
    #: the assertion's ``aud`` (the prefix unless configured)
    audience: str = ""

    @classmethod
    def from_config(cls, config: RouteConfig) -> Route:
        """The route a validated ``[[routes]]`` table declares."""
        return cls(
            prefix=config.prefix,
            upstream=config.upstream,
            auth=config.auth,
            strip_prefix=config.strip_prefix,
            connect_timeout=config.connect_timeout,
            request_timeout=config.request_timeout,
            preserve_host=config.preserve_host,
            scopes=tuple(config.scopes),
            allow_sessions=config.allow_sessions,
            require_consent=tuple(config.require_consent),
            read_timeout=config.read_timeout,
            max_body_size=cls.max_body_size if config.max_body_size is None else config.max_body_size,
            websocket=config.websocket,
            websocket_max_message_size=config.websocket_max_message_size,
            websocket_ping_interval=config.websocket_ping_interval,
            assertion=config.assertion,
            audience=config.audience or config.prefix,
        )


    def matches(self, path: str, fold_case: bool = False) -> bool:
        """Does ``path`` lie under this route (``fold_case``: ``path`` is
        already folded, compare with the folded prefix)?"""
        prefix = self.folded_prefix if fold_case else self.prefix
        if prefix.endswith("/"):
            return path.startswith(prefix) or path == prefix[:-1]
        return path == prefix or path.startswith(prefix + "/")

    def upstream_url(self, path: str, query: str) -> str:
        """The upstream URL for a request's path and query, as the client sent
        them, with anything not allowed raw in a URL percent-encoded (Tornado
        hands the request line over decoded as Latin-1; the bytes are UTF-8)."""
        path = quote(path.encode("latin-1", "replace"), safe=_PATH_SAFE)
        query = quote(query.encode("latin-1", "replace"), safe=_QUERY_SAFE)
        if self.strip_prefix:
            path = path[len(self.prefix.rstrip("/")):]
            if not path.startswith("/"):
                path = "/" + path
        base = urlsplit(self.upstream)
        url = base.scheme + "://" + base.netloc + base.path.rstrip("/") + path
        return url + ("?" + query if query else "")

    @cached_property
    def folded_prefix(self) -> str:
        return fold(self.prefix)

    @property
    def upstream_host(self) -> str:
        return urlsplit(self.upstream).netloc


class RouteTable:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._folded = sorted(routes, key=lambda r: len(r.folded_prefix), reverse=True)

    def match(self, path: str, fold_case: bool = False) -> Route | None:
        """The longest-prefix route for ``path`` (``fold_case``: ``path`` as
        a case-insensitive upstream would read it, see :func:`fold`)."""
        for route in (self._folded if fold_case else self.routes):
            if route.matches(path, fold_case):
                return route
        return None


def fold(text: str) -> str:
    """Text as the least strict upstream could read its letters: NFKC
    compatibility forms (fullwidth letters) and Unicode case folding (``ſ``
    is ``s``)."""
    return unicodedata.normalize("NFKC", text).casefold()
