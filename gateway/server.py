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

The admin listener (:mod:`gateway.admin`: ``/healthz``, ``/readyz``,
``/metrics``) is served by the one process, or by the supervisor of
several workers (:class:`SupervisorAdmin`), which therefore runs an event
loop of its own.  It forks only between two turns of that loop, with
nothing of its own left to cross the fork (see :class:`_Supervisor`), and
it makes the workers' metrics directory before the first fork.  On
SIGTERM readiness turns 503 before anything stops accepting, and
``admin.drain_delay`` later the drain begins.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self.drain_delay = config.admin.drain_delay
        self.clients = StoreClients(config)
        self.token = config.admin.token
        self.jwks = KeySet.from_config(config.assertion)
        self.readiness = Readiness(self.clients.probes(), others=self._workers)
        self.listening: Callable[[], int] = lambda: 0
        self.server: AdminServer | None = None

    def _workers(self) -> list[str]:
        return [] if self.listening() else ["workers"]

    def start(self, listening: Callable[[], int]) -> None:
        """Serve, on the running event loop; ``listening()``: how many workers listen."""
        self.listening = listening
        self.server = AdminServer(self.sockets, make_admin_app(
            self.readiness, self.metrics.collect, operator=Operator(self.clients.using), token=self.token,
            jwks=self.jwks))

    async def before_fork(self) -> None:
        """No probe in flight or to come, no store client open (until :meth:`after_fork`)."""
        self.readiness.hold()
        self.clients.hold()  # nor an operator call
        await self.readiness.idle()
        await self.clients.idle()
        await self.clients.close()

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
        self.metrics.remove()


# -- worker processes ------------------------------------------------------------------

#: signals blocked around a fork, until the child has handlers of its own
_FORK_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1}
#: before a fork, how long threads the supervisor started may take to end
_THREADS_GRACE = 2.0


def _ignore(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    return None


class _Supervisor:
    """:func:`supervise`'s state.  Its event loop runs the admin listener,
    the signal handlers and the timers; a worker is forked only between two
    runs of that loop, once nothing of the supervisor's own (a probe in
    flight, a store client, an executor thread) is left to cross the fork.
    The loop's selector is ``poll``, which keeps its state in the process:
    an epoll set would be shared with every child, and the child closing
    its copy of the loop would unregister the parent's descriptors."""

    def __init__(self, workers: int, burst: int, window: float, stop_timeout: float | None,
                 admin: SupervisorAdmin | None) -> None:
        self.burst, self.window, self.stop_timeout = burst, window, stop_timeout
        self.admin = admin
        self.loop = asyncio.SelectorEventLoop(selectors.PollSelector())
        self.executor = ThreadPoolExecutor(thread_name_prefix="gateway-supervisor")
        self.loop.set_default_executor(self.executor)
        self.io_loop: IOLoop | None = None
        #: worker pid -> the read end of its "listening" pipe (-1 once read)
        self.children: dict[int, int] = {}
        #: workers that said they listen
        self.listening: set[int] = set()
        self.pending = workers  # workers to start
        self.stopping = False
        self.failed = False
        self.restarts: list[float] = []
        self.wake = asyncio.Event()
        self.kill_timer: asyncio.TimerHandle | None = None
        self.drain_timer: asyncio.TimerHandle | None = None
        self.threads = threading.active_count()

    # -- the parent's loop ----------------------------------------------------------------------

    def run(self) -> Callable[[], None] | None:
        """Supervise until every worker is gone (then exit the process), or
        return in a new worker its "listening" notifier."""
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        loop.run_until_complete(self._start())
        while True:
            loop.run_until_complete(self._next())
            if self.stopping and not self.children:
                break
            loop.run_until_complete(self._quiesce())
            while self.pending > 0 and not self.stopping:
                self.pending -= 1
                notify = self.spawn()
                if notify is not None:
                    return notify
            if self.admin is not None:
                self.admin.after_fork()
        for timer in (self.kill_timer, self.drain_timer):
            if timer is not None:
                timer.cancel()
        if self.admin is not None:
            loop.run_until_complete(self.admin.close())
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
        while not (self.pending > 0 and not self.stopping) and not (self.stopping and not self.children):
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

    def stop(self) -> None:
        """SIGTERM/SIGINT: ``/readyz`` turns 503 now; the workers get
        SIGTERM after ``admin.drain_delay`` (at once on a second signal)."""
        if self.stopping:
            self.signal_workers()
            return
        self.stopping = True
        self.pending = 0
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
        if self.kill_timer is None and self.stop_timeout is not None:
            self.kill_timer = self.loop.call_later(max(self.stop_timeout, 0.1), self.kill)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reopen_logs(self) -> None:
        """SIGUSR1 (a log rotation): reopen the audit file here and in
        every worker."""
        audit.reopen()
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def kill(self) -> None:
        for pid in list(self.children):
            log.error("worker %d did not stop within %.1fs: killing it", pid, self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def reap(self) -> None:
        """SIGCHLD: every exited worker is replaced (one a second), unless
        the gateway is stopping or they exit too often."""
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
        self.listening.discard(pid)
        if self.admin is not None:
            self.admin.worker_exited(pid)
        if self.stopping:
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
        self.loop.call_later(1, self.replace)

    def replace(self) -> None:
        if not self.stopping:
            self.pending += 1
            self.wake.set()

    def reported(self, pid: int, fd: int) -> None:
        """A worker's pipe is readable: it listens (a byte), or it exited
        before it did (the end of the pipe)."""
        try:
            said = os.read(fd, 1)
        except OSError:
            said = b""
        self.forget_pipe(pid)
        if said and pid in self.children:
            self.listening.add(pid)

    def forget_pipe(self, pid: int) -> None:
        fd = self.children.get(pid, -1)
        if fd >= 0:
            self.loop.remove_reader(fd)
            os.close(fd)
            self.children[pid] = -1

    # -- forking ------------------------------------------------------------------------------

    def spawn(self) -> Callable[[], None] | None:
        """Fork a worker: in the parent, record it and return None; in the
        child, drop everything of the supervisor's and return its notifier."""
        read_end, write_end = os.pipe()
        # Signals stay blocked from before the fork until the child has its
        # own handlers and the parent has recorded the child.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                self.in_child()
                return _notifier(write_end)
            os.close(write_end)
            self.children[pid] = read_end
            self.loop.add_reader(read_end, self.reported, pid, read_end)
            return None
        except BaseException:
            for fd in (read_end, write_end):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_SIGNALS)

    def in_child(self) -> None:
        """Right after the fork, signals blocked: close the copies of the
        parent's descriptors (pipes, the admin listener and its connections)
        and its event loop, which also restores the default signal
        handlers; the parent's objects left behind are frozen, so that no
        finaliser of theirs ever runs here."""
        for fd in self.children.values():
            if fd >= 0:
                os.close(fd)
        self.loop.set_exception_handler(_ignore)
        if self.io_loop is not None:
            self.io_loop.close()
        else:
            self.loop.close()
        if self.admin is not None:
            self.admin.in_child()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        # Closing the loop left SIGUSR1 at its default (exit): until the
        # worker's loop handles it, it reopens the audit file before its next line.
        signal.signal(signal.SIGUSR1, audit.reopen_on_signal)
        gc.freeze()


def _notifier(fd: int) -> Callable[[], None]:
    """What a worker calls once it listens: one byte to the supervisor."""

    def listening() -> None:
        nonlocal fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"1")
                os.close(fd)
            fd = -1

    return listening


def supervise(workers: int, *, burst: int = 10, window: float = 60.0, stop_timeout: float | None = None,
              admin: SupervisorAdmin | None = None) -> Callable[[], None]:
    """Fork ``workers`` processes and return in each of them, with the
    function it calls once it listens.  The parent stays to supervise: it
    replaces a worker that exits, whatever its status (one per second; more
    than ``burst`` within ``window`` seconds means something is wrong, and
    it stops everything and exits 1), serves ``admin`` (the admin listener)
    throughout, and on SIGTERM/SIGINT makes ``/readyz`` answer 503, waits
    ``admin.drain_delay`` (not on a second signal), stops every worker
    (SIGTERM; SIGKILL for those still running ``stop_timeout`` seconds
    later), waits for them and exits 0."""
    notify = _Supervisor(workers, burst, window, stop_timeout, admin).run()
    assert notify is not None  # the parent exits in run()
    return notify


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
    admin_sockets = bind_admin(config)
    if workers > 1:
        admin = None
        if admin_sockets:
            if "prometheus_client" in sys.modules:
                log.warning("prometheus_client was imported before the workers' metrics directory was set: "
                            "/metrics will not show what the workers count")
            admin = SupervisorAdmin(config, admin_sockets, MetricsDir())  # before the fork: workers inherit it
        else:
            os.environ.pop(MULTIPROC_ENV, None)
        notify = supervise(workers, stop_timeout=config.server.shutdown_timeout + 5,
                           admin=admin)  # returns only in a worker
        try:
            sockets = bind(host, port, reuse_port=True, listen=True)
        except OSError as exc:
            log.error("worker %d cannot listen on %s port %d: %s", os.getpid(), host or "*", port,
                      exc.strerror or exc)
            return 1
        for sock in reserved:
            sock.close()
        return run_loop(config.server.event_loop, lambda: _worker(config, sockets, demo_upstream, notify=notify))
    os.environ.pop(MULTIPROC_ENV, None)  # one process: its metrics are its own, in memory
    return run_loop(config.server.event_loop,
                    lambda: _worker(config, sockets, demo_upstream, admin_sockets=admin_sockets))


async def _worker(config: Config, sockets: list[socket.socket], demo_upstream: str | None, *,
                  admin_sockets: Sequence[socket.socket] = (), notify: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT.  ``admin_sockets``: the admin listener
    of a gateway of one process; ``notify``: tells the supervisor that this
    worker listens."""
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
        for sock in [*sockets, *admin_sockets]:
            sock.close()
        return 1
    limit = config.server.max_body_size
    server = GatewayHTTPServer(app, max_body_size=limit + 1 if limit else None,
                               idle_connection_timeout=config.server.idle_connection_timeout,
                               body_timeout=config.server.body_timeout)
    acceptors = [Acceptor(sock, server) for sock in sockets]
    for acceptor in acceptors:
        acceptor.start()
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
        demo.add_sockets(bind_sockets(int(demo_port), demo_host or "127.0.0.1",
                                      reuse_port=config.server.workers > 1))
        log.info("demo upstream on http://%s", demo_upstream)
    port = sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    log.info("listening on http://%s:%d (pid %d, event loop %s)", config.server.host, port, os.getpid(),
             type(loop).__module__.split(".")[0])
    print(f"gateway listening on http://{config.server.host}:{port}", flush=True)
    if notify is not None:
        notify()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, audit.reopen)  # a log rotation
    await stop.wait()

    # Readiness turns 503 first and, for admin.drain_delay (cut short by a
    # second signal), the gateway still serves: a load balancer stops
    # sending it requests before it stops accepting them.
    if readiness is not None:
        readiness.stopping = True
        delay = config.admin.drain_delay
        if delay > 0:
            log.info("stopping: /readyz answers 503; the drain begins in %.1fs (admin.drain_delay)", delay)
            stop.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

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
    if admin is not None:
        admin.close()
    await gw.stop()
    log.info("stopped")
    return 0
