"""Serving ``gateway serve``: listening sockets, worker processes, the event
loop, signals, a graceful stop and a reload.

A supervisor (the process ``gateway serve`` starts) forks the workers, one
as well as several, and replaces them.  It owns the listening sockets: one
``SO_REUSEPORT`` socket per worker *slot* (per address), bound and listening
before the first fork, so the kernel spreads new connections evenly over
the slots.  The worker of a slot accepts from that slot's socket, which it
inherits; the supervisor keeps its own copy and never accepts from it.  No
listening socket is ever closed while the gateway serves: a worker that is
replaced (it crashed, or a reload retires it) only stops accepting, and the
connections waiting in the slot's accept queue are the next worker's
(closing a ``SO_REUSEPORT`` listener would reset them).

On SIGHUP the supervisor reads the configuration again (:class:`_Supervisor`
``reload``): a configuration with problems is refused as a whole, each
problem logged, and the workers serve on; a valid one replaces the workers
one slot at a time, each new worker listening before the old one of its
slot stops accepting.  A retired worker (SIGUSR2 from the supervisor) closes
its idle connections, answers the requests in flight (``Connection: close``)
and lets open WebSockets end on their own, for up to
``server.shutdown_timeout``.  What a running gateway cannot change (the
listening address, fewer workers, the admin listener's address) is logged
as needing a restart; the rest applies.

Connections are accepted by :class:`Acceptor`, which backs off (stops
watching the listening socket for a moment) when the process is out of file
descriptors instead of spinning, and handed to :class:`GatewayHTTPServer`,
which knows which connections have a request in progress so that a stop can
close the idle ones at once and let the others finish their response.

Every client (upstream HTTP, Redis, MongoDB) is created by
:meth:`gateway.app.Gateway.start`, which runs in the worker, after the fork.

The admin listener (:mod:`gateway.admin`: ``/healthz``, ``/readyz``,
``/metrics``) is served by the worker of a one-worker gateway (its socket
held by the supervisor and inherited by each worker in turn), or by the
supervisor of several workers (:class:`SupervisorAdmin`), which runs an
event loop of its own.  It forks only between two turns of that loop, with
nothing of its own left to cross the fork (see :class:`_Supervisor`), and
it makes the workers' metrics directory before the first fork.  On
SIGTERM readiness turns 503 before anything stops accepting, and
``admin.drain_delay`` later the drain begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Coroutine, Sequence

import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from gateway.admin import (
    MULTIPROC_ENV,
    PROBE_PROFILE_USER,
    PROBE_SESSION_ID,
    MetricsDir,
    Readiness,
    StoreClients,
    local_metrics,
    make_admin_app,
)
from gateway import audit
from gateway.assertion import KeySet
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.operator import Operator
from gateway.options import ConfigError

log = logging.getLogger("gateway.server")

#: Connections taken from the kernel per readiness event before other work runs.
ACCEPT_BATCH = 128
#: Listen backlog (the kernel caps it at net.core.somaxconn).
BACKLOG = 1024
#: Out of file descriptors: stop accepting for this long, doubling up to the maximum.
PAUSE_MIN, PAUSE_MAX = 0.1, 1.0
#: At most one report of accept failures per this many seconds.
REPORT_INTERVAL = 1.0
#: After the drain, how long closed connections get to wind down.
CLOSE_GRACE = 1.0
#: While draining, how long a connection accepted just before gets to send its first request.
FIRST_REQUEST_GRACE = 2.0
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


# -- start-up checks -------------------------------------------------------------


def event_loop_problems(config: Config) -> list[str]:
    """Configuration problems of ``server.event_loop`` (uvloop not installed)."""
    if config.server.event_loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            return [f"server.event_loop: \"uvloop\" needs the uvloop package, which cannot be imported ({exc}); "
                    f"install it (pip install uvloop) or use \"asyncio\""]
    return []


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log the result and
    return the limit now in force (inherited by the workers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux caps it at fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("open file limit: %d; it could not be raised to %d: %s", soft, target, exc)
            return soft
        log.info("open file limit raised from %d to %d (the hard limit)", soft, target)
        return target
    log.info("open file limit: %d (the hard limit)", soft)
    return soft


# -- sockets ------------------------------------------------------------------------


def bind(host: str, port: int, *, reuse_port: bool, listen: bool) -> list[socket.socket]:
    """Non-blocking TCP sockets bound to every address ``host`` resolves to
    (IPv4 and IPv6 alike), all on one port (port 0: the first one the kernel
    picks); listening when ``listen``."""
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos:
            if address in seen or (family == socket.AF_INET6 and not socket.has_ipv6):
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.setblocking(False)
            sock.bind(address)
            if listen:
                sock.listen(BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def open_slots(host: str, port: int, count: int) -> list[list[socket.socket]]:
    """``count`` listening ``SO_REUSEPORT`` sockets per address, one for each
    worker slot, all on one port (port 0: the one the kernel picks for the
    first).  The port is first bound without ``SO_REUSEPORT``, so a port
    already in use (by another gateway with ``SO_REUSEPORT`` sockets too) is
    an error rather than shared."""
    probes = bind(host, port, reuse_port=False, listen=False)
    port = probes[0].getsockname()[1]
    for sock in probes:
        sock.close()
    slots: list[list[socket.socket]] = []
    try:
        for _ in range(count):
            slots.append(bind(host, port, reuse_port=True, listen=True))
    except BaseException:
        for sockets in slots:
            for sock in sockets:
                sock.close()
        raise
    return slots


class Acceptor:
    """Accepts the connections of one listening socket on the IOLoop and
    hands each to ``server.handle_stream``.  Out of file descriptors
    (EMFILE/ENFILE), it stops watching the socket for a while (0.1 s,
    doubling up to 1 s while it lasts), reports it at most once a second and
    accepts again by itself; the connections meanwhile wait in the backlog."""

    def __init__(self, sock: socket.socket, server: HTTPServer) -> None:
        self.sock = sock
        self.server = server
        self.fd = sock.fileno()
        self.io_loop = IOLoop.current()
        self.watching = False
        self.closed = False
        self.pause = PAUSE_MIN
        self.resume_timer: object | None = None
        self.failures = 0  # since the last report
        self.last_report = -REPORT_INTERVAL
        self.paused_since: float | None = None

    def start(self) -> None:
        if not self.closed and not self.watching:
            self.io_loop.add_handler(self.fd, self.ready, IOLoop.READ)
            self.watching = True

    def sweep(self) -> int:
        """Accept every connection waiting in the backlog now (at most
        :data:`BACKLOG`), so that closing the socket resets none a client
        sent before the stop; how many were taken."""
        taken = 0
        while not self.closed and taken < BACKLOG:
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                break
            taken += 1
            self.serve(conn, address)
        return taken

    def serve(self, conn: socket.socket, address: Any) -> None:
        """Hand an accepted connection to the HTTP server."""
        try:
            stream = IOStream(conn, max_buffer_size=self.server.max_buffer_size,
                              read_chunk_size=self.server.read_chunk_size)
            self.server.handle_stream(stream, address)
        except Exception:
            log.exception("a new connection could not be served")
            conn.close()

    def close(self) -> None:
        """Stop accepting and close this process's descriptor of the socket
        (the socket itself closes, and its backlog is reset, with the last
        descriptor: the supervisor holds one while the gateway serves)."""
        if self.closed:
            return
        self.closed = True
        if self.resume_timer is not None:
            self.io_loop.remove_timeout(self.resume_timer)
            self.resume_timer = None
        if self.watching:
            self.io_loop.remove_handler(self.fd)
            self.watching = False
        self.sock.close()

    def ready(self, fd: int, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.closed:
                return
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while it waited
                self.back_off(exc)
                return
            self.accepted()
            self.serve(conn, address)

    def report(self, level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last_report >= REPORT_INTERVAL:
            self.last_report = now
            log.log(level, message, *args)
            self.failures = 0

    def back_off(self, exc: OSError) -> None:
        delay = self.pause
        self.pause = min(self.pause * 2, PAUSE_MAX)
        self.failures += 1
        if self.paused_since is None:
            self.paused_since = time.monotonic()
        if self.watching:
            self.io_loop.remove_handler(self.fd)
            self.watching = False
        if exc.errno in _OUT_OF_DESCRIPTORS:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.report(logging.WARNING, "cannot accept connections: out of file descriptors (%s; open file "
                        "limit %d); pausing accept for %.1fs (%d failure(s) since the last report)",
                        exc.strerror, soft, delay, self.failures)
        else:
            self.report(logging.ERROR, "cannot accept connections: %s; pausing accept for %.1fs "
                        "(%d failure(s) since the last report)", exc, delay, self.failures)
        self.resume_timer = self.io_loop.call_later(delay, self.resume)

    def resume(self) -> None:
        self.resume_timer = None
        self.start()

    def accepted(self) -> None:
        if self.paused_since is not None:
            self.report(logging.INFO, "accepting connections again after %.1fs",
                        time.monotonic() - self.paused_since)
            self.paused_since = None
            self.pause = PAUSE_MIN


# -- connections -----------------------------------------------------------------


class _Tracked(httputil.HTTPMessageDelegate):
    """The application's delegate for one request, marking its connection
    busy from the moment the request head has arrived."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, server: "GatewayHTTPServer",
                 conn: HTTP1ServerConnection) -> None:
        self.delegate = delegate
        self.server = server
        self.conn = conn
        self.refused = False

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        if self.conn.stream.closed():  # read from the buffer of a closed connection: no answer could go out
            self.refused = True
            return None
        if self.conn in self.server.connections:
            self.server.connections[self.conn] = True
        self.server.fresh.pop(self.conn, None)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.delegate.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.delegate.on_connection_close()


class _Refused(httputil.HTTPMessageDelegate):
    """For a request read from a connection closed by the drain (bytes the
    client sent before it saw the close may still be buffered): ignored,
    never handled, since its answer could not be sent."""

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> None:
        return None

    def data_received(self, chunk: bytes) -> None:
        return None

    def finish(self) -> None:
        return None

    def on_connection_close(self) -> None:
        return None


def _has_input(stream: IOStream) -> bool:
    """Whether bytes wait unread on the connection (a request the client
    sent on a keep-alive connection just before the drain)."""
    try:
        return bool(stream.socket.recv(1, socket.MSG_PEEK))
    except OSError:  # nothing yet (EAGAIN), or the connection is gone
        return False


class GatewayHTTPServer(HTTPServer):
    """An HTTPServer that knows, for every connection, whether a request is
    in progress on it: from its request head until its response has been
    written (the connection's next request starts) or the client is gone.

    Once :meth:`drain` has been called, idle connections are closed, and so
    is every other one as soon as its response is out.  A connection that
    has not sent its first request yet (just accepted) is not idle: it gets
    :data:`FIRST_REQUEST_GRACE` for it, then its answer with
    ``Connection: close``.  Connections taken over by their handler (a
    WebSocket's) are counted by :meth:`open_sockets` until they close."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        #: open connection -> whether a request is in progress on it
        self.connections: dict[HTTP1ServerConnection, bool] = {}
        #: connections whose first request has not begun -> when they were accepted
        self.fresh: dict[HTTP1ServerConnection, float] = {}
        #: streams taken over by their handler (WebSockets), open or not yet pruned
        self.detached: set[IOStream] = set()
        self.draining = False

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if self.draining:
            stream.close()
            return
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        conn = server_conn if isinstance(server_conn, HTTP1ServerConnection) else None
        # The previous response is out: no further request here.  (A new
        # connection accepted just before the drain, whose serving begins
        # now, gets its first request answered.)
        if conn is not None and self.draining and conn in self.connections:
            conn.stream.close()
            return _Refused()
        delegate = super().start_request(server_conn, request_conn)
        if conn is None:
            return delegate
        if conn not in self.connections:
            self.fresh[conn] = time.monotonic()
        self.connections[conn] = False
        return _Tracked(delegate, self, conn)

    def on_close(self, server_conn: object) -> None:
        if isinstance(server_conn, HTTP1ServerConnection):  # the only kind start_request tracks
            self.connections.pop(server_conn, None)
            self.fresh.pop(server_conn, None)
            if not server_conn.stream.closed():  # its handler took the stream over: a WebSocket
                self.detached.add(server_conn.stream)
        super().on_close(server_conn)

    def open_sockets(self) -> int:
        """Connections taken over by their handler (WebSockets) still open."""
        self.detached = {stream for stream in self.detached if not stream.closed()}
        return len(self.detached)

    def close_sockets(self) -> None:
        for stream in list(self.detached):
            stream.close()
        self.detached.clear()

    def awaiting_first_request(self) -> int:
        """Connections accepted within :data:`FIRST_REQUEST_GRACE` whose
        first request has not begun; older ones are closed."""
        now = time.monotonic()
        for conn, since in list(self.fresh.items()):
            if conn.stream.closed() or now - since > FIRST_REQUEST_GRACE:
                self.fresh.pop(conn, None)
                if self.draining:
                    conn.stream.close()
        return len(self.fresh)

    def requests_in_progress(self) -> int:
        """Connections with a request in progress whose client is still there."""
        return sum(1 for conn, busy in self.connections.items() if busy and not conn.stream.closed())

    def drain(self) -> int:
        """Close every idle connection now and every other one once its
        response is written; returns how many idle ones were closed."""
        self.draining = True
        idle = []
        for conn, busy in self.connections.items():
            if busy or conn in self.fresh:
                continue
            if _has_input(conn.stream):  # a request already sent, not yet read: it is answered
                self.fresh[conn] = time.monotonic()
            else:
                idle.append(conn)
        for conn in idle:
            # Its next request is then read from a closed stream: it gets
            # the _Refused delegate below and is never handled.
            conn.stream.close()
        return len(idle)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.stream.close()


# -- the admin listener --------------------------------------------------------------------

#: an admin client's connection idle this long is closed
ADMIN_IDLE_TIMEOUT = 30.0


def bind_admin(config: Config) -> list[socket.socket]:
    """The admin listener's listening sockets (``[admin]`` host and port),
    or none: port 0 turns it off, and a port that cannot be had is logged
    and leaves the gateway serving without it (a load balancer that cannot
    reach ``/readyz`` sends it nothing)."""
    admin = config.admin
    if not admin.port:
        return []
    try:
        return bind(admin.host, admin.port, reuse_port=False, listen=True)
    except OSError as exc:
        log.error("cannot listen on %s port %d for the admin listener: %s; serving without /healthz, "
                  "/readyz and /metrics", admin.host or "*", admin.port, exc.strerror or exc)
        return []


class AdminServer:
    """The admin application (:func:`gateway.admin.make_admin_app`) on its
    listening sockets and the current event loop, accepted and tracked like
    the gateway's own connections."""

    def __init__(self, sockets: list[socket.socket], app: tornado.web.Application) -> None:
        self.server = GatewayHTTPServer(app, idle_connection_timeout=ADMIN_IDLE_TIMEOUT)
        self.acceptors = [Acceptor(sock, self.server) for sock in sockets]
        for acceptor in self.acceptors:
            acceptor.start()
        where = sockets[0].getsockname()
        log.info("admin listener on http://%s:%d (/healthz, /readyz, /metrics)", where[0], where[1])

    def close(self) -> None:
        """Stop listening and close every connection."""
        for acceptor in self.acceptors:
            acceptor.close()
        self.server.close_connections()

    def forget(self) -> None:
        """In a worker just forked from the process serving it: close the
        inherited sockets (the listener's and its clients'), which would
        otherwise hold the port and those connections open as long as the
        worker lives.  Only the descriptors: the event loop they belong to
        is the parent's."""
        for acceptor in self.acceptors:
            acceptor.sock.close()
        for conn in list(self.server.connections):
            conn.stream.socket.close()


class SupervisorAdmin:
    """The admin listener served by the supervisor of several workers.

    Readiness is checked with the supervisor's own store clients
    (:class:`gateway.admin.StoreClients`) and needs a worker that listens;
    metrics are the workers' own, summed from their multiprocess directory.
    Everything it holds is released around a fork: its probes finish and
    its store clients close before one (:meth:`before_fork`), and the child
    closes the inherited sockets (:meth:`in_child`)."""

    def __init__(self, config: Config, sockets: list[socket.socket], metrics: MetricsDir) -> None:
        self.sockets = sockets
        self.metrics = metrics
        self.retired: list[StoreClients] = []
        self._configure(config)
        self.listening: Callable[[], int] = lambda: 0
        self.server: AdminServer | None = None

    def _configure(self, config: Config) -> None:
        self.config = config
        self.drain_delay = config.admin.drain_delay
        self.clients = StoreClients(config)
        self.token = config.admin.token
        self.jwks = KeySet.from_config(config.assertion)
        self.readiness = Readiness(self.clients.probes(), others=self._workers)

    def _workers(self) -> list[str]:
        return [] if self.listening() else ["workers"]

    def _app(self) -> tornado.web.Application:
        return make_admin_app(self.readiness, self.metrics.collect, operator=Operator(self.clients.using),
                              token=self.token, jwks=self.jwks)

    def start(self, listening: Callable[[], int]) -> None:
        """Serve, on the running event loop; ``listening()``: how many workers listen."""
        self.listening = listening
        self.server = AdminServer(self.sockets, self._app())

    async def reconfigure(self, config: Config) -> None:
        """A reload: the token, keys and drain delay of ``config`` from the
        next request on, and new store clients when the stores changed (the
        listener and its readiness state stay).  :meth:`after_fork` follows."""
        await self.before_fork()  # no probe or call in flight; the clients closed
        old = self.config
        self.config = config
        self.drain_delay = config.admin.drain_delay
        self.token = config.admin.token
        self.jwks = KeySet.from_config(config.assertion)
        if (config.sessions, config.profiles, config.plugins, config.providers) != \
                (old.sessions, old.profiles, old.plugins, old.providers):
            previous, self.clients = self.clients, StoreClients(config)
            try:
                self.clients.gateway()  # built now rather than within a probe's time
            except Exception as exc:  # a probe reports it
                log.warning("admin listener: the stores of the new configuration: %r", exc)
            self.readiness.probes = self.clients.probes()
            # An operator call of the old application waiting at the gate goes
            # on (rare); whatever it opens is closed again before the next fork.
            previous.release()
            self.retired.append(previous)
        if self.server is not None:
            self.server.server.request_callback = self._app()

    async def before_fork(self) -> None:
        """No probe in flight or to come, no store client open (until :meth:`after_fork`)."""
        self.readiness.hold()
        self.clients.hold()  # nor an operator call
        await self.readiness.idle()
        await self.clients.idle()
        await self.clients.close()
        for clients in self.retired:
            await clients.close()

    def after_fork(self) -> None:
        self.readiness.release()
        self.clients.release()

    def in_child(self) -> None:
        if self.server is not None:
            self.server.forget()
        for sock in self.sockets:
            sock.close()

    def worker_exited(self, pid: int) -> None:
        self.metrics.worker_exited(pid)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.clients.close()
        for clients in self.retired:
            await clients.close()
        self.metrics.remove()


# -- worker processes ------------------------------------------------------------------

#: signals blocked around a fork, until the child has handlers of its own
_FORK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGHUP, signal.SIGUSR2}
#: the supervisor tells a worker to retire (a reload replaced it) with this signal
RETIRE_SIGNAL = signal.SIGUSR2
#: before a fork, how long threads the supervisor started may take to end
_THREADS_GRACE = 2.0
#: a reload's new worker must listen within this long, or the reload stops there
READY_TIMEOUT = 60.0
#: how long "reloaded" waits for the replaced workers to stop accepting
QUIET_TIMEOUT = 5.0

#: reads the configuration again for a reload: ``(config, problems)``
Reader = Callable[[], "tuple[Config | None, list[str]]"]


def _ignore(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    return None


class WorkerStart:
    """What a new worker is given: its configuration, its slot's listening
    sockets, the admin listener's sockets (a one-worker gateway's worker
    serves it) and how it tells the supervisor that it listens."""

    def __init__(self, config: Config, sockets: list[socket.socket], admin_sockets: list[socket.socket],
                 notify: "Notifier") -> None:
        self.config, self.sockets, self.admin_sockets, self.notify = config, sockets, admin_sockets, notify


def restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with what a running gateway cannot change set back to
    ``old``'s, and a note for each such change."""
    notes: list[str] = []
    server = new.server
    if (server.host, server.port) != (old.server.host, old.server.port):
        notes.append(f"server.host/server.port: {server.host}:{server.port} (now {old.server.host}:"
                     f"{old.server.port}; a listening address cannot move)")
    workers = server.workers
    if workers < old.server.workers:
        notes.append(f"server.workers: {workers} (now {old.server.workers}; closing a worker's listening socket "
                     f"would reset the connections waiting in it)")
        workers = old.server.workers
    elif (workers == 1) != (old.server.workers == 1):
        notes.append(f"server.workers: {workers} (now {old.server.workers}; the admin listener is the worker's "
                     f"with one worker, the supervisor's with more)")
        workers = old.server.workers
    admin = new.admin
    if (admin.host, admin.port) != (old.admin.host, old.admin.port):
        notes.append(f"admin.host/admin.port: {admin.host}:{admin.port} (now {old.admin.host}:{old.admin.port})")
        admin = dataclasses.replace(admin, host=old.admin.host, port=old.admin.port)
    kept = dataclasses.replace(new, server=dataclasses.replace(server, host=old.server.host, port=old.server.port,
                                                               workers=workers), admin=admin)
    return kept, notes


class _Supervisor:
    """:func:`supervise`'s state.  Its event loop runs the admin listener,
    the signal handlers, the timers and the reloads; a worker is forked
    only between two runs of that loop, once nothing of the supervisor's own
    (a probe in flight, a store client, an executor thread) is left to cross
    the fork.  The loop's selector is ``poll``, which keeps its state in the
    process: an epoll set would be shared with every child, and the child
    closing its copy of the loop would unregister the parent's descriptors.

    Worker slot ``i`` accepts from ``slots[i]`` (see the module's
    docstring); ``slot_of`` says which worker holds which slot, and a slot
    briefly has two during a reload (the new one listening, the old one
    retiring)."""

    def __init__(self, config: Config, slots: list[list[socket.socket]], burst: int, window: float,
                 admin: SupervisorAdmin | None, admin_sockets: list[socket.socket], reader: Reader | None,
                 reconfigure: Callable[[Config], None] | None) -> None:
        self.config = config
        self.slots = slots
        self.burst, self.window = burst, window
        self.admin = admin
        #: the admin listener's sockets, for the worker of a one-worker gateway
        self.admin_sockets = admin_sockets
        self.reader, self.reconfigure = reader, reconfigure
        self.loop = asyncio.SelectorEventLoop(selectors.PollSelector())
        self.executor = ThreadPoolExecutor(thread_name_prefix="gateway-supervisor")
        self.loop.set_default_executor(self.executor)
        self.io_loop: IOLoop | None = None
        #: worker pid -> the read end of its pipe (-1 once it ended)
        self.children: dict[int, int] = {}
        self.slot_of: dict[int, int] = {}
        #: workers that said they listen (and are not retiring)
        self.listening: set[int] = set()
        #: workers told to retire -> the timer that kills them if they do not exit
        self.retiring: dict[int, asyncio.TimerHandle] = {}
        #: slots whose worker is to be forked, with the configuration to give it
        self.due: list[tuple[int, Config]] = [(slot, config) for slot in range(len(slots))]
        #: a reload waiting for a worker: pid -> set once it listens or exits
        self.waiting: dict[int, asyncio.Future[bool]] = {}
        #: retiring workers: pid -> set once they accept no more (or exited)
        self.quiet: dict[int, asyncio.Future[None]] = {}
        #: a reload's fork, by slot: set to the new worker's pid
        self.forked: dict[int, asyncio.Future[int]] = {}
        self.stopping = False
        self.failed = False
        #: a worker has listened: until then, one that exits is a start-up failure, not restarted
        self.started = False
        self.restarts: list[float] = []
        self.wake = asyncio.Event()
        self.kill_timer: asyncio.TimerHandle | None = None
        self.drain_timer: asyncio.TimerHandle | None = None
        self.reloading: asyncio.Task[None] | None = None
        self.reload_again = False
        self.threads = threading.active_count()

    @property
    def stop_timeout(self) -> float:
        """How long a stopping or retiring worker may take before it is killed."""
        delay = self.config.admin.drain_delay if self.admin is None and self.admin_sockets else 0.0
        return self.config.server.shutdown_timeout + delay + 5

    # -- the parent's loop ----------------------------------------------------------------------

    def run(self) -> WorkerStart | None:
        """Supervise until every worker is gone (then exit the process), or
        return in a new worker what it serves with."""
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("supervisor pid %d: SIGHUP reloads the configuration, SIGUSR1 reopens the logs, "
                 "SIGTERM stops (the pids below are its workers')", os.getpid())
        loop.run_until_complete(self._start())
        while True:
            loop.run_until_complete(self._next())
            if self.stopping and not self.children:
                break
            loop.run_until_complete(self._quiesce())
            while self.due and not self.stopping:
                slot, config = self.due.pop(0)
                start = self.spawn(slot, config)
                if start is not None:
                    return start
            if self.admin is not None:
                self.admin.after_fork()
        for timer in (self.kill_timer, self.drain_timer, *self.retiring.values()):
            if timer is not None:
                timer.cancel()
        if self.reloading is not None:
            self.reloading.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(self.reloading)
        if self.admin is not None:
            loop.run_until_complete(self.admin.close())
        self.close_slots()
        if self.io_loop is not None:
            self.io_loop.close()
        else:
            loop.close()
        self.executor.shutdown(wait=False)
        sys.exit(1 if self.failed else 0)

    async def _start(self) -> None:
        self.io_loop = IOLoop.current()
        if self.admin is not None:
            self.admin.start(lambda: len(self.listening))

    async def _next(self) -> None:
        """Until a worker is due, or the stop is complete."""
        while not (self.due and not self.stopping) and not (self.stopping and not self.children):
            self.wake.clear()
            await self.wake.wait()

    async def _quiesce(self) -> None:
        """Nothing of the supervisor's own may cross a fork: probes finish
        (and none starts until the forks are done), store clients close,
        executor threads end."""
        if self.admin is not None:
            await self.admin.before_fork()
        old, self.executor = self.executor, ThreadPoolExecutor(thread_name_prefix="gateway-supervisor")
        self.loop.set_default_executor(self.executor)
        old.shutdown(wait=True)
        deadline = time.monotonic() + _THREADS_GRACE
        while threading.active_count() > self.threads and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if threading.active_count() > self.threads:
            log.warning("forking a worker while %d thread(s) of the supervisor still run",
                        threading.active_count() - self.threads)

    def close_slots(self) -> None:
        """The supervisor's copies of the listening sockets (a socket closes
        with the last worker's copy)."""
        for sockets in self.slots:
            for sock in sockets:
                sock.close()
        for sock in self.admin_sockets:
            sock.close()

    def stop(self) -> None:
        """SIGTERM/SIGINT: ``/readyz`` turns 503 now; the workers get
        SIGTERM after ``admin.drain_delay`` (at once on a second signal)."""
        if self.stopping:
            self.signal_workers()
            return
        self.stopping = True
        self.due.clear()
        for waiting in self.waiting.values():
            if not waiting.done():
                waiting.set_result(False)
        delay = 0.0
        if self.admin is not None:
            self.admin.readiness.stopping = True
            delay = 0.0 if self.failed else self.admin.drain_delay
        if delay > 0 and self.children:
            log.info("stopping: /readyz answers 503; the workers stop in %.1fs (admin.drain_delay)", delay)
            self.drain_timer = self.loop.call_later(delay, self.signal_workers)
        else:
            self.signal_workers()
        self.wake.set()

    def signal_workers(self) -> None:
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        if self.kill_timer is None:
            self.kill_timer = self.loop.call_later(max(self.stop_timeout, 0.1), self.kill)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # The workers stop accepting now; once the last copy of a listening
        # socket is closed, new connections are refused.
        self.close_slots()

    def reopen_logs(self) -> None:
        """SIGUSR1 (a log rotation): reopen the audit file here and in
        every worker."""
        audit.reopen()
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def kill(self, pids: Sequence[int] | None = None) -> None:
        for pid in list(self.children) if pids is None else pids:
            if pid in self.children:
                log.error("worker %d did not stop within %.1fs: killing it", pid, self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def reap(self) -> None:
        """SIGCHLD: every exited worker is replaced (one a second), unless
        the gateway is stopping, a reload retired it, or they exit too often."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.children:
                self.exited(pid, os.waitstatus_to_exitcode(status))
        self.wake.set()

    def exited(self, pid: int, code: int) -> None:
        self.forget_pipe(pid)
        del self.children[pid]
        slot = self.slot_of.pop(pid, 0)
        self.listening.discard(pid)
        waiting = self.waiting.pop(pid, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(False)
        if self.admin is not None:
            self.admin.worker_exited(pid)
        self.settle(pid)
        timer = self.retiring.pop(pid, None)
        if timer is not None:
            timer.cancel()
            log.info("worker %d (replaced by a reload) exited with %d", pid, code)
            return
        if self.stopping or waiting is not None:  # a reload's new worker that failed: the reload says so
            return
        if not self.started:  # (its log says why: a restart would fail the same way)
            log.error("worker %d exited with %d before any worker started: stopping", pid, code)
            self.failed = True
            self.stop()
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window] + [now]
        if len(self.restarts) > self.burst:
            log.error("worker %d exited with %d; %d restarts within %.0fs: stopping", pid, code, self.burst,
                      self.window)
            self.failed = True
            self.stop()
            return
        log.error("worker %d exited with %d; starting another", pid, code)
        self.loop.call_later(1, self.replace, slot)

    def replace(self, slot: int) -> None:
        serving = {s for pid, s in self.slot_of.items() if pid not in self.retiring}
        if not self.stopping and slot < len(self.slots) and slot not in serving:
            self.due.append((slot, self.config))
            self.wake.set()

    def reported(self, pid: int, fd: int) -> None:
        """A worker's pipe is readable: it listens (:data:`Notifier.LISTENING`),
        it accepts no more (:data:`Notifier.QUIET`), or it exited (the end
        of the pipe)."""
        try:
            said = os.read(fd, 16)
        except OSError:
            said = b""
        if Notifier.LISTENING in said and pid in self.children and pid not in self.retiring:
            self.listening.add(pid)
            self.started = True
        if Notifier.QUIET in said or not said:
            self.settle(pid)
        if not said:
            self.forget_pipe(pid)
        waiting = self.waiting.get(pid)
        if waiting is not None and not waiting.done():
            waiting.set_result(Notifier.LISTENING in said)

    def settle(self, pid: int) -> None:
        """A retiring worker accepts no more."""
        quiet = self.quiet.pop(pid, None)
        if quiet is not None and not quiet.done():
            quiet.set_result(None)

    def forget_pipe(self, pid: int) -> None:
        fd = self.children.get(pid, -1)
        if fd >= 0:
            self.loop.remove_reader(fd)
            os.close(fd)
            self.children[pid] = -1

    # -- reloading ----------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the configuration again and replace the workers with
        it, one slot at a time (a reload in progress is followed by another)."""
        if self.stopping:
            return
        if self.reader is None:
            log.warning("SIGHUP: this gateway has no configuration file to read again; ignored")
            return
        if self.reloading is not None and not self.reloading.done():
            self.reload_again = True
            log.info("SIGHUP: a reload is in progress; another follows it")
            return
        self.reloading = self.loop.create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self.reload_again = False
            try:
                await self._reload_once()
            except Exception:
                log.exception("reload failed; still serving the previous configuration")
            if not self.reload_again or self.stopping:
                return

    async def _reload_once(self) -> None:
        assert self.reader is not None
        log.info("SIGHUP: reading the configuration again")
        config, problems = self.reader()
        path = self.config.path or "the configuration"
        if problems or config is None:
            log.error("reload refused: %s: %d problem(s); still serving the previous configuration:",
                      path, len(problems))
            for problem in problems:
                log.error("  %s", problem)
            return
        config, notes = restart_only(self.config, config)
        for note in notes:
            log.warning("reload: needs a restart, not applied: %s", note)
        if self.reconfigure is not None:
            try:
                self.reconfigure(config)  # [logging] of the supervisor, inherited by the new workers
            except OSError as exc:
                log.error("reload refused: cannot open the audit log %s: %s; still serving the previous "
                          "configuration", config.logging.audit, exc.strerror or exc)
                return
            # (the audit log's configure set a plain SIGUSR1 handler: the loop's again)
            self.loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        previous, self.config = self.config, config
        if self.admin is not None:
            await self.admin.reconfigure(config)
            self.admin.after_fork()
        added = config.server.workers - len(self.slots)
        if added > 0:
            try:
                port = self.slots[0][0].getsockname()[1]
                for _ in range(added):  # (the port is this gateway's: no probe without SO_REUSEPORT)
                    self.slots.append(bind(config.server.host, port, reuse_port=True, listen=True))
            except OSError as exc:
                log.error("reload: cannot listen for %d more worker(s): %s; keeping %d", added,
                          exc.strerror or exc, len(self.slots))
                self.config = config = dataclasses.replace(
                    config, server=dataclasses.replace(config.server, workers=len(self.slots)))
        replaced = 0
        for slot in range(len(self.slots)):
            if self.stopping:
                return
            old = [pid for pid, s in self.slot_of.items() if s == slot and pid not in self.retiring]
            pid = await self._fork_into(slot, config)
            if self.stopping:
                return
            if pid is None:
                if replaced == 0:
                    self.config = previous
                    if self.admin is not None:
                        await self.admin.reconfigure(previous)
                        self.admin.after_fork()
                    log.error("reload failed: the new worker did not start (see its log above); still serving "
                              "the previous configuration")
                else:
                    log.error("reload stopped: the new worker of slot %d did not start (see its log above); "
                              "that slot's worker and those after it serve on with the previous configuration",
                              slot)
                    self.replace(slot)  # (only when the slot has no worker left)
                return
            replaced += 1
            for pid_old in old:
                self.retire(pid_old)
        # "reloaded" once no worker of the previous configuration accepts
        # a new connection any more.
        quiet = [self.quiet[pid] for pid in self.retiring if pid in self.quiet]
        if quiet:
            await asyncio.wait(quiet, timeout=QUIET_TIMEOUT)
        log.info("reloaded: %d worker(s) serve the new configuration%s", replaced,
                 f" ({len(notes)} change(s) need a restart)" if notes else "")

    async def _fork_into(self, slot: int, config: Config) -> int | None:
        """Fork a worker for ``slot`` and wait until it listens: its pid, or
        None when it exited (or did not listen in time)."""
        forked = self.forked[slot] = self.loop.create_future()
        self.due.append((slot, config))
        self.wake.set()
        try:
            pid = await forked
        finally:
            self.forked.pop(slot, None)
        waiting = self.waiting.get(pid)
        if waiting is None:  # gone already
            return None
        try:
            listening = await asyncio.wait_for(asyncio.shield(waiting), READY_TIMEOUT)
        except asyncio.TimeoutError:
            log.error("reload: worker %d did not listen within %.0fs: stopping it", pid, READY_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            listening = False
        self.waiting.pop(pid, None)
        return pid if listening else None

    def retire(self, pid: int) -> None:
        """Tell a worker a reload replaced it: it stops accepting (its
        successor accepts from the same socket) and drains."""
        if pid not in self.children or pid in self.retiring:
            return
        self.listening.discard(pid)
        self.retiring[pid] = self.loop.call_later(self.stop_timeout, self.kill, [pid])
        self.quiet[pid] = self.loop.create_future()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, RETIRE_SIGNAL)

    # -- forking ------------------------------------------------------------------------------

    def spawn(self, slot: int, config: Config) -> WorkerStart | None:
        """Fork a worker for ``slot``: in the parent, record it and return
        None; in the child, drop everything of the supervisor's and return
        what it serves with."""
        read_end, write_end = os.pipe()
        # Signals stay blocked from before the fork until the child has its
        # own handlers and the parent has recorded the child.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                self.in_child(slot)
                admin_sockets = self.admin_sockets if self.admin is None else []
                return WorkerStart(config, self.slots[slot], admin_sockets, Notifier(write_end))
            os.close(write_end)
            self.children[pid] = read_end
            self.slot_of[pid] = slot
            self.loop.add_reader(read_end, self.reported, pid, read_end)
            forked = self.forked.pop(slot, None)
            if forked is not None and not forked.done():
                self.waiting[pid] = self.loop.create_future()
                forked.set_result(pid)
            return None
        except BaseException:
            for fd in (read_end, write_end):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_SIGNALS)

    def in_child(self, slot: int) -> None:
        """Right after the fork, signals blocked: close the copies of the
        parent's descriptors (pipes, the other slots' sockets, the admin
        listener and its connections) and its event loop, which also
        restores the default signal handlers; the parent's objects left
        behind are frozen, so that no finaliser of theirs ever runs here."""
        for fd in self.children.values():
            if fd >= 0:
                os.close(fd)
        for other, sockets in enumerate(self.slots):
            if other != slot:
                for sock in sockets:
                    sock.close()
        self.loop.set_exception_handler(_ignore)
        if self.io_loop is not None:
            self.io_loop.close()
        else:
            self.loop.close()
        if self.admin is not None:
            self.admin.in_child()
        for sig in (signal.SIGTERM, signal.SIGINT, RETIRE_SIGNAL):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's
        # Closing the loop left SIGUSR1 at its default (exit): until the
        # worker's loop handles it, it reopens the audit file before its next line.
        signal.signal(signal.SIGUSR1, audit.reopen_on_signal)
        gc.freeze()


class Notifier:
    """A worker's pipe to the supervisor: one byte once it listens, one
    once a reload's retirement has stopped its accepting; the pipe's end
    (the worker exited) says the rest."""

    LISTENING = b"L"
    QUIET = b"Q"

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _say(self, what: bytes) -> None:
        if self.fd >= 0:
            try:
                os.write(self.fd, what)
            except OSError:
                self.close()

    def listening(self) -> None:
        self._say(self.LISTENING)

    def quiet(self) -> None:
        self._say(self.QUIET)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def supervise(config: Config, slots: list[list[socket.socket]], *, burst: int = 10, window: float = 60.0,
              admin: SupervisorAdmin | None = None, admin_sockets: Sequence[socket.socket] = (),
              reader: Reader | None = None, reconfigure: Callable[[Config], None] | None = None) -> WorkerStart:
    """Fork a worker per slot of ``slots`` and return in each of them what
    it serves with.  The parent stays to supervise: it replaces a worker
    that exits, whatever its status (one per second; more than ``burst``
    within ``window`` seconds means something is wrong, and it stops
    everything and exits 1), serves ``admin`` (the admin listener of
    several workers) throughout, reloads on SIGHUP (``reader`` reads the
    configuration again, ``reconfigure`` applies it to the supervisor
    itself), and on SIGTERM/SIGINT makes ``/readyz`` answer 503, waits
    ``admin.drain_delay`` (not on a second signal), stops every worker
    (SIGTERM; SIGKILL for those still running ``server.shutdown_timeout``
    + 5 seconds later), waits for them and exits 0."""
    start = _Supervisor(config, slots, burst, window, admin, list(admin_sockets), reader, reconfigure).run()
    assert start is not None  # the parent exits in run()
    return start


# -- serving -----------------------------------------------------------------------


def run_loop(kind: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main()`` to completion on a new event loop of the configured kind."""
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


def serve(config: Config, *, demo_upstream: str | None = None, reader: Reader | None = None,
          reconfigure: Callable[[Config], None] | None = None) -> int:
    """``gateway serve`` with a validated configuration: returns the exit
    status (in the supervisor, once every worker is gone; in a worker, when
    it stops).  ``reader`` reads the configuration again on SIGHUP;
    ``reconfigure`` applies a reloaded one to the supervisor itself."""
    host, port, workers = config.server.host, config.server.port, config.server.workers
    raise_open_file_limit()
    try:
        slots = open_slots(host, port, workers)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", host or "*", port, exc.strerror or exc)
        return 1
    port = slots[0][0].getsockname()[1]
    admin_sockets = bind_admin(config)
    admin = None
    if workers > 1 and admin_sockets:
        if "prometheus_client" in sys.modules:
            log.warning("prometheus_client was imported before the workers' metrics directory was set: "
                        "/metrics will not show what the workers count")
        admin = SupervisorAdmin(config, admin_sockets, MetricsDir())  # before the fork: workers inherit it
    else:
        os.environ.pop(MULTIPROC_ENV, None)  # one worker: its metrics are its own, in memory
    requested = (config.server.host, config.server.port)

    def reread() -> tuple[Config | None, list[str]]:
        assert reader is not None
        new, problems = reader()
        if new is not None and (new.server.host, new.server.port) == requested:
            new = new.with_server(port=port)  # --port 0: the port picked at the start
        return new, problems

    start = supervise(config.with_server(port=port), slots, admin=admin, admin_sockets=admin_sockets,
                      reader=reread if reader is not None else None,
                      reconfigure=reconfigure)  # returns only in a worker
    return run_loop(start.config.server.event_loop,
                    lambda: _worker(start.config, start.sockets, demo_upstream, admin_sockets=start.admin_sockets,
                                    notify=start.notify))


async def _worker(config: Config, sockets: list[socket.socket], demo_upstream: str | None, *,
                  admin_sockets: Sequence[socket.socket] = (), notify: Notifier | None = None) -> int:
    """Serve until SIGTERM/SIGINT (a stop) or :data:`RETIRE_SIGNAL` (a
    reload replaced this worker).  ``admin_sockets``: the admin listener of
    a one-worker gateway; ``notify``: tells the supervisor that this worker
    listens, and when a reload's retirement has stopped its accepting."""
    from gateway.app import Gateway
    from gateway.web import make_app

    gw: Gateway | None = None
    try:
        from gateway import tracing

        tracing.start(config.tracing)  # [tracing]: after the fork, so the span exporter's thread is this worker's
        gw = Gateway(config)
        await gw.start()  # every client (upstream HTTP, Redis, MongoDB) is made here, after the fork
        app = make_app(gw)
    except Exception as exc:
        detail = exc.detail if isinstance(exc, GatewayError) else "; ".join(exc.problems) \
            if isinstance(exc, ConfigError) else repr(exc)
        log.error("start-up failed: %s", detail, exc_info=not isinstance(exc, (GatewayError, ConfigError)))
        if gw is not None:
            await gw.stop()
        for sock in [*sockets, *admin_sockets]:
            sock.close()
        return 1
    limit = config.server.max_body_size
    server = GatewayHTTPServer(app, max_body_size=limit + 1 if limit else None,
                               idle_connection_timeout=config.server.idle_connection_timeout,
                               body_timeout=config.server.body_timeout)
    acceptors = [Acceptor(sock, server) for sock in sockets]
    admin: AdminServer | None = None
    readiness: Readiness | None = None
    if admin_sockets:
        stores = gw
        readiness = Readiness({"session store": lambda: stores.session_store.get(PROBE_SESSION_ID),
                               "profile store": lambda: stores.profiles.get_user(PROBE_PROFILE_USER)})
        admin = AdminServer(list(admin_sockets), make_admin_app(readiness, local_metrics, operator=Operator.of(gw),
                                                                token=config.admin.token,
                                                                jwks=gw.assertions.published))
    demo = None
    if demo_upstream:
        from tornado.netutil import bind_sockets

        from gateway.demo import make_demo_app

        demo_host, _, demo_port = demo_upstream.rpartition(":")
        demo = HTTPServer(make_demo_app())
        # (SO_REUSEPORT: a reload's new worker binds it while this one serves)
        demo.add_sockets(bind_sockets(int(demo_port), demo_host or "127.0.0.1", reuse_port=True))
        log.info("demo upstream on http://%s", demo_upstream)
    port = sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    retire = asyncio.Event()

    def stopping() -> None:
        stop.set()
        retire.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)
    loop.add_signal_handler(RETIRE_SIGNAL, retire.set)
    loop.add_signal_handler(signal.SIGUSR1, audit.reopen)  # a log rotation
    for acceptor in acceptors:
        acceptor.start()
    log.info("listening on http://%s:%d (pid %d, event loop %s)", config.server.host, port, os.getpid(),
             type(loop).__module__.split(".")[0])
    print(f"gateway listening on http://{config.server.host}:{port}", flush=True)
    if notify is not None:
        notify.listening()
    await retire.wait()
    replaced = not stop.is_set()

    if replaced:
        # A reload: the successor already accepts from the same sockets, and
        # from their backlog; /readyz is its to answer.
        log.info("replaced by a reload: no new connections here")
        if admin is not None:
            admin.close()
            admin = None
    elif readiness is not None:
        # Readiness turns 503 first and, for admin.drain_delay (cut short by a
        # second signal), the gateway still serves: a load balancer stops
        # sending it requests before it stops accepting them.
        readiness.stopping = True
        delay = config.admin.drain_delay
        if delay > 0:
            log.info("stopping: /readyz answers 503; the drain begins in %.1fs (admin.drain_delay)", delay)
            stop.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # The drain: no new connections, idle ones closed now, the others once
    # their response is out (with Connection: close), for up to shutdown_timeout.
    # On a stop, what waits in the backlog is taken first: closing the last
    # copy of a listening socket resets the connections waiting in it.
    deadline = loop.time() + config.server.shutdown_timeout
    gw.draining = True
    taken = 0
    for acceptor in acceptors:
        if not replaced:
            taken += acceptor.sweep()
        acceptor.close()
    if notify is not None:
        notify.quiet()  # (on a reload, the supervisor's "reloaded" waits for it)
    idle = server.drain()
    log.info("%s: no new connections; %d request(s) in flight; %d idle connection(s) closed%s",
             "replaced" if replaced else "stopping", max(server.requests_in_progress(), gw.requests_in_flight),
             idle, f"; {taken} waiting connection(s) taken" if taken else "")
    while (server.requests_in_progress() or gw.requests_in_flight > 0 or server.awaiting_first_request()) \
            and loop.time() < deadline:
        await asyncio.sleep(0.02)
    left = max(server.requests_in_progress(), gw.requests_in_flight)
    if left:
        log.warning("server.shutdown_timeout (%.1fs) is over: closing %d connection(s) with a request in flight",
                    config.server.shutdown_timeout, left)
    server.close_connections()
    if replaced and server.open_sockets():
        # Open WebSockets end on their own (their client or upstream closes
        # them), within shutdown_timeout; a stop meanwhile ends them now.
        log.info("replaced: waiting for %d open WebSocket(s) to end (up to server.shutdown_timeout)",
                 server.open_sockets())
        while server.open_sockets() and loop.time() < deadline and not stop.is_set():
            await asyncio.sleep(0.05)
        if server.open_sockets():
            log.info("replaced: closing %d WebSocket(s) still open", server.open_sockets())
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), CLOSE_GRACE)
    if demo is not None:
        demo.stop()
    if admin is not None:
        admin.close()
    await gw.stop()  # ends the WebSockets still open (1001, going away)
    server.close_sockets()
    log.info("stopped")
    return 0
