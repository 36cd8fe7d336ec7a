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

The operator API (:mod:`gateway.operator`) is served under ``/admin/``
(:func:`operator_routes`): every call needs ``Authorization: Bearer``
with ``admin.token`` (``token_env``); without a configured token its paths
answer 404.  In the supervisor of several workers it works on the
supervisor's own clients, those the readiness probe opens
(:class:`StoreClients`), closed around every fork like them.

``prometheus_client`` is imported only inside functions here, so that
importing this module does not fix its mode before :class:`MetricsDir`
names the directory of the multiprocess mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping

import tornado.web

from gateway.errors import GatewayError, error_body_for_status, invalid_request
from gateway.operator import Operator, OperatorServices, audit, check_token

if TYPE_CHECKING:
    from gateway.assertion import KeySet
    from gateway.config import Config

__all__ = [
    "MULTIPROC_ENV", "PROBE_PROFILE_USER", "PROBE_SESSION_ID", "PROBE_TIMEOUT", "MetricsDir", "Probe",
    "Readiness", "StoreClients", "local_metrics", "make_admin_app", "operator_routes",
]

log = logging.getLogger("gateway.admin")

#: how long a store has to answer a readiness probe
PROBE_TIMEOUT = 1.0
#: what the probes read: a session id and a user id nobody has (a miss is an answer); the
#: session id well-formed (it carries a slot tag), or the store would answer without asking Redis
PROBE_SESSION_ID = "s_000_readiness-probe"
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
    """The supervisor's own clients of the configured stores: for readiness
    (the supervisor serves no gateway request) and the operator API.  They
    belong to one :class:`gateway.app.Gateway` built from the configuration
    at the first need and never started (no provider is set up: the
    supervisor runs no provider thread).  Its session store and profile
    store are each opened by the first probe or operator call that needs
    them and kept, closed after a probe they failed so that the next one
    opens them afresh, and all are closed by :meth:`close`, which the
    supervisor awaits before every fork, between :meth:`hold` (no operator
    call starts; those in flight end, :meth:`idle`) and :meth:`release`:
    none of their connections or threads may cross into a worker."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._gateway: Any = None
        #: name -> an opening (done: open) of that store
        self._open: dict[str, asyncio.Future[None]] = {}
        self._closing: dict[str, asyncio.Future[None]] = {}
        self._gate = asyncio.Event()
        self._gate.set()
        self._users = 0
        self._no_users = asyncio.Event()
        self._no_users.set()

    def probes(self) -> dict[str, Probe]:
        return {"session store": self._session_store, "profile store": self._profile_store}

    def gateway(self) -> Any:
        """The supervisor's gateway (its stores opened by :meth:`_ensure`)."""
        if self._gateway is None:
            from gateway.app import Gateway

            self._gateway = Gateway(self.config)
        return self._gateway

    def _store(self, name: str) -> Any:
        gw = self.gateway()
        return gw.session_store if name == "session store" else gw.profiles

    async def _session_store(self) -> None:
        await self._use("session store", lambda store: store.get(PROBE_SESSION_ID))

    async def _profile_store(self) -> None:
        await self._use("profile store", lambda store: store.get_user(PROBE_PROFILE_USER))

    async def _ensure(self, name: str) -> Any:
        """The store ``name``, open."""
        store = self._store(name)
        closing = self._closing.get(name)
        if closing is not None:
            await asyncio.shield(closing)
        opening = self._open.get(name)
        if opening is None:
            opening = self._open[name] = asyncio.ensure_future(self._opened(name, store))
        await asyncio.shield(opening)
        return store

    async def _opened(self, name: str, store: Any) -> None:
        try:
            await store.open()
            if name == "session store":
                await self.gateway().state.open()  # (on Redis, the session store's client)
        except BaseException:
            self._drop(name)
            raise

    async def _use(self, name: str, read: Callable[[Any], Awaitable[object]]) -> None:
        try:
            await read(await self._ensure(name))
        except BaseException:  # a failure, or the probe's timeout: this client is done with
            self._drop(name)
            raise

    def _drop(self, name: str) -> None:
        """Close the store ``name`` (in the background), to be opened afresh."""
        if self._open.pop(name, None) is None or name in self._closing:
            return
        closing = self._closing[name] = asyncio.ensure_future(self._close(name, self._store(name)))
        closing.add_done_callback(lambda _: self._closing.pop(name, None))

    @staticmethod
    async def _close(name: str, store: Any) -> None:
        try:
            await store.close()
        except Exception as exc:
            log.warning("admin listener: closing the %s client failed: %s", name, _why(exc))

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[OperatorServices]:
        """The gateway for one operator call, its stores open."""
        await self._gate.wait()
        self._users += 1
        self._no_users.clear()
        try:
            await self._ensure("session store")
            await self._ensure("profile store")
            yield self.gateway()
        finally:
            self._users -= 1
            if not self._users:
                self._no_users.set()

    def hold(self) -> None:
        """Start no operator call until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def idle(self) -> None:
        """Return once no operator call is in flight."""
        await self._no_users.wait()

    async def close(self) -> None:
        """Close every client (and wait for those being closed)."""
        names = list(self._open)
        for name in names:
            self._drop(name)
        await asyncio.gather(*self._closing.values())


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


# -- the operator API ----------------------------------------------------------------------


class OperatorHandler(_AdminHandler):
    """A call of the operator API: the token first (:func:`gateway.operator.check_token`),
    errors as JSON (:mod:`gateway.errors`), and one audit event per call."""

    #: the audit event's name, per method
    events: dict[str, str] = {}
    #: the audit event's fields naming what the call is about: the path's arguments
    targets: tuple[str, ...] = ()

    def initialize(self, readiness: Readiness, metrics: Metrics, operator: Operator | None = None,
                   token: str = "") -> None:
        super().initialize(readiness, metrics)
        assert operator is not None
        self.operator = operator
        self.token = token
        self.token_id = ""

    def prepare(self) -> None:
        self.token_id = check_token(self.token, self.request.headers.get("Authorization"))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError):
            for name, value in exc.headers.items():
                self.set_header(name, value)
            self.answer(exc.status, exc.body())
            if exc.status >= 500 and exc.detail:
                log.warning("operator API: %s", exc.detail)
        else:
            super().write_error(status_code, **kwargs)

    def on_finish(self) -> None:
        if not self.token:  # the API is off: nobody called it
            return
        event = self.events.get(self.request.method or "", "admin.refused")
        target = dict(zip(self.targets, self.path_args))
        for name in ("identity", "user"):
            if name not in self.targets and self.get_query_arguments(name):
                target[name] = ",".join(self.get_query_arguments(name))
        audit(event, operator=self.token_id or "none", status=self.get_status(), **target)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, GatewayError):
            return  # answered as JSON; audited
        super().log_exception(typ, value, tb)


class UserSessionsHandler(OperatorHandler):
    """``GET``/``DELETE /admin/users/{id}/sessions``."""

    events = {"GET": "admin.sessions.list", "DELETE": "admin.sessions.revoke_user"}
    targets = ("user_id",)

    async def get(self, user_id: str) -> None:
        self.answer(200, await self.operator.user_sessions(user_id))

    async def delete(self, user_id: str) -> None:
        self.answer(200, await self.operator.revoke_user_sessions(user_id))


class SessionHandler(OperatorHandler):
    """``DELETE /admin/sessions/{id}``."""

    events = {"DELETE": "admin.sessions.revoke"}
    targets = ("session_id",)

    async def delete(self, session_id: str) -> None:
        self.answer(200, await self.operator.revoke_session(session_id))


class LockoutHandler(OperatorHandler):
    """``DELETE /admin/lockouts/{provider}/{subject}``."""

    events = {"DELETE": "admin.lockouts.unlock"}
    targets = ("provider", "subject")

    async def delete(self, provider: str, subject: str) -> None:
        self.answer(200, await self.operator.unlock(provider, subject))


class UserHandler(OperatorHandler):
    """``GET /admin/users/{id}``."""

    events = {"GET": "admin.users.get"}
    targets = ("user_id",)

    async def get(self, user_id: str) -> None:
        self.answer(200, await self.operator.user(user_id))


class UsersHandler(OperatorHandler):
    """``GET /admin/users?identity=provider:subject``."""

    events = {"GET": "admin.users.find"}

    async def get(self) -> None:
        identity = self.get_query_argument("identity", "")
        if not identity:
            raise invalid_request("identity: required (provider:subject)")
        self.answer(200, await self.operator.find_user(identity))


class PresenceHandler(OperatorHandler):
    """``GET /admin/presence?user=ID&user=ID...``."""

    events = {"GET": "admin.presence"}

    async def get(self) -> None:
        users = self.get_query_arguments("user")
        self.answer(200, await self.operator.presence(users))


class OnlineHandler(OperatorHandler):
    """``GET /admin/presence/online?limit=...&cursor=...``."""

    events = {"GET": "admin.presence.online"}

    async def get(self) -> None:
        raw = self.get_query_argument("limit", "")
        try:
            limit = int(raw) if raw else None
        except ValueError:
            raise invalid_request("limit: expected a whole number") from None
        self.answer(200, await self.operator.online(limit, self.get_query_argument("cursor", "") or None))


def operator_routes(operator: Operator, token: str, kwargs: Mapping[str, Any]) -> list[Any]:
    """The operator API's routes (see :mod:`gateway.operator`)."""
    args = {**kwargs, "operator": operator, "token": token}
    return [
        (r"/admin/users/([^/]+)/sessions", UserSessionsHandler, args),
        (r"/admin/users/([^/]+)", UserHandler, args),
        (r"/admin/users", UsersHandler, args),
        (r"/admin/sessions/([^/]+)", SessionHandler, args),
        (r"/admin/lockouts/([^/]+)/(.+)", LockoutHandler, args),
        (r"/admin/presence/online", OnlineHandler, args),
        (r"/admin/presence", PresenceHandler, args),
    ]


class AdminNotFound(_AdminHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # DEBUG only: a load balancer probes every few seconds, and what makes
    # /readyz fail is logged by Readiness when it changes.
    log.debug("%d %s %s %.1fms", handler.get_status(), handler.request.method, handler.request.path,
              1000.0 * handler.request.request_time())


def _jwks_handler() -> type[tornado.web.RequestHandler]:
    from gateway.handlers.jwks import AdminJWKSHandler  # (the gateway's handlers, only when needed)

    return AdminJWKSHandler


def make_admin_app(readiness: Readiness, metrics: Metrics, *, operator: Operator | None = None,
                   token: str = "", jwks: KeySet | None = None) -> tornado.web.Application:
    """The admin listener's application; with ``operator``, the operator
    API too (on with a ``token``: ``admin.token``); with ``jwks``, the
    assertion keys at ``/.well-known/jwks.json`` (:mod:`gateway.handlers.jwks`)."""
    kwargs = {"readiness": readiness, "metrics": metrics}
    return tornado.web.Application(
        [(r"/healthz", HealthHandler, kwargs), (r"/readyz", ReadyHandler, kwargs),
         (r"/metrics", MetricsHandler, kwargs)]
        + ([(r"/\.well-known/jwks\.json", _jwks_handler(), {"keys": jwks})] if jwks is not None else [])
        + (operator_routes(operator, token, kwargs) if operator is not None else []),
        default_handler_class=AdminNotFound, default_handler_args=kwargs, log_function=_log_request,
        compress_response=False,
    )
