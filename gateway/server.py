"""Serving ``gateway serve``: listening sockets, worker processes, the event
loop, signals and a graceful stop.

One process (``server.workers = 1``) binds and listens itself.  With more
workers the parent only *reserves* the port (a ``SO_REUSEPORT`` socket that
is bound but never listens, so it receives no connection) and supervises;
every worker binds and listens on that port with its own ``SO_REUSEPORT``
socket after the fork, and the kernel spreads new connections evenly over
them.

Connections are accepted by :class:`Acceptor`, which backs off (stops
watching the listening socket for a moment) when the process is out of file
descriptors instead of spinning, and handed to :class:`GatewayHTTPServer`,
which knows which connections have a request in progress so that a stop can
close the idle ones at once and let the others finish their response.

Every client (upstream HTTP, Redis, MongoDB) is created by
:meth:`gateway.app.Gateway.start`, which runs in the worker, after the fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Any, Awaitable, Callable, Coroutine

from tornado import httputil
from tornado.http1connection import HTTP1ServerConnection
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from gateway.config import Config
from gateway.errors import GatewayError
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


def reserve(host: str, port: int) -> list[socket.socket]:
    """Reserve the port for the workers: sockets bound with SO_REUSEPORT that
    never listen (so no connection waits on them).  The port is first bound
    without SO_REUSEPORT, so a port already in use (by another gateway with
    its own SO_REUSEPORT sockets too) is an error rather than shared."""
    probes = bind(host, port, reuse_port=False, listen=False)
    port = probes[0].getsockname()[1]
    for sock in probes:
        sock.close()
    return bind(host, port, reuse_port=True, listen=False)


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

    def close(self) -> None:
        """Stop accepting; the socket is closed (its backlog is reset)."""
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
            try:
                stream = IOStream(conn, max_buffer_size=self.server.max_buffer_size,
                                  read_chunk_size=self.server.read_chunk_size)
                self.server.handle_stream(stream, address)
            except Exception:
                log.exception("a new connection could not be served")
                conn.close()

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


class GatewayHTTPServer(HTTPServer):
    """An HTTPServer that knows, for every connection, whether a request is
    in progress on it: from its request head until its response has been
    written (the connection's next request starts) or the client is gone.

    Once :meth:`drain` has been called, idle connections are closed, and so
    is every other one as soon as its response is out."""

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        #: open connection -> whether a request is in progress on it
        self.connections: dict[HTTP1ServerConnection, bool] = {}
        self.draining = False

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if self.draining:
            stream.close()
            return
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        conn = server_conn if isinstance(server_conn, HTTP1ServerConnection) else None
        if conn is not None and self.draining:  # the previous response is out: no further request here
            conn.stream.close()
            return _Refused()
        delegate = super().start_request(server_conn, request_conn)
        if conn is None:
            return delegate
        self.connections[conn] = False
        return _Tracked(delegate, self, conn)

    def on_close(self, server_conn: object) -> None:
        if isinstance(server_conn, HTTP1ServerConnection):  # the only kind start_request tracks
            self.connections.pop(server_conn, None)
        super().on_close(server_conn)

    def requests_in_progress(self) -> int:
        """Connections with a request in progress whose client is still there."""
        return sum(1 for conn, busy in self.connections.items() if busy and not conn.stream.closed())

    def drain(self) -> int:
        """Close every idle connection now and every other one once its
        response is written; returns how many idle ones were closed."""
        self.draining = True
        idle = [conn for conn, busy in self.connections.items() if not busy]
        for conn in idle:
            # Its next request is then read from a closed stream: it gets
            # the _Refused delegate below and is never handled.
            conn.stream.close()
        return len(idle)

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.stream.close()


# -- worker processes ------------------------------------------------------------------


def supervise(workers: int, *, burst: int = 10, window: float = 60.0, stop_timeout: float | None = None) -> None:
    """Fork ``workers`` processes and return in each of them.  The parent
    stays to supervise: it replaces a worker that exits, whatever its status
    (one per second; more than ``burst`` within ``window`` seconds means
    something is wrong, and it stops everything and exits 1), and on
    SIGTERM/SIGINT it stops every worker (SIGTERM; SIGKILL for those still
    running ``stop_timeout`` seconds later), waits for them and exits 0."""
    children: set[int] = set()
    stopping = False
    signals = {signal.SIGTERM, signal.SIGINT}

    def spawn() -> bool:
        # Signals stay blocked from before the fork until the child has its
        # own handlers and the parent has recorded the child.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
            if pid == 0:
                for sig in (*signals, signal.SIGALRM):
                    signal.signal(sig, signal.SIG_DFL)
                return True
            children.add(pid)
            return False
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def kill(signum: int, frame: object) -> None:
        for pid in list(children):
            log.error("worker %d did not stop within %.1fs: killing it", pid, stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping and stop_timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, max(stop_timeout, 0.1))
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGALRM, kill)
    for sig in signals:
        signal.signal(sig, stop)
    for _ in range(workers):
        if stopping:
            break
        if spawn():
            return
    restarts: list[float] = []
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < window] + [now]
        if len(restarts) > burst:
            log.error("worker %d exited with %d; %d restarts within %.0fs: stopping", pid, code, burst, window)
            failed = True
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d exited with %d; starting another", pid, code)
        time.sleep(1)
        if not stopping and spawn():
            return
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.exit(1 if failed else 0)


# -- serving -----------------------------------------------------------------------


def run_loop(kind: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main()`` to completion on a new event loop of the configured kind."""
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


def serve(config: Config, *, demo_upstream: str | None = None) -> int:
    """``gateway serve`` with a validated configuration: returns the exit status."""
    host, port, workers = config.server.host, config.server.port, config.server.workers
    raise_open_file_limit()
    try:
        if workers > 1:
            reserved = reserve(host, port)
            port = reserved[0].getsockname()[1]
        else:
            sockets = bind(host, port, reuse_port=False, listen=True)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", host or "*", port, exc.strerror or exc)
        return 1
    if workers > 1:
        supervise(workers, stop_timeout=config.server.shutdown_timeout + 5)  # returns only in a worker
        try:
            sockets = bind(host, port, reuse_port=True, listen=True)
        except OSError as exc:
            log.error("worker %d cannot listen on %s port %d: %s", os.getpid(), host or "*", port,
                      exc.strerror or exc)
            return 1
        for sock in reserved:
            sock.close()
    return run_loop(config.server.event_loop, lambda: _worker(config, sockets, demo_upstream))


async def _worker(config: Config, sockets: list[socket.socket], demo_upstream: str | None) -> int:
    from gateway.app import Gateway
    from gateway.web import make_app

    gw: Gateway | None = None
    try:
        gw = Gateway(config)
        await gw.start()  # every client (upstream HTTP, Redis, MongoDB) is made here, after the fork
        app = make_app(gw)
    except Exception as exc:
        detail = exc.detail if isinstance(exc, GatewayError) else "; ".join(exc.problems) \
            if isinstance(exc, ConfigError) else repr(exc)
        log.error("start-up failed: %s", detail, exc_info=not isinstance(exc, (GatewayError, ConfigError)))
        if gw is not None:
            await gw.stop()
        for sock in sockets:
            sock.close()
        return 1
    limit = config.server.max_body_size
    server = GatewayHTTPServer(app, max_body_size=limit + 1 if limit else None,
                               idle_connection_timeout=config.server.idle_connection_timeout,
                               body_timeout=config.server.body_timeout)
    acceptors = [Acceptor(sock, server) for sock in sockets]
    for acceptor in acceptors:
        acceptor.start()
    demo = None
    if demo_upstream:
        from tornado.netutil import bind_sockets

        from gateway.demo import make_demo_app

        demo_host, _, demo_port = demo_upstream.rpartition(":")
        demo = HTTPServer(make_demo_app())
        demo.add_sockets(bind_sockets(int(demo_port), demo_host or "127.0.0.1",
                                      reuse_port=config.server.workers > 1))
        log.info("demo upstream on http://%s", demo_upstream)
    port = sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    log.info("listening on http://%s:%d (pid %d, event loop %s)", config.server.host, port, os.getpid(),
             type(loop).__module__.split(".")[0])
    print(f"gateway listening on http://{config.server.host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # The drain: no new connections, idle ones closed now, the others once
    # their response is out (with Connection: close), for up to shutdown_timeout.
    deadline = loop.time() + config.server.shutdown_timeout
    gw.draining = True
    for acceptor in acceptors:
        acceptor.close()
    idle = server.drain()
    log.info("stopping: no new connections; %d request(s) in flight; %d idle connection(s) closed",
             max(server.requests_in_progress(), gw.requests_in_flight), idle)
    while (server.requests_in_progress() or gw.requests_in_flight > 0) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    left = max(server.requests_in_progress(), gw.requests_in_flight)
    if left:
        log.warning("server.shutdown_timeout (%.1fs) is over: closing %d connection(s) with a request in flight",
                    config.server.shutdown_timeout, left)
    server.close_connections()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), CLOSE_GRACE)
    if demo is not None:
        demo.stop()
    await gw.stop()
    log.info("stopped")
    return 0
