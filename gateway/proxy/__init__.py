"""The reverse proxy: everything not under ``auth_prefix`` goes upstream.

One job per module: :mod:`.policy` (pure functions: routes and paths,
headers both ways, credentials in the wrong place), :mod:`.upstream` (the
pooled upstream client behind an interface of our own), :mod:`.handler`
(HTTP, bodies streamed both ways) and :mod:`.websocket` (the WebSocket
relay).
"""

from __future__ import annotations

from typing import Any


def routes(gateway: Any) -> list[Any]:
    """The proxy's catch-all routes: WebSocket upgrades, then everything else."""
    import tornado.routing

    from gateway.proxy.handler import ProxyHandler
    from gateway.proxy.websocket import UpgradeMatcher, WebSocketProxyHandler

    return [tornado.routing.Rule(UpgradeMatcher(), WebSocketProxyHandler), (r".*", ProxyHandler)]
