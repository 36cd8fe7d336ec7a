"""The demo that ``gateway serve --demo`` (``make run``) serves beside the gateway.

- The echo upstream answers every request with what it received: the
  method, the path and every ``X-*`` header (the identity headers,
  ``X-Auth-Scopes``, a provider's own, ``X-Forwarded-*``,
  ``X-Request-Id``...), so a request through the gateway visibly carries
  them.  ``--demo`` serves it at ``--demo-upstream`` (default
  :data:`DEFAULT_UPSTREAM`), and the routes that point at the default
  address follow it there (:func:`follow_upstream`).
- A provider's sandbox is a fake of the remote API the provider calls, so
  that its login works locally without the real one.  It is the function
  ``demo_sandbox(table, environ)`` of the module ``gateway.testing.<the
  provider's name>``, given the raw ``[providers.<name>]`` table and the
  environment; it returns a :class:`Sandbox` (or ``None`` when the table
  does not point the provider at a local address).  ``--demo`` serves every
  sandbox there is for a configured provider (:func:`provider_sandboxes`),
  in a thread of its own with its own event loop (:class:`SandboxThread`),
  so the gateway's serving is left as it is.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
import socket
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import tornado.httpserver
import tornado.netutil
import tornado.web

from gateway.config import Config

log = logging.getLogger("gateway")

#: where ``--demo`` serves the echo upstream unless ``--demo-upstream`` says otherwise
DEFAULT_UPSTREAM = "127.0.0.1:9000"


class EchoHandler(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def _echo(self, *args: str) -> None:
        headers: dict[str, str] = {}
        for name, value in self.request.headers.get_all():
            if name.lower().startswith("x-"):
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({
            "upstream": "demo",
            "method": self.request.method,
            "path": self.request.path,
            "headers": dict(sorted(headers.items())),
            "message": f"hello, {self.request.headers.get('X-User-Id', 'anonymous')}",
        }, indent=2) + "\n")

    get = head = post = delete = patch = put = options = _echo


def make_demo_app() -> tornado.web.Application:
    return tornado.web.Application([(r".*", EchoHandler)])


def follow_upstream(config: Config, address: str) -> Config:
    """``config`` with every route whose upstream is the default demo
    address (``http://127.0.0.1:9000...``) pointed at ``address``
    (``HOST:PORT``) instead, its path kept."""
    if address == DEFAULT_UPSTREAM:
        return config
    host, _, port = address.rpartition(":")
    netloc = f"{host or '127.0.0.1'}:{port}"
    routes = []
    for route in config.routes:
        parts = urlsplit(route.upstream)
        if parts.scheme == "http" and parts.netloc == DEFAULT_UPSTREAM:
            route = replace(route, upstream=urlunsplit(parts._replace(netloc=netloc)))
        routes.append(route)
    return replace(config, routes=tuple(routes))


# ---------------------------------------------------------------------------
# Providers' sandboxes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """A fake of a provider's remote API: ``app`` to serve on ``host:port``."""

    host: str
    port: int
    app: tornado.web.Application
    #: one line for the log: where it is and how to use it
    about: str


#: ``demo_sandbox(table, environ)``
SandboxFactory = Callable[[Mapping[str, Any], Mapping[str, str]], Sandbox | None]


def provider_sandboxes(config: Config) -> list[Sandbox]:
    """The sandbox of each configured provider that has one (see the module
    docstring), in the order of the ``[providers.<name>]`` tables."""
    found: list[Sandbox] = []
    for name, table in config.providers.items():
        if not (name.isidentifier() and isinstance(table, dict)):
            continue
        module_name = f"gateway.testing.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        factory: SandboxFactory | None = getattr(importlib.import_module(module_name), "demo_sandbox", None)
        sandbox = factory(table, config.environ) if callable(factory) else None
        if sandbox is not None:
            found.append(sandbox)
    return found


class SandboxThread:
    """Serves sandboxes in a daemon thread with an event loop of its own.
    :meth:`start` binds every port first (an ``OSError`` says which is
    taken) and returns once they answer; :meth:`stop` ends the thread."""

    def __init__(self, sandboxes: Sequence[Sandbox]) -> None:
        self.sandboxes = list(sandboxes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.sandboxes:
            return
        bound: list[list[socket.socket]] = []
        try:
            for sandbox in self.sandboxes:
                try:
                    bound.append(tornado.netutil.bind_sockets(sandbox.port, sandbox.host))
                except OSError as exc:
                    raise OSError(exc.errno, f"{sandbox.host}:{sandbox.port}: {exc.strerror or exc}") from None
        except OSError:
            for socks in bound:
                for sock in socks:
                    sock.close()
            raise
        ready = threading.Event()

        async def serve() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            servers = []
            for sandbox, socks in zip(self.sandboxes, bound):
                server = tornado.httpserver.HTTPServer(sandbox.app)
                server.add_sockets(socks)
                servers.append(server)
            ready.set()
            await self._stop.wait()
            for server in servers:
                server.stop()

        self._thread = threading.Thread(target=lambda: asyncio.run(serve()), name="demo-sandboxes", daemon=True)
        self._thread.start()
        ready.wait(10)
        for sandbox in self.sandboxes:
            log.info("%s", sandbox.about)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
        self._loop = self._stop = self._thread = None
