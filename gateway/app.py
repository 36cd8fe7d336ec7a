"""The gateway: its stores, plugins and providers.

:class:`Gateway` is built from a validated :class:`gateway.config.Config` and
a plugin manager (its providers checked by :mod:`gateway.registry`);
:meth:`Gateway.start` opens the stores and sets up the providers, and
:meth:`Gateway.stop` releases everything.  The Tornado application serving
it is :func:`gateway.web.make_app`.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

import pluggy
import tornado.httputil

from gateway import __version__, audit, metrics
from gateway.api import LOGIN_ANSWER, Principal, Provider, RouteView
from gateway.config import Config
from gateway.assertion import Signer
from gateway.consent import Consent
from gateway.crypto import Sealer, parse_key
from gateway.errors import GatewayError
from gateway.logs import install_redaction
from gateway.options import ConfigError
from gateway.plugins import (
    call_hook,
    get_plugin_manager,
    maybe_await,
    notify_hook,
    plugin_failure,
    plugin_names,
)
from gateway.preferences import Preferences
from gateway.ratelimit import RateLimiter
from gateway.profiles import ProfileStore, open_profile_store
from gateway.proxy.policy import Credentials, canonical
from gateway.proxy.upstream import UpstreamClient
from gateway.registry import SESSION_TOKEN_PREFIX, build_provider, check_providers
from gateway.routing import Route, RouteTable
from gateway.sessions import SessionManager, open_session_store
from gateway.state import SharedState, open_shared_state

log = logging.getLogger("gateway.app")


class Gateway:
    """One gateway: its stores, providers and plugins.  What a provider may
    use of it is :class:`gateway.api.Services`."""

    def __init__(self, config: Config, pm: pluggy.PluginManager | None = None) -> None:
        self.config = config
        self.pm = pm if pm is not None else get_plugin_manager(config.plugins.disabled)
        offered, problems = check_providers(config, self.pm)
        if problems:
            raise ConfigError(problems)
        #: how credentials begin: the session token's, and every loaded provider's
        prefixes = (SESSION_TOKEN_PREFIX,) + tuple(dict.fromkeys(
            p for o in offered for p in o.cls.credential_prefixes))
        self.credentials = Credentials(
            prefixes, headers=[h for o in offered for h in o.cls.credential_header_names])
        install_redaction(prefixes=prefixes, loggers=[f"gateway.{o.cls.name}" for o in offered])
        #: headers only providers set upstream (a switched-off one's too: an
        #: upstream may still trust them), dropped from every incoming request
        self.reserved_headers = frozenset(canonical(h) for o in offered for h in o.cls.reserved_headers) \
            | frozenset(canonical(h) for h in config.profiles.upstream_headers)  # the gateway's own profile headers
        self.routes = RouteTable([Route.from_config(r) for r in config.routes])
        #: signs X-Gateway-Assertion and publishes its keys (each key parsed once, here)
        self.assertions = Signer.from_config(config.assertion)
        self.session_store = open_session_store(config.sessions)
        #: counters, values with a TTL and locks shared by every process
        self.state: SharedState = open_shared_state(config.sessions, self.session_store)
        self.profiles: ProfileStore = open_profile_store(config.profiles)
        #: the consent documents and users' history of accepting them
        self.consent = Consent(config.consent, self.profiles)
        #: the fields users edit themselves, and the profile headers sent upstream
        self.preferences = Preferences(config.profiles, self.profiles)
        s = config.sessions
        self.sessions = SessionManager(
            self.session_store,
            idle_timeout=s.idle_timeout,
            absolute_timeout=s.absolute_timeout,
            touch_interval=s.touch_interval,
            rotation_grace=s.rotation_grace,
            max_per_user=s.max_per_user,
            events=self._session_event,
            remember_idle_timeout=s.remember_idle_timeout if s.remember != "never" else None,
            remember_absolute_timeout=s.remember_absolute_timeout if s.remember != "never" else None,
        )
        key = config.sessions.encryption_key
        #: seals secrets kept in session data; a per-process key when none is configured
        self.sealer = Sealer(parse_key(key)) if key else Sealer.generate()
        #: the plugins' own counters (Services.metrics), one registry per process
        self.metrics: metrics.PluginMetrics = metrics.PLUGIN_METRICS
        built: dict[str, Provider] = {}
        for o in offered:
            try:
                built[o.cls.name] = build_provider(o, self)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        self.providers: dict[str, Provider] = {name: p for name, p in built.items() if p.enabled}
        #: the [[rate_limits]] (or the default on logins), matched to routes and endpoints once
        self.rate_limits = self._rate_limiter()
        #: providers that authenticate requests themselves, in name order
        self._authenticators = [p for _, p in sorted(self.providers.items())
                                if type(p).authenticate is not Provider.authenticate]
        self.http_client: UpstreamClient | None = None
        #: requests being handled now (a graceful stop waits for them)
        self.requests_in_flight = 0
        #: set when a graceful stop begins: responses then carry Connection: close
        self.draining = False
        self.socket_watcher: Any = None
        #: when (time.monotonic()) a request was last answered 503 for a store that failed
        self.store_failed_at = float("-inf")

    async def start(self) -> None:
        """Open the stores and set up providers and plugins."""
        self.http_client = UpstreamClient(self.config.server.upstream_max_connections)
        await self.session_store.open()
        await self.state.open()
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
        if self.socket_watcher is not None:
            self.socket_watcher.close_all()
        if self.http_client is not None:
            await self.http_client.close()
            self.http_client = None
        await self.state.close()
        await self.session_store.close()
        await self.profiles.close()

    def _rate_limiter(self) -> RateLimiter:
        auth = self.config.server.auth_prefix.rstrip("/")
        endpoints: list[str] = []
        logins: list[str] = []
        for provider in self.providers.values():
            if provider.login_route:
                endpoints.append(f"{auth}/{provider.name}/login")
                logins.append(endpoints[-1])
            for endpoint in provider.endpoints():
                endpoints.append(f"{auth}/{provider.name}/{endpoint.path}")
                if endpoint.response_schema is not None and dict(endpoint.response_schema) == dict(LOGIN_ANSWER):
                    logins.append(endpoints[-1])  # answers with a fresh session (a registration)
        return RateLimiter.build(self.state, self.config.rate_limits, auth_prefix=auth,
                                 route_prefixes=[r.prefix for r in self.config.routes],
                                 endpoints=endpoints, login_paths=logins)

    @property
    def upstream_client(self) -> UpstreamClient:
        """The pooled client for upstream requests (created by :meth:`start`)."""
        if self.http_client is None:
            raise RuntimeError("Gateway.start() has not been called")
        return self.http_client

    def auth_path(self, *parts: str) -> str:
        """A route pattern under ``auth_prefix`` (parts may be regexes)."""
        return re.escape(self.config.server.auth_prefix.rstrip("/")) + "/" + "/".join(parts) + "/?"

    # -- plugin calls -----------------------------------------------------------

    async def call_provider(self, provider: Provider, method: str, *args: Any) -> Any:
        """Call a provider method; non-gateway exceptions become a logged 500."""
        return await self.call_for(provider, method, getattr(provider, method), *args)

    async def call_for(self, provider: Provider, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` (a provider's ``what``) and await what it returns;
        non-gateway exceptions become a logged 500 naming the provider."""
        try:
            return await maybe_await(fn(*args))
        except GatewayError:
            raise
        except Exception as exc:
            raise plugin_failure(f"provider {provider.name}", what, exc) from exc

    async def authenticate_request(self, request: tornado.httputil.HTTPServerRequest) -> Principal | None:
        """A request without a live session: the providers that authenticate
        requests (in name order), then ``gateway_authenticate``."""
        for provider in self._authenticators:
            found = await self.call_provider(provider, "authenticate", request)
            if found is not None:
                return self._principal(found, f"provider {provider.name!r} authenticate")
        results = await call_hook(self.pm, "gateway_authenticate", request=request, gateway=self)
        return self._principal(results[0], "gateway_authenticate") if results else None

    @staticmethod
    def _principal(value: Any, source: str) -> Principal:
        if not isinstance(value, Principal):
            raise GatewayError("internal", "an internal error occurred",
                               log_message=f"{source} returned {type(value).__name__}, not a Principal")
        return value

    async def upstream_headers(self, request: tornado.httputil.HTTPServerRequest, principal: Principal | None,
                               route: RouteView) -> list[dict[str, str]]:
        """Headers for the upstream: the caller's own provider's, then every
        ``gateway_upstream_headers`` implementation's."""
        out: list[dict[str, str]] = []
        provider = self.providers.get(principal.provider) if principal is not None else None
        if provider is not None and principal is not None:
            headers = await self.call_provider(provider, "upstream_headers", principal)
            if headers:
                out.append(headers)
        out.extend(await call_hook(self.pm, "gateway_upstream_headers", request=request, principal=principal,
                                   route=route, gateway=self))
        return out

    async def _session_event(self, hook: str, **kwargs: Any) -> None:
        """Session events are notifications: a failing listener is logged,
        never undoes what happened."""
        session = kwargs.get("session")
        metrics.session_event(hook, provider=getattr(session, "provider", None), reason=kwargs.get("reason"))
        if hook == "gateway_session_revoked" and session is not None:
            reason = kwargs.get("reason")
            audit.record("session_revoked", user_id=session.user_id, session_id=session.id,
                         provider=session.provider, reason=reason,
                         by=audit.actor() or ("gateway" if reason == "max_per_user" else "user"))
        await notify_hook(self.pm, hook, gateway=self, **kwargs)

    def audit(self, event: str, **fields: Any) -> None:
        """An audit log line (:func:`gateway.audit.record`): what plugins call."""
        audit.record(event, **fields)
