"""The admin listener: health, readiness and metrics, for operators.

``[admin]`` gives its address (``host``, ``port``; port 0: no listener).
There is one for the whole gateway: with ``server.workers = 1`` the one
process serves it on its own event loop; with more workers the supervisor
does (:mod:`gateway.server`), since it outlives every worker: the listener
answers while a worker is replaced and through the whole graceful stop.

- ``GET /healthz``: 200 ``{"status": "ok"}`` while the process serves.
- ``GET /readyz``: 200 ``{"status": "ok"}`` when the session store and the
  profile store each answer a read within :data:`PROBE_TIMEOUT` (and, in the
  supervisor, a worker listens); else 503 ``{"status": "unavailable",
  "failed": [...]}`` naming what failed.  From the moment a graceful stop
  begins it is 503 ``{"status": "stopping"}``, before any worker stops
  accepting, so that a load balancer drains the gateway before it closes.
- ``GET /metrics``: every metric of :mod:`gateway.metrics` in the Prometheus
  text format; with several workers, the sum over all of them
  (:class:`MetricsDir`).

None of them needs a token: the listener belongs on a private address.
``admin.token`` (``token_env``) is reserved for an operator API; without
one that API stays off.

``prometheus_client`` is imported only inside functions here, so that
importing this module does not fix its mode before :class:`MetricsDir`
names the directory of the multiprocess mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

import tornado.web

from gateway.errors import GatewayError, error_body_for_status

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = [
    "MULTIPROC_ENV", "PROBE_PROFILE_USER", "PROBE_SESSION_ID", "PROBE_TIMEOUT", "MetricsDir", "Probe",
    "Readiness", "StoreClients", "local_metrics", "make_admin_app",
]

log = logging.getLogger("gateway.admin")

#: how long a store has to answer a readiness probe
PROBE_TIMEOUT = 1.0
#: what the probes read: a session id and a user id nobody has (a miss is an answer)
PROBE_SESSION_ID = "readiness-probe"
PROBE_PROFILE_USER = "u_readiness_probe"
#: the variable naming prometheus_client's multiprocess directory
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: a readiness probe: done when what it checks answered; raises otherwise
Probe = Callable[[], Awaitable[object]]
#: metrics as served: the body and its Content-Type
Metrics = Callable[[], tuple[bytes, str]]


# -- readiness --------------------------------------------------------------------------


def _why(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return exc.detail or exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Readiness:
    """What ``/readyz`` answers.  :meth:`failed` runs every probe at once,
    each within ``timeout``, and returns the names of those that failed,
    then what ``others`` reports; concurrent callers share one check.  Once
    :attr:`stopping` is set, the gateway is not ready whatever the probes
    say.  A change of the outcome is logged once (with each failure's
    reason), not every check.  Between :meth:`hold` and :meth:`release` no
    new check starts (callers wait)."""

    def __init__(self, probes: Mapping[str, Probe], *, others: Callable[[], list[str]] | None = None,
                 timeout: float = PROBE_TIMEOUT) -> None:
        self.probes = dict(probes)
        self.others = others
        self.timeout = timeout
        #: set when a graceful stop begins
        self.stopping = False
        self._check: asyncio.Future[list[str]] | None = None
        self._last: list[str] | None = None
        self._open = asyncio.Event()
        self._open.set()

    async def failed(self) -> list[str]:
        """What is not ready now (empty: ready), in the order of the probes."""
        await self._open.wait()
        check = self._check
        if check is None:
            check = self._check = asyncio.ensure_future(self._run())
            check.add_done_callback(self._done)
        return list(await asyncio.shield(check))

    def _done(self, check: asyncio.Future[list[str]]) -> None:
        if self._check is check:
            self._check = None

    def hold(self) -> None:
        """Start no new check until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def idle(self) -> None:
        """Return once no check is in flight."""
        check = self._check
        if check is not None:
            await asyncio.wait([check])

    async def _run(self) -> list[str]:
        names = list(self.probes)
        reasons = await asyncio.gather(*(self._probe(self.probes[name]) for name in names))
        failed = [name for name, why in zip(names, reasons) if why is not None]
        failed += self.others() if self.others is not None else []
        if failed != self._last:
            why = dict(zip(names, reasons))
            if failed:
                log.warning("not ready: %s", "; ".join(f"{name} ({why[name]})" if why.get(name) else name
                                                       for name in failed))
            elif self._last is not None:
                log.info("ready again")
            self._last = failed
        return failed

    async def _probe(self, probe: Probe) -> str | None:
        try:
            await asyncio.wait_for(probe(), self.timeout)
        except asyncio.TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except Exception as exc:
            return _why(exc)
        return None


class StoreClients:
    """The supervisor's own clients of the configured session and profile
    stores, for readiness only (the supervisor serves no request).  Each is
    opened by the first probe that needs it and kept, dropped (and closed)
    after a probe it failed so that the next one starts afresh, and all are
    closed by :meth:`close`, which the supervisor awaits before every fork:
    none of their connections or threads may cross into a worker."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stores: dict[str, Any] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def probes(self) -> dict[str, Probe]:
        return {"session store": self._session_store, "profile store": self._profile_store}

    async def _session_store(self) -> None:
        from gateway.sessions import open_session_store

        await self._use("session store", lambda: open_session_store(self.config.sessions),
                        lambda store: store.get(PROBE_SESSION_ID))

    async def _profile_store(self) -> None:
        from gateway.profiles import open_profile_store

        await self._use("profile store", lambda: open_profile_store(self.config.profiles),
                        lambda store: store.get_user(PROBE_PROFILE_USER))

    async def _use(self, name: str, make: Callable[[], Any], read: Callable[[Any], Awaitable[object]]) -> None:
        store = self._stores.get(name)
        try:
            if store is None:
                store = make()
                await store.open()
                self._stores[name] = store
            await read(store)
        except BaseException:  # a failure, or the probe's timeout: this client is done with
            self._stores.pop(name, None)
            if store is not None:
                closing = asyncio.ensure_future(self._close(name, store))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            raise

    @staticmethod
    async def _close(name: str, store: Any) -> None:
        try:
            await store.close()
        except Exception as exc:
            log.warning("readiness: closing the %s client failed: %s", name, _why(exc))

    async def close(self) -> None:
        """Close every client (and wait for those being closed)."""
        stores, self._stores = list(self._stores.items()), {}
        await asyncio.gather(*(self._close(name, store) for name, store in stores), *self._closing)


# -- metrics ------------------------------------------------------------------------------


def local_metrics() -> tuple[bytes, str]:
    """This process's metrics (one process: no multiprocess directory)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class MetricsDir:
    """``prometheus_client``'s multiprocess directory, for several workers:
    made fresh (empty, private to the user) by the supervisor before it
    forks and named in ``PROMETHEUS_MULTIPROC_DIR`` (replacing any inherited
    value, whose files could be another run's), so that every worker writes
    its values there.  :meth:`collect` sums them: counters and histograms
    over every worker that ever ran (a replaced worker's counts stay), live
    gauges over the running ones once :meth:`worker_exited` has removed an
    exited worker's files.  :meth:`remove` deletes it at exit."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ[MULTIPROC_ENV] = self.path
        self._registry: Any = None

    def collect(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if self._registry is None:
            self._registry = CollectorRegistry()
            MultiProcessCollector(self._registry, path=self.path)  # type: ignore[no-untyped-call]  # (unannotated there)
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def worker_exited(self, pid: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]  # (unannotated there)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == self.path:
            del os.environ[MULTIPROC_ENV]


# -- the application --------------------------------------------------------------------------


class _AdminHandler(tornado.web.RequestHandler):
    readiness: Readiness
    metrics: Metrics

    def initialize(self, readiness: Readiness, metrics: Metrics) -> None:
        self.readiness = readiness
        self.metrics = metrics

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> None:
        return None

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body) if self.request.method != "HEAD" else None)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.answer(status_code, error_body_for_status(status_code))


class HealthHandler(_AdminHandler):
    """``GET /healthz``: the process serves."""

    def get(self) -> None:
        self.answer(200, {"status": "ok"})

    head = get


class ReadyHandler(_AdminHandler):
    """``GET /readyz``: the stores answer, and no stop has begun."""

    async def get(self) -> None:
        failed = [] if self.readiness.stopping else await self.readiness.failed()
        if self.readiness.stopping:
            self.answer(503, {"status": "stopping"})
        elif failed:
            self.answer(503, {"status": "unavailable", "failed": failed})
        else:
            self.answer(200, {"status": "ok"})

    head = get


class MetricsHandler(_AdminHandler):
    """``GET /metrics``: the Prometheus text format."""

    def get(self) -> None:
        body, content_type = self.metrics()
        self.set_header("Content-Type", content_type)
        self.finish(body if self.request.method != "HEAD" else None)

    head = get


class AdminNotFound(_AdminHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # DEBUG only: a load balancer probes every few seconds, and what makes
    # /readyz fail is logged by Readiness when it changes.
    log.debug("%d %s %s %.1fms", handler.get_status(), handler.request.method, handler.request.path,
              1000.0 * handler.request.request_time())


def make_admin_app(readiness: Readiness, metrics: Metrics) -> tornado.web.Application:
    """The admin listener's application."""
    kwargs = {"readiness": readiness, "metrics": metrics}
    return tornado.web.Application(
        [(r"/healthz", HealthHandler, kwargs), (r"/readyz", ReadyHandler, kwargs),
         (r"/metrics", MetricsHandler, kwargs)],
        default_handler_class=AdminNotFound, default_handler_args=kwargs, log_function=_log_request,
        compress_response=False,
    )
