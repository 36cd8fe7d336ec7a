"""Upstream routes: longest-prefix match over ``[[routes]]``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config import Section


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str
    auth: str
    strip_prefix: bool
    connect_timeout: float
    request_timeout: float
    preserve_host: bool = False

    @classmethod
    def from_section(cls, section: Section) -> "Route":
        return cls(**{k: section[k] for k in cls.__dataclass_fields__})

    def matches(self, path: str) -> bool:
        if self.prefix.endswith("/"):
            return path.startswith(self.prefix) or path == self.prefix[:-1]
        return path == self.prefix or path.startswith(self.prefix + "/")

    def upstream_url(self, path: str, query: str) -> str:
        if self.strip_prefix:
            path = path[len(self.prefix.rstrip("/")):]
            if not path.startswith("/"):
                path = "/" + path
        base = urlsplit(self.upstream)
        url = base.scheme + "://" + base.netloc + base.path.rstrip("/") + path
        return url + ("?" + query if query else "")

    @property
    def upstream_host(self) -> str:
        return urlsplit(self.upstream).netloc


class RouteTable:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(path):
                return route
        return None
