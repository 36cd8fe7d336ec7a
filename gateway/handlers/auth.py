"""The gateway's own endpoints under ``auth_prefix``: login through any
provider, refresh, logout, logout everywhere, the current session, the
session listing and revocation.

A token in its rotation grace period (replaced by ``/refresh`` moments ago)
still opens ``GET /session`` and ``/logout`` (ending a session is always
safe), like proxied routes; managing sessions (refresh, logout everywhere,
listing or revoking sessions, changing the password) needs the current
token.  A replaced token presented to ``/refresh`` again, in its grace or
after, ends its session (refresh-token reuse detection), unless it came
within ``sessions.refresh_race_window`` of its replacement: that is a
concurrent refresh that lost the race."""

from __future__ import annotations

import re
import time
from typing import Any

import tornado.web

from gateway.api import Endpoint, LoginResult, Principal, Provider
from gateway.app import Gateway
from gateway.errors import GatewayError, not_found, unauthenticated
from gateway.handlers.base import BaseHandler
from gateway.sessions.manager import SupersededToken


class AuthHandler(BaseHandler):
    """Shared helpers of the auth endpoints."""

    async def user_body(self, principal: Principal) -> dict[str, Any]:
        user = await self.gateway.profiles.get_user(principal.user_id)
        return {"id": principal.user_id, "profile": user.profile if user else {}}

    async def start_session(self, result: LoginResult, provider: str, *, status: int = 200) -> None:
        """Create a fresh session for a successful login and answer with it."""
        token, session = await self.gateway.sessions.create(
            result.user.id, provider, ip=self.client_ip,
            user_agent=self.request.headers.get("User-Agent", ""), data=result.session_data,
        )
        self.set_session_cookie(token, session.absolute_expires_at - time.time())
        self.write_json(
            {
                "token": token,
                "token_type": "Bearer",
                "expires_at": session.public()["expires_at"],
                "session": session.public(),
                "user": {"id": result.user.id, "profile": result.user.profile},
            },
            status,
        )


class LoginHandler(AuthHandler):
    """``POST {auth_prefix}/{provider}/login``."""

    provider: Provider

    async def post(self) -> None:
        body = self.json_body()
        result = await self.gateway.call_provider(self.provider, "login", self, body)
        if not isinstance(result, LoginResult):
            raise GatewayError("internal", "an internal error occurred",
                               log_message=f"provider {self.provider.name!r} login returned {type(result).__name__}")
        await self.start_session(result, self.provider.name)


class EndpointHandler(AuthHandler):
    """A provider's :class:`gateway.api.Endpoint`: one method; the answer
    is what its function returns (JSON, a fresh session, or 204)."""

    provider: Provider
    endpoint: Endpoint

    async def _serve(self) -> None:
        if self.request.method != self.endpoint.method:
            raise tornado.web.HTTPError(405)
        result = await self.gateway.call_for(self.provider, f"endpoint {self.endpoint.path}",
                                             self.endpoint.handler, self)
        if isinstance(result, LoginResult):
            await self.start_session(result, self.provider.name, status=201 if result.created else self.endpoint.status)
        elif isinstance(result, dict):
            self.write_json(result, self.endpoint.status)
        elif result is None:
            self.set_status(204)
            self.finish()
        else:
            raise GatewayError("internal", "an internal error occurred",
                               log_message=f"provider {self.provider.name!r} endpoint {self.endpoint.path!r} "
                                           f"returned {type(result).__name__}")

    async def get(self) -> None:
        await self._serve()

    async def post(self) -> None:
        await self._serve()

    async def put(self) -> None:
        await self._serve()

    async def patch(self) -> None:
        await self._serve()

    async def delete(self) -> None:
        await self._serve()


class RefreshHandler(AuthHandler):
    async def post(self) -> None:
        try:
            _, current = await self.own_session(allow_superseded=False)
        except GatewayError as exc:
            if exc.code == "unauthenticated":
                await self._end_if_reused()
            raise
        try:
            token, session = await self.gateway.sessions.refresh(current)
        except LookupError:
            raise unauthenticated("the session has ended") from None
        except SupersededToken:
            raise unauthenticated("this token was already refreshed; use the newer token") from None
        self.set_session_cookie(token, session.absolute_expires_at - time.time())
        self.write_json({"token": token, "token_type": "Bearer", "expires_at": session.public()["expires_at"],
                         "session": session.public()})

    async def _end_if_reused(self) -> None:
        """A token /refresh already replaced, presented here again: someone
        replays it (it may have been stolen), so its session ends, unless
        the request only lost a race to a concurrent /refresh with that
        token (``sessions.refresh_race_window``)."""
        token = self.session_token()
        if not token:
            return
        arrived = time.time() - self.request.request_time()
        reused = await self.gateway.sessions.find_reused(
            token, presented_at=arrived, race_window=self.gateway.config.sessions.refresh_race_window)
        if reused is not None:
            self.check_csrf()  # a cross-site page must not end a session either
            await self.gateway.sessions.end_reused(reused)
            if self._token_source == "cookie":
                self.clear_session_cookie()
            raise unauthenticated("this token was already refreshed and was presented again, "
                                  "so the session has ended; log in again")


class LogoutHandler(AuthHandler):
    async def post(self) -> None:
        principal = await self.require_session()
        assert principal.session is not None
        await self.gateway.sessions.revoke(principal.session.id, "logout")
        self.clear_session_cookie()
        self.set_status(204)
        self.finish()


class LogoutAllHandler(AuthHandler):
    async def post(self) -> None:
        principal = await self.require_session(allow_superseded=False)
        await self.gateway.sessions.revoke_user(principal.user_id, "logout_all")
        self.clear_session_cookie()
        self.set_status(204)
        self.finish()


class SessionHandler(AuthHandler):
    """``GET {auth_prefix}/session``: who am I, and until when."""

    async def get(self) -> None:
        principal, session = await self.own_session()
        self.write_json({"user": await self.user_body(principal), "session": session.public()})


class SessionsHandler(AuthHandler):
    async def get(self) -> None:
        principal = await self.require_session(allow_superseded=False)
        sessions = await self.gateway.sessions.list_user(principal.user_id)
        self.write_json({"sessions": [s.listing(principal.session_id) for s in sessions]})


class SessionItemHandler(AuthHandler):
    async def delete(self, session_id: str) -> None:
        principal = await self.require_session(allow_superseded=False)
        target = await self.gateway.sessions.store.get(session_id)
        if target is None or target.get("user_id") != principal.user_id:
            raise not_found("no such session")
        await self.gateway.sessions.revoke(session_id, "revoked")
        if session_id == principal.session_id:
            self.clear_session_cookie()
        self.set_status(204)
        self.finish()


class AuthNotFoundHandler(AuthHandler):
    """Anything else under ``auth_prefix``: a JSON 404, never proxied."""

    async def prepare(self) -> None:
        raise not_found(f"no gateway endpoint {self.request.path}")


def provider_routes(gateway: Gateway) -> list[tuple[Any, ...]]:
    """Each enabled provider's login and endpoints."""
    p = gateway.auth_path
    out: list[tuple[Any, ...]] = []
    for provider in gateway.providers.values():
        if provider.login_route:
            out.append((p(provider.name, "login"), LoginHandler, {"provider": provider}))
        for endpoint in provider.endpoints():
            out.append((p(provider.name, re.escape(endpoint.path)), EndpointHandler,
                        {"provider": provider, "endpoint": endpoint}))
    return out


def routes(gateway: Gateway) -> list[tuple[Any, ...]]:
    p = gateway.auth_path
    out: list[tuple[Any, ...]] = [
        (p("refresh"), RefreshHandler),
        (p("logout"), LogoutHandler),
        (p("logout-all"), LogoutAllHandler),
        (p("session"), SessionHandler),
        (p("sessions"), SessionsHandler),
        (p("sessions", r"([A-Za-z0-9_\-]{1,64})"), SessionItemHandler),
    ]
    return out


def fallback_routes(gateway: Gateway) -> list[tuple[Any, ...]]:
    prefix = re.escape(gateway.config.server.auth_prefix.rstrip("/"))
    return [(prefix + r"(?:/.*)?", AuthNotFoundHandler)]

