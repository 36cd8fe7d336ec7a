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
from typing import Any, ClassVar, Mapping

import tornado.web

from gateway import audit, metrics
from gateway.api import Endpoint, LoginResult, Principal, Provider
from gateway.app import Gateway
from gateway.errors import GatewayError, not_found, unauthenticated
from gateway.handlers.base import BaseHandler
from gateway.handlers.consent import ConsentHandler, ConsentItemHandler, login_consent
from gateway.handlers.jwks import JWKSHandler
from gateway.handlers.openapi import OpenAPIHandler
from gateway.handlers.profile import ProfileHandler
from gateway.openapi import Operation, Published, endpoint_operation, login_operation, ref
from gateway.sessions.manager import Session, SupersededToken


class AuthHandler(BaseHandler):
    """Shared helpers of the auth endpoints."""

    async def user_body(self, principal: Principal) -> dict[str, Any]:
        user = await self.gateway.profiles.get_user(principal.user_id)
        return {"id": principal.user_id, "profile": user.profile if user else {}}

    def remember(self) -> bool:
        """Is the session a login starts now remembered?  ``sessions.remember``
        decides, or (``"optional"``) the body's ``"remember"`` (default
        false; a non-boolean is a 400 whatever the setting)."""
        try:
            body = self.json_body()
        except GatewayError:
            body = {}  # a provider endpoint that reads no JSON body
        asked = bool(self.field(body, "remember", bool, default=False))
        policy = self.gateway.config.sessions.remember
        return policy == "always" or (policy == "optional" and asked)

    def set_cookie_for(self, token: str, session: Session) -> None:
        """A remembered session's cookie lasts as long as the session may
        (``Max-Age``); any other is a browser-session cookie."""
        self.set_session_cookie(token, session.absolute_expires_at - time.time() if session.remembered else None)

    async def start_session(self, result: LoginResult, provider: str, *, status: int = 200) -> None:
        """Create a fresh session for a successful login and answer with it.
        The login's JSON body (if it had one) is ``self.json_body()``."""
        token, session = await self.gateway.sessions.create(
            result.user.id, provider, ip=self.client_ip,
            user_agent=self.request.headers.get("User-Agent", ""), data=result.session_data,
            remember=self.remember(),
        )
        self.set_cookie_for(token, session)
        # The request is now the new session's (the access line names it).
        self._principal = Principal(user_id=result.user.id, provider=provider, session=session)
        self._principal_resolved = True
        if result.created:
            audit.record("registration", provider=provider, user_id=result.user.id)
        audit.record("login", provider=provider, user_id=result.user.id, session_id=session.id,
                     created=result.created, remembered=session.remembered)
        consent = await login_consent(self, result.user.id, session.id)  # the body's "accept"; consent_required
        self.write_json(
            {
                "token": token,
                "token_type": "Bearer",
                "expires_at": session.public()["expires_at"],
                "session": session.public(),
                "user": {"id": result.user.id, "profile": result.user.profile},
                **consent,
            },
            status,
        )


class LoginHandler(AuthHandler):
    """``POST {auth_prefix}/{provider}/login``."""

    provider: Provider

    @classmethod
    def operations_for(cls, provider: Provider) -> Mapping[str, Operation]:
        return {"post": login_operation(provider)}

    async def post(self) -> None:
        try:
            await self._login()
        except Exception as exc:  # counted by the refusal's error code
            code = exc.code if isinstance(exc, GatewayError) else "internal"
            metrics.login(self.provider.name, code)
            audit.record("login_failed", provider=self.provider.name, error=code,
                         reason=exc.fields.get("reason") if isinstance(exc, GatewayError) else None)
            raise
        metrics.login(self.provider.name, "ok")

    async def _login(self) -> None:
        body = self.json_body()
        self.remember()  # a bad "remember" is refused before the provider acts
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

    @classmethod
    def operations_for(cls, provider: Provider, endpoint: Endpoint) -> Mapping[str, Operation]:
        return {endpoint.method.lower(): endpoint_operation(provider, endpoint)}

    def allowed_methods(self) -> list[str]:
        return [self.endpoint.method]

    async def _serve(self) -> None:
        if self.request.method != self.endpoint.method:
            raise tornado.web.HTTPError(405)
        self.remember()  # a bad "remember" is refused before the endpoint acts (a registration, say)
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
    operations: ClassVar[Mapping[str, Operation]] = {"post": Operation(
        "Replace the session's token", {200: ref("Refreshed")}, session=True,
        description="The replaced token keeps working for `sessions.rotation_grace` for proxied requests, "
                    "`GET /session` and logout only; presented here again, it ends the session.")}

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
            raise await self.unauthenticated_error(self.session_token()) from None
        except SupersededToken:  # a concurrent /refresh won: the cookie may be its newer one already
            raise unauthenticated("this token was already refreshed; use the newer token",
                                  reason="superseded") from None
        self.set_cookie_for(token, session)  # the same kind of session, the same kind of cookie
        audit.record("refresh", user_id=session.user_id, session_id=session.id, provider=session.provider)
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
            audit.record("refresh_reused", user_id=reused.user_id, session_id=reused.id, provider=reused.provider)
            with audit.acting("gateway"):
                await self.gateway.sessions.end_reused(reused)
            if self._token_source == "cookie":
                self.clear_session_cookie()
            raise unauthenticated("this token was already refreshed and was presented again, "
                                  "so the session has ended; log in again", reason="revoked")


class LogoutHandler(AuthHandler):
    operations: ClassVar[Mapping[str, Operation]] = {"post": Operation(
        "End this session and clear the cookie", {204: None}, session=True)}

    async def post(self) -> None:
        principal = await self.require_session()
        assert principal.session is not None
        await self.gateway.sessions.revoke(principal.session.id, "logout")
        audit.record("logout", user_id=principal.user_id, session_id=principal.session.id,
                     provider=principal.provider)
        self.clear_session_cookie()
        self.set_status(204)
        self.finish()


class LogoutAllHandler(AuthHandler):
    operations: ClassVar[Mapping[str, Operation]] = {"post": Operation(
        "End every session of this user", {204: None}, session=True)}

    async def post(self) -> None:
        principal = await self.require_session(allow_superseded=False)
        ended = await self.gateway.sessions.revoke_user(principal.user_id, "logout_all")
        audit.record("logout_all", user_id=principal.user_id, session_id=principal.session_id,
                     provider=principal.provider, sessions_ended=len(ended))
        self.clear_session_cookie()
        self.set_status(204)
        self.finish()


class SessionHandler(AuthHandler):
    """``GET {auth_prefix}/session``: who am I, and until when."""

    operations: ClassVar[Mapping[str, Operation]] = {"get": Operation(
        "Who is calling, and until when", {200: {
            "type": "object", "required": ["user", "session"],
            "properties": {"user": ref("User"), "session": ref("Session")}}}, session=True)}

    async def get(self) -> None:
        principal, session = await self.own_session()
        self.write_json({"user": await self.user_body(principal), "session": session.public()})


class SessionsHandler(AuthHandler):
    operations: ClassVar[Mapping[str, Operation]] = {"get": Operation(
        "This user's sessions", {200: {
            "type": "object", "required": ["sessions"],
            "properties": {"sessions": {"type": "array", "items": ref("SessionListing")}}}}, session=True)}

    async def get(self) -> None:
        principal = await self.require_session(allow_superseded=False)
        sessions = await self.gateway.sessions.list_user(principal.user_id)
        self.write_json({"sessions": [s.listing(principal.session_id) for s in sessions]})


class SessionItemHandler(AuthHandler):
    operations: ClassVar[Mapping[str, Operation]] = {"delete": Operation(
        "End one of this user's sessions", {204: None}, session=True, errors=(404,))}

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
        (p("consent"), ConsentHandler, {"consent": gateway.consent}),
        (p("consent", r"([a-z0-9][a-z0-9_\-]{0,31})"), ConsentItemHandler, {"consent": gateway.consent}),
        (p("profile"), ProfileHandler, {"preferences": gateway.preferences}),
        (p(re.escape("openapi.json")), OpenAPIHandler, {"published": Published()}),
        (p(re.escape(".well-known"), re.escape("jwks.json")), JWKSHandler, {"keys": gateway.assertions.published}),
    ]
    return out


def fallback_routes(gateway: Gateway) -> list[tuple[Any, ...]]:
    prefix = re.escape(gateway.config.server.auth_prefix.rstrip("/"))
    return [(prefix + r"(?:/.*)?", AuthNotFoundHandler)]

