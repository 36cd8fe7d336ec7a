"""A plugin used by the tests: implements every hook and records what it saw."""

from __future__ import annotations

from gateway import hookimpl
from gateway.api import GatewayError, LoginResult, Principal, Provider
from gateway.handlers.base import BaseHandler

events: list[tuple] = []


class BrokenProvider(Provider):
    """A provider whose login fails with an unexpected exception."""

    name = "broken"

    async def login(self, request, body):
        raise ValueError("secret-detail-that-must-not-leak")


class GuestProvider(Provider):
    """Logs anybody in as a guest named in the body."""

    name = "guest"

    async def login(self, request, body):
        nick = request.field(body, "nick", str)
        user, _, created = await self.gateway.profiles.resolve_identity("guest", nick, profile={"nick": nick})
        return LoginResult(user=user, created=created, session_data={"nick": nick})

    def credential_headers(self, request):
        # the X-Test-Key that gateway_authenticate reads is this plugin's credential
        return ["X-Test-Key"] if "X-Test-Key" in request.headers else []


class PingHandler(BaseHandler):
    async def get(self):
        principal = await self.get_principal()
        self.write_json({"pong": True, "user": principal.user_id if principal else None})


@hookimpl
def gateway_providers():
    return [BrokenProvider, GuestProvider]


@hookimpl
def gateway_authenticate(request):
    key = request.headers.get("X-Test-Key")
    if key == "let-me-in":
        return Principal(user_id="u_key", provider="testkey", scopes=["read", "write"],
                         headers_to_strip=("X-Test-Key",))
    if key == "explode":
        raise RuntimeError("boom-detail-that-must-not-leak")
    if key == "refuse":
        raise GatewayError("forbidden", "this key is blocked")
    return None


@hookimpl
async def gateway_session_created(session):
    events.append(("created", session.id, session.provider))


@hookimpl
def gateway_session_refreshed(session, previous_session):
    events.append(("refreshed", session.id, previous_session.token_hash != session.token_hash))


@hookimpl
def gateway_session_revoked(session, reason):
    events.append(("revoked", session.id, reason))


@hookimpl
def gateway_upstream_headers(principal, route):
    return {"X-Route-Prefix": route.prefix, "X-Session-Id": "forged"}


@hookimpl
def gateway_handlers(gateway):
    return [(gateway.auth_path("test", "ping"), PingHandler)]


@hookimpl
async def gateway_startup(gateway):
    events.append(("startup", sorted(gateway.providers)))
