"""The public provider API (gateway.api), driven the way a third-party
team's provider uses it: its own login, endpoints, request
authentication, credential rules, upstream headers, records and checks."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
import tornado.httputil

from gateway import hookimpl
from gateway.api import (
    STR,
    Collection,
    ConfigContext,
    Endpoint,
    LoginResult,
    Option,
    Principal,
    Provider,
    Request,
    Section,
    invalid_credentials,
)
from gateway.plugins import get_plugin_manager
from gateway.testing import assert_error, base_config, body

TICKET = "tkt_" + "T" * 24
NOTES = Collection("ticket_notes", indexes=("user_id",))


class TicketProvider(Provider):
    """Tickets for scripts, and a small login for people."""

    name = "ticket"
    credential_prefixes = ("tkt_",)
    credential_header_names = ("X-Ticket",)
    reserved_headers = ("X-Ticket-Account",)
    collections = (NOTES,)
    options = [Option("account", STR, "acme", "the account tickets belong to")]

    @classmethod
    def check_config(cls, settings: Section, context: ConfigContext) -> list[str]:
        return ["providers.ticket.account: must not be \"forbidden\""] if settings.account == "forbidden" else []

    async def login(self, request: Request, body: dict[str, Any]) -> LoginResult:
        nick = request.field(body, "nick", str)
        user, _, created = await self.gateway.profiles.resolve_identity(self.name, nick, profile={"nick": nick})
        return LoginResult(user=user, created=created)

    async def authenticate(self, request: tornado.httputil.HTTPServerRequest) -> Principal | None:
        presented = request.headers.get("X-Ticket")
        if presented is None:
            return None
        self.log.warning("ticket presented: %s", presented)  # redacted by the gateway
        if presented != TICKET:
            raise invalid_credentials("the ticket is not valid")
        return Principal(user_id="u_ticket", provider=self.name, scopes=["read"])

    def upstream_headers(self, principal: Principal) -> dict[str, str] | None:
        return {"X-Ticket-Account": self.settings.account}

    async def whoami(self, request: Request) -> dict[str, Any]:
        principal = await request.require_session()
        return {"user": principal.user_id}

    async def signup(self, request: Request) -> LoginResult:
        nick = request.field(request.json_body(), "nick", str)
        user, _, created = await self.gateway.profiles.resolve_identity(self.name, nick, profile={"nick": nick})
        return LoginResult(user=user, created=created)

    async def add_note(self, request: Request) -> dict[str, Any]:
        principal = await request.require_session()
        text = request.field(request.json_body(), "text", str)
        notes = self.gateway.profiles.records(NOTES)
        await notes.insert({"id": secrets.token_hex(4), "user_id": principal.user_id, "text": text})
        return {"notes": [n["text"] for n in await notes.find("user_id", principal.user_id)]}

    async def forget(self, request: Request) -> None:
        principal = await request.require_session()
        for note in await self.gateway.profiles.records(NOTES).find("user_id", principal.user_id):
            await self.gateway.profiles.records(NOTES).delete(note["id"])

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("whoami", self.whoami, method="GET"), Endpoint("signup", self.signup),
                Endpoint("notes", self.add_note), Endpoint("notes/forget", self.forget, method="DELETE")]


class TicketPlugin:
    @hookimpl
    def gateway_providers(self) -> list[type[Provider]]:
        return [TicketProvider]


def with_tickets(**extra: Any) -> Any:
    return get_plugin_manager(extra_plugins=[("ticket-plugin", TicketPlugin())], **extra)


@pytest.fixture
def tgw(make_gateway, upstream, tmp_path, io_loop):
    return io_loop.run_sync(lambda: make_gateway(base_config(upstream.url, tmp_path), pm=with_tickets()))


@pytest.mark.gen_test
async def test_login_and_endpoints_answer_as_the_functions_say(tgw):
    client = tgw.client
    r = await client.request("POST", "/auth/ticket/signup", json_body={"nick": "ann"})
    assert r.code == 201, r.body  # a LoginResult that created its user
    token = body(r)["token"]
    assert body(r)["user"]["profile"] == {"nick": "ann"}
    again = await client.request("POST", "/auth/ticket/signup", json_body={"nick": "ann"})
    assert again.code == 200 and body(again)["user"]["id"] == body(r)["user"]["id"]
    assert (await client.login_with("ticket", {"nick": "ann"}))["user"]["id"] == body(r)["user"]["id"]

    r = await client.request("GET", "/auth/ticket/whoami", token=token)
    assert r.code == 200 and body(r) == {"user": body(again)["user"]["id"]}
    assert_error(await client.request("POST", "/auth/ticket/whoami", token=token, json_body={}), 405,
                 "method_not_allowed")
    assert_error(await client.request("GET", "/auth/ticket/whoami"), 401, "unauthenticated")
    assert_error(await client.request("POST", "/auth/ticket/notes", token=token, json_body={}), 400,
                 "invalid_request")

    r = await client.request("POST", "/auth/ticket/notes", token=token, json_body={"text": "first"})
    r = await client.request("POST", "/auth/ticket/notes", token=token, json_body={"text": "second"})
    assert r.code == 200 and body(r) == {"notes": ["first", "second"]}
    stored = await tgw.gateway.profiles.records(NOTES).find("user_id", body(again)["user"]["id"])
    assert [n["text"] for n in stored] == ["first", "second"]
    r = await client.request("DELETE", "/auth/ticket/notes/forget", token=token)
    assert r.code == 204 and r.body == b""
    assert await tgw.gateway.profiles.records(NOTES).find("user_id", body(again)["user"]["id"]) == []


@pytest.mark.gen_test
async def test_a_provider_authenticates_requests_and_sets_its_reserved_headers(tgw, upstream, caplog):
    caplog.set_level(logging.WARNING)
    r = await tgw.client.request("GET", "/api/orders", headers={"X-Ticket": TICKET, "X-Ticket-Account": "forged"})
    assert r.code == 200, r.body
    seen = upstream.last
    assert (seen.header("X-User-Id"), seen.header("X-Auth-Provider"), seen.header("X-Auth-Scopes")) == \
        ("u_ticket", "ticket", "read")
    assert seen.header("X-Ticket-Account") == "acme"  # the provider's, never the client's
    assert seen.header("X-Ticket") is None  # the credential never reaches the upstream
    assert TICKET not in caplog.text and "tkt_[redacted]" in caplog.text

    assert_error(await tgw.client.request("GET", "/api/orders", headers={"X-Ticket": "tkt_wrong"}), 401,
                 "invalid_credentials")
    r = await tgw.client.request("GET", "/public/x", headers={"X-Ticket-Account": "forged"})
    assert r.code == 200 and upstream.last.header("X-Ticket-Account") is None


@pytest.mark.gen_test
async def test_a_declared_credential_prefix_never_travels_upstream(tgw, upstream):
    r = await tgw.client.request("GET", "/public/x", headers={"Authorization": f"Bearer {TICKET}"})
    assert r.code == 200 and upstream.last.header("Authorization") is None
    r = await tgw.client.request("GET", f"/public/x?t={TICKET}")
    assert_error(r, 400, "invalid_request")
    assert "query string" in body(r)["message"] and "X-Ticket" in body(r)["message"]
    r = await tgw.client.request("GET", "/public/x", headers={"X-Note": f"mine is {TICKET}"})
    assert_error(r, 400, "invalid_request")


@pytest.mark.gen_test
async def test_without_the_plugin_its_rules_are_gone(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_config(upstream.url, tmp_path), pm=get_plugin_manager())
    r = await gw.client.request("GET", f"/public/x?t={TICKET}", headers={"X-Ticket": TICKET})
    assert r.code == 200 and upstream.last.header("X-Ticket") == TICKET
    assert_error(await gw.client.request("GET", "/auth/ticket/whoami"), 404, "not_found")


def test_provider_checks_run_without_building_a_gateway(tmp_path: Path):
    from gateway.app import Gateway
    from gateway.cli import check
    from gateway.config import ConfigError, load_config

    db = tmp_path / "profiles.db"
    config = load_config(data={"profiles": {"sqlite_path": str(db)},
                               "providers": {"ticket": {"account": "forbidden", "colour": "red"}}}, environ={})
    problems = check(config, with_tickets())  # every check runs: check-config lists all at once
    assert problems == ["providers.ticket.colour: unknown key", "providers.ticket.account: must not be \"forbidden\""]
    config = load_config(data={"profiles": {"sqlite_path": str(db)},
                               "providers": {"ticket": {"account": "forbidden"}}}, environ={})
    assert check(config, with_tickets()) == ["providers.ticket.account: must not be \"forbidden\""]
    assert not db.exists()  # nothing was opened
    with pytest.raises(ConfigError, match="must not be"):
        Gateway(config, pm=with_tickets())


def test_two_providers_cannot_declare_one_collection(tmp_path: Path):
    from gateway.cli import check
    from gateway.config import load_config

    class Copycat(TicketProvider):
        name = "copycat"

    class Both:
        @hookimpl
        def gateway_providers(self) -> list[type[Provider]]:
            return [TicketProvider, Copycat]

    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")}}, environ={})
    problems = check(config, get_plugin_manager(extra_plugins=[("both", Both())]))
    assert any("ticket_notes" in p and "copycat" in p for p in problems), problems
