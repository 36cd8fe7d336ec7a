"""The reverse proxy: everything not under ``auth_prefix`` goes upstream.

One job per module: :mod:`.policy` (pure functions: routes and paths,
headers both ways, credentials in the wrong place), :mod:`.upstream` (the
pooled upstream client behind an interface of our own), :mod:`.handler`
(HTTP, bodies streamed both ways) and :mod:`.websocket` (the WebSocket
relay).  :mod:`gateway.web` places their handlers last in the application.
"""
