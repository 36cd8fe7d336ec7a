"""The gateway: stores, plugins, providers and the Tornado application.

:class:`Gateway` is built from a validated :class:`gateway.config.Config` and
a plugin manager; :meth:`Gateway.start` opens the stores and sets up the
providers, :meth:`Gateway.make_app` builds the Tornado application (provider
and plugin routes first, the gateway's own endpoints, the proxy catch-all
last) and :meth:`Gateway.stop` releases everything.
"""

from __future__ import annotations

import inspect
import logging
import re
from importlib.metadata import entry_points
from typing import Any

import pluggy
import tornado.web

from gateway import __version__
from gateway.config import Config, ConfigError, validate_table
from gateway.crypto import Sealer, parse_key
from gateway.errors import GatewayError
from gateway.handlers import auth as auth_handlers
from gateway import proxy
from gateway.proxy.policy import canonical
from gateway.proxy.upstream import UpstreamClient
from gateway.logs import install_redaction
from gateway.plugins import (
    ENTRY_POINT_GROUP,
    call_hook,
    get_plugin_manager,
    implementations,
    maybe_await,
    notify_hook,
    plugin_failure,
    plugin_names,
)
from gateway.profiles import ProfileStore, open_profile_store
from gateway.providers import Provider
from gateway.requestinfo import Principal
from gateway.routing import Route, RouteTable
from gateway.sessions import SessionManager, open_session_store

log = logging.getLogger("gateway.app")
_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")
#: Path segments of the gateway's own endpoints under auth_prefix.
RESERVED_NAMES = frozenset({"refresh", "logout", "logout-all", "session", "sessions"})


class Gateway:
    def __init__(self, config: Config, pm: pluggy.PluginManager | None = None) -> None:
        install_redaction()
        self.config = config
        self.pm = pm if pm is not None else get_plugin_manager(config.plugins.disabled)
        self.routes = RouteTable([Route.from_section(r) for r in config.routes])
        self.session_store = open_session_store(config.sessions)
        self.profiles: ProfileStore = open_profile_store(config.profiles)
        s = config.sessions
        self.sessions = SessionManager(
            self.session_store,
            idle_timeout=s.idle_timeout,
            absolute_timeout=s.absolute_timeout,
            touch_interval=s.touch_interval,
            rotation_grace=s.rotation_grace,
            max_per_user=s.max_per_user,
            events=self._session_event,
        )
        key = config.sessions.encryption_key
        #: seals secrets kept in session data; a per-process key when none is configured
        self.sealer = Sealer(parse_key(key)) if key else Sealer.generate()
        self.providers: dict[str, Provider] = self._build_providers()
        self.http_client: UpstreamClient | None = None
        #: requests being handled now (a graceful stop waits for them)
        self.requests_in_flight = 0
        #: set when a graceful stop begins: responses then carry Connection: close
        self.draining = False

    # -- set-up ---------------------------------------------------------------

    def _build_time_hook(self, name: str) -> list[tuple[str, list[Any]]]:
        """Call a hook the gateway needs while it is being built (so it must
        answer synchronously, with a list); every problem names its plugin."""
        out = []
        for impl in implementations(self.pm, name):
            try:
                result: Any = impl.function(**{a: self for a in impl.argnames})
            except Exception as exc:
                raise ConfigError([f"plugin {impl.plugin_name!r}: {name} failed: {exc!r}"]) from exc
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise ConfigError([f"plugin {impl.plugin_name!r}: {name} must answer synchronously"])
            if result is None:
                continue
            if not isinstance(result, (list, tuple)):
                raise ConfigError([f"plugin {impl.plugin_name!r}: {name} must return a list, got {type(result).__name__}"])
            out.append((impl.plugin_name, list(result)))
        return out

    def _provider_classes(self) -> list[tuple[str, type[Provider]]]:
        return [(plugin, cls) for plugin, classes in self._build_time_hook("gateway_providers") for cls in classes]

    def _build_providers(self) -> dict[str, Provider]:
        problems: list[str] = []
        providers: dict[str, Provider] = {}
        offered: set[str] = set()  # names some plugin provides, built or not
        for plugin, cls in self._provider_classes():
            if not (isinstance(cls, type) and issubclass(cls, Provider)):
                problems.append(f"plugin {plugin!r}: gateway_providers must return Provider subclasses, got {cls!r}")
                continue
            if not _PROVIDER_NAME.match(cls.name or ""):
                problems.append(f"plugin {plugin!r}: provider name {cls.name!r} is not a lowercase identifier")
                continue
            if cls.name in RESERVED_NAMES:
                problems.append(f"plugin {plugin!r}: provider name {cls.name!r} is one of the gateway's own endpoints")
                continue
            if cls.name in offered:
                problems.append(f"providers.{cls.name}: two plugins provide {cls.name!r}")
                continue
            offered.add(cls.name)
            settings = validate_table(f"providers.{cls.name}", cls.options,
                                      self.config.providers.get(cls.name, {}), problems, self.config.environ)
            try:
                providers[cls.name] = cls(self, settings)
            except ConfigError as exc:
                problems.extend(exc.problems)
            except Exception as exc:
                problems.append(f"providers.{cls.name}: the provider from plugin {plugin!r} failed to start: {exc!r}")
        for name in self.config.providers:
            if name not in offered:
                problems.append(f"providers.{name}: no installed plugin provides {name!r}")
        known = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | {n for n, _ in self.pm.list_name_plugin()}
        for name in self.config.plugins.disabled:
            if name not in known:
                problems.append(f"plugins.disabled: no installed plugin is named {name!r}")
        if problems:
            raise ConfigError(problems)
        #: headers only providers set upstream (a switched-off one's too: an
        #: upstream may still trust them), dropped from every incoming request
        self.reserved_headers = frozenset(canonical(h) for p in providers.values()
                                          for h in p.reserved_headers)
        return {name: p for name, p in providers.items() if p.enabled}

    async def start(self) -> None:
        """Open the stores and set up providers and plugins."""
        self.http_client = UpstreamClient(self.config.server.upstream_max_connections)
        await self.session_store.open()
        await self.profiles.open()
        for provider in self.providers.values():
            await self.call_provider(provider, "setup")
        await call_hook(self.pm, "gateway_startup", gateway=self)
        log.info("gateway %s: plugins %s; providers %s; sessions in %s; profiles in %s",
                 __version__, ", ".join(plugin_names(self.pm)), ", ".join(self.providers) or "none",
                 self.session_store.name, self.profiles.name)

    async def stop(self) -> None:
        for provider in self.providers.values():
            try:
                await provider.close()
            except Exception:
                log.exception("provider %r failed to close", provider.name)
        watcher = getattr(self, "socket_watcher", None)
        if watcher is not None:
            watcher.close_all()
        if self.http_client is not None:
            await self.http_client.close()
            self.http_client = None
        await self.session_store.close()
        await self.profiles.close()

    @property
    def upstream_client(self) -> UpstreamClient:
        """The pooled client for upstream requests (created by :meth:`start`)."""
        if self.http_client is None:
            raise RuntimeError("Gateway.start() has not been called")
        return self.http_client

    def auth_path(self, *parts: str) -> str:
        """A route pattern under ``auth_prefix`` (parts may be regexes)."""
        return re.escape(self.config.server.auth_prefix.rstrip("/")) + "/" + "/".join(parts) + "/?"

    def make_app(self, **settings: Any) -> tornado.web.Application:
        handlers: list[Any] = []
        for provider in self.providers.values():
            handlers.extend(provider.handlers())
        for _, contributed in self._build_time_hook("gateway_handlers"):
            handlers.extend(contributed)
        handlers += auth_handlers.routes(self)
        handlers += auth_handlers.fallback_routes(self)
        handlers += proxy.routes(self)
        return tornado.web.Application(
            handlers, gateway=self, default_handler_class=auth_handlers.AuthNotFoundHandler,
            log_function=self._log_request, compress_response=False, **settings,
        )

    @staticmethod
    def _log_request(handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        # The path only: query strings may carry secrets (codes, tokens).
        logging.getLogger("gateway.access").log(
            level, "%d %s %s %.1fms", status, handler.request.method, handler.request.path,
            1000.0 * handler.request.request_time(),
        )

    # -- plugin calls -----------------------------------------------------------

    async def call_provider(self, provider: Provider, method: str, *args: Any) -> Any:
        """Call a provider method; non-gateway exceptions become a logged 500."""
        try:
            return await maybe_await(getattr(provider, method)(*args))
        except GatewayError:
            raise
        except Exception as exc:
            raise plugin_failure(f"provider {provider.name}", method, exc) from exc

    async def authenticate_request(self, request: Any) -> Principal | None:
        results = await call_hook(self.pm, "gateway_authenticate", request=request, gateway=self)
        if results and not isinstance(results[0], Principal):
            raise GatewayError("internal", "an internal error occurred",
                               log_message=f"gateway_authenticate returned {type(results[0]).__name__}, not a Principal")
        return results[0] if results else None

    async def upstream_headers(self, request: Any, principal: Principal | None, route: Route) -> list[dict[str, str]]:
        return await call_hook(self.pm, "gateway_upstream_headers", request=request, principal=principal,
                               route=route, gateway=self)

    async def _session_event(self, hook: str, **kwargs: Any) -> None:
        """Session events are notifications: a failing listener is logged,
        never undoes what happened."""
        await notify_hook(self.pm, hook, gateway=self, **kwargs)
