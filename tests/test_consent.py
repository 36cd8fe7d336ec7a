"""Consent end to end: configured documents listed, accepted (also in a
login or registration body) and withdrawn over HTTP, the history kept in
the profile store, routes with ``require_consent`` for session users and API
keys, and ``X-Consent`` upstream (forged ones dropped).

Everything runs against a real gateway in front of the recording upstream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config
from gateway.consent import EVENTS
from gateway.testing import RunningGateway, Upstream, base_config, body

ROOT = Path(__file__).resolve().parent.parent

DOCUMENTS = {
    "terms": {"version": "2026-11", "url": "https://example.com/terms", "title": "Terms of service"},
    "privacy": {"version": "3", "url": "/legal/privacy"},
}
BOTH = {"terms": "2026-11", "privacy": "3"}

MONGODB_URL = os.environ.get("GATEWAY_TEST_MONGODB_URL")
_DATABASES = itertools.count()


def config(upstream: Upstream, tmp_path: Path, documents: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    url = upstream.url
    return base_config(url, tmp_path, consent={"documents": documents or DOCUMENTS}, routes=[
        {"prefix": "/api/", "upstream": url, "auth": "required"},
        {"prefix": "/public/", "upstream": url, "auth": "public"},
        {"prefix": "/signed/", "upstream": url, "auth": "required", "require_consent": ["terms", "privacy"]},
        {"prefix": "/terms/", "upstream": url, "auth": "optional", "require_consent": ["terms"]},
    ], **sections)


async def start(make_gateway: Any, upstream: Upstream, tmp_path: Path, **kw: Any) -> RunningGateway:
    running: RunningGateway = await make_gateway(config(upstream, tmp_path, **kw))
    return running


async def consent(rg: RunningGateway, method: str, token: str, payload: Any = None, path: str = "") -> Any:
    return await rg.client.request(method, f"/auth/consent{path}", token=token, json_body=payload)


async def events(rg: RunningGateway, user_id: str) -> list[dict[str, Any]]:
    """The user's consent history, as the profile store holds it."""
    return await rg.gateway.profiles.records(EVENTS).find("user_id", user_id)


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


# ---------------------------------------------------------------------------
# Listing, accepting, withdrawing
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_listing_and_accepting(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    alice = await rg.client.register("alice")
    assert alice["consent_required"] == ["terms", "privacy"]
    token = alice["token"]

    r = await consent(rg, "GET", token)
    assert r.code == 200, r.body
    assert body(r) == {
        "documents": [
            {"name": "terms", "version": "2026-11", "url": "https://example.com/terms", "title": "Terms of service",
             "accepted": None, "current": False},
            {"name": "privacy", "version": "3", "url": "/legal/privacy", "title": "privacy",
             "accepted": None, "current": False},
        ],
        "consent_required": ["terms", "privacy"],
    }

    r = await consent(rg, "POST", token, {"accept": {"terms": "2026-11"}})
    assert r.code == 200, r.body
    listing = body(r)
    terms, privacy = listing["documents"]
    assert terms["current"] is True and terms["accepted"]["version"] == "2026-11"
    assert datetime.fromisoformat(terms["accepted"]["at"].replace("Z", "+00:00")).tzinfo is not None
    assert terms["accepted"]["at"].endswith("Z")
    assert privacy["accepted"] is None and listing["consent_required"] == ["privacy"]
    assert body(await consent(rg, "GET", token)) == listing

    # the next login says what is still required
    login = await rg.client.login("alice")
    assert login["consent_required"] == ["privacy"]


@pytest.mark.gen_test(timeout=60)
async def test_accept_in_the_registration_and_login_body(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    r = await rg.client.request("POST", "/auth/password/register",
                                json_body={"username": "bob", "password": "correct horse", "accept": BOTH})
    assert r.code == 201, r.body
    registered = body(r)
    assert registered["consent_required"] == []
    assert "consent_error" not in registered
    user_id, session_id = registered["user"]["id"], registered["session"]["id"]
    recorded = await events(rg, user_id)
    assert [(e["document"], e["version"], e["action"], e["session_id"]) for e in recorded] == [
        ("terms", "2026-11", "accepted", session_id), ("privacy", "3", "accepted", session_id)]

    # the same accept with every login records nothing new
    again = await rg.client.login_with("password", {"username": "bob", "password": "correct horse", "accept": BOTH})
    assert again["consent_required"] == [] and "consent_error" not in again
    assert len(await events(rg, user_id)) == 2

    # a refused accept never fails the login (its credentials may be single-use): it is reported
    stale = await rg.client.login_with("password", {"username": "bob", "password": "correct horse",
                                                    "accept": {"terms": "2026-10"}})
    assert stale["token"] and stale["consent_required"] == []
    assert stale["consent_error"]["error"] == "conflict"
    assert "2026-11" in stale["consent_error"]["message"]
    assert stale["consent_error"]["documents"] == [
        {"name": "terms", "version": "2026-11", "url": "https://example.com/terms", "title": "Terms of service"}]
    unknown = await rg.client.login_with("password", {"username": "bob", "password": "correct horse",
                                                      "accept": {"cookies": "1"}})
    assert unknown["consent_error"]["error"] == "invalid_request" and "cookies" in unknown["consent_error"]["message"]
    assert len(await events(rg, user_id)) == 2

    # a first login with its consent, in one round trip, on a login that creates nothing
    carol = await rg.client.register("carol")
    assert carol["consent_required"] == ["terms", "privacy"]
    first = await rg.client.login_with("password", {"username": "carol", "password": "correct horse",
                                                    "accept": {"privacy": "3"}})
    assert first["consent_required"] == ["terms"]
    assert [e["session_id"] for e in await events(rg, carol["user"]["id"])] == [first["session"]["id"]]


@pytest.mark.gen_test(timeout=60)
async def test_an_old_version_is_409_and_an_unknown_document_400(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    alice = await rg.client.register("alice")
    token = alice["token"]

    r = await consent(rg, "POST", token, {"accept": {"terms": "2026-10", "privacy": "3"}})
    assert r.code == 409, r.body
    answer = body(r)
    assert answer["error"] == "conflict"
    assert "2026-11" in answer["message"] and "2026-10" in answer["message"]
    assert answer["documents"] == [
        {"name": "terms", "version": "2026-11", "url": "https://example.com/terms", "title": "Terms of service"}]

    r = await consent(rg, "POST", token, {"accept": {"terms": "2026-11", "cookies": "1"}})
    assert r.code == 400 and body(r)["error"] == "invalid_request"
    assert "cookies" in body(r)["message"]
    for bad in ({}, {"accept": None}, {"accept": {}}, {"accept": "terms"}, {"accept": ["terms"]},
                {"accept": {"terms": 2026}}):
        r = await consent(rg, "POST", token, bad)
        assert r.code == 400, (bad, r.body)
        assert body(r)["error"] == "invalid_request" and "accept" in body(r)["message"]
    # all or nothing: the valid privacy of the refused requests was not recorded
    assert await events(rg, alice["user"]["id"]) == []

    r = await consent(rg, "DELETE", token, path="/cookies")
    assert r.code == 404 and body(r)["error"] == "not_found"


@pytest.mark.gen_test(timeout=60)
async def test_consent_endpoints_need_a_session_and_follow_the_csrf_rules(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    alice = await rg.client.register("alice")
    for method, payload in (("GET", None), ("POST", {"accept": BOTH})):
        r = await rg.client.request(method, "/auth/consent", json_body=payload)
        assert r.code == 401 and body(r)["error"] == "unauthenticated"
    cookie = {"Cookie": f"gw_session={alice['token']}"}
    r = await rg.client.request("POST", "/auth/consent", json_body={"accept": BOTH}, headers=cookie)
    assert r.code == 403 and body(r)["error"] == "csrf"
    r = await rg.client.request("DELETE", "/auth/consent/terms", headers=cookie)
    assert r.code == 403 and body(r)["error"] == "csrf"
    r = await rg.client.request("POST", "/auth/consent", json_body={"accept": BOTH},
                                headers={**cookie, "X-Requested-With": "fetch"})
    assert r.code == 200 and body(r)["consent_required"] == []
    assert (await rg.client.request("GET", "/auth/consent", headers=cookie)).code == 200


@pytest.fixture(params=["sqlite", "mongodb"])
def profile_section(request: pytest.FixtureRequest, tmp_path: Path, io_loop: Any) -> dict[str, Any]:
    """The [profiles] store settings, for each store (MongoDB only when
    GATEWAY_TEST_MONGODB_URL names a server); a MongoDB database is dropped
    afterwards."""
    if request.param == "sqlite":
        return {"store": "sqlite", "sqlite_path": str(tmp_path / "profiles.db")}
    if not MONGODB_URL:
        pytest.skip("MongoDB tests skipped: set GATEWAY_TEST_MONGODB_URL to a MongoDB server URL to run them")
    database = f"gateway_consent_{uuid.uuid4().hex[:8]}_{next(_DATABASES)}"

    async def drop() -> None:
        from pymongo import AsyncMongoClient

        client: Any = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=5000)
        try:
            await client.drop_database(database)
        finally:
            await client.close()

    request.addfinalizer(lambda: io_loop.run_sync(drop))
    return {"store": "mongodb", "mongodb_url": MONGODB_URL, "mongodb_database": database}


@pytest.mark.gen_test(timeout=60)
async def test_withdrawal_and_the_history_kept_and_a_new_version(make_gateway, upstream, tmp_path, profile_section):
    rg = await start(make_gateway, upstream, tmp_path, profiles=profile_section)
    alice = await rg.client.register("alice")
    token, user_id, session_id = alice["token"], alice["user"]["id"], alice["session"]["id"]

    assert (await consent(rg, "POST", token, {"accept": BOTH})).code == 200
    assert (await consent(rg, "POST", token, {"accept": {"terms": "2026-11"}})).code == 200  # already: no event
    r = await consent(rg, "DELETE", token, path="/terms")
    assert r.code == 204 and r.body == b""
    listing = body(await consent(rg, "GET", token))
    assert listing["documents"][0]["accepted"] is None and listing["consent_required"] == ["terms"]
    assert (await consent(rg, "DELETE", token, path="/terms")).code == 204  # nothing to withdraw: no event
    assert (await consent(rg, "POST", token, {"accept": {"terms": "2026-11"}})).code == 200

    history = await events(rg, user_id)
    assert [(e["document"], e["version"], e["action"]) for e in history] == [
        ("terms", "2026-11", "accepted"), ("privacy", "3", "accepted"),
        ("terms", "2026-11", "withdrawn"), ("terms", "2026-11", "accepted")]
    for event in history:
        assert event["user_id"] == user_id and event["session_id"] == session_id
        assert event["ip"] == "127.0.0.1"
        assert isinstance(event["at"], datetime) and event["at"].tzinfo is not None
    assert [e["at"] for e in history] == sorted(e["at"] for e in history)
    assert len({e["id"] for e in history}) == 4

    # a new version of the terms (a gateway with the new configuration, on the same
    # store): everyone accepts again; the history stays as it was
    newer = {**DOCUMENTS, "terms": {**DOCUMENTS["terms"], "version": "2027-01"}}
    rg2 = await start(make_gateway, upstream, tmp_path, documents=newer, profiles=profile_section)
    login = await rg2.client.login("alice")
    assert login["consent_required"] == ["terms"]
    terms = body(await consent(rg2, "GET", login["token"]))["documents"][0]
    assert terms["version"] == "2027-01" and terms["current"] is False
    assert terms["accepted"]["version"] == "2026-11"
    r = await rg2.client.request("GET", "/signed/x", token=login["token"])
    assert r.code == 403 and body(r)["error"] == "consent_required"
    r = await consent(rg2, "POST", login["token"], {"accept": {"terms": "2026-11"}})
    assert r.code == 409 and "2027-01" in body(r)["message"]
    assert (await consent(rg2, "POST", login["token"], {"accept": {"terms": "2027-01"}})).code == 200
    history2 = await events(rg2, user_id)
    assert history2[:4] == history and len(history2) == 5
    assert (history2[4]["version"], history2[4]["session_id"]) == ("2027-01", login["session"]["id"])


@pytest.mark.gen_test(timeout=60)
async def test_without_documents_the_login_requires_nothing(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path))
    alice = await rg.client.register("alice")
    assert alice["consent_required"] == []
    assert body(await consent(rg, "GET", alice["token"])) == {"documents": [], "consent_required": []}
    r = await consent(rg, "POST", alice["token"], {"accept": {"terms": "1"}})
    assert r.code == 405 and body(r)["error"] == "method_not_allowed"  # nothing to accept
    assert r.headers["Allow"] == "GET"
    # an accept in a login body is reported, the login succeeds
    login = await rg.client.login_with("password", {"username": "alice", "password": "correct horse",
                                                    "accept": {"terms": "1"}})
    assert login["consent_required"] == [] and login["consent_error"]["error"] == "invalid_request"


# ---------------------------------------------------------------------------
# Routes with require_consent, and X-Consent upstream
# ---------------------------------------------------------------------------


FORGED = {"X-Consent": "terms=2026-11, privacy=3", "X_Consent": "terms=2026-11", "x-consent": "all"}


@pytest.mark.gen_test(timeout=60)
async def test_a_route_requires_the_current_versions_of_a_session_user(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    alice = await rg.client.register("alice")
    token = alice["token"]

    r = await rg.client.request("GET", "/signed/orders", token=token)
    assert r.code == 403, r.body
    answer = body(r)
    assert set(answer) == {"error", "message", "documents"}
    assert answer["error"] == "consent_required"
    assert "terms" in answer["message"] and "privacy" in answer["message"]
    assert answer["documents"] == [
        {"name": "terms", "version": "2026-11", "url": "https://example.com/terms", "title": "Terms of service"},
        {"name": "privacy", "version": "3", "url": "/legal/privacy", "title": "privacy"}]
    assert upstream.seen == []

    await consent(rg, "POST", token, {"accept": {"terms": "2026-11"}})
    r = await rg.client.request("GET", "/signed/orders", token=token)
    assert r.code == 403 and [d["name"] for d in body(r)["documents"]] == ["privacy"]
    r = await rg.client.request("GET", "/terms/x", token=token)  # this one needs the terms only
    assert r.code == 200
    assert upstream.last.header("X-Consent") == "terms=2026-11"

    await consent(rg, "POST", token, {"accept": {"privacy": "3"}})
    r = await rg.client.request("GET", "/signed/orders", token=token, headers=FORGED)
    assert r.code == 200, r.body
    got = [(k, v) for k, v in upstream.last.headers if canon(k) == "x-consent"]
    assert got == [("X-Consent", "terms=2026-11, privacy=3")]

    # withdrawing takes effect at once
    assert (await consent(rg, "DELETE", token, path="/privacy")).code == 204
    r = await rg.client.request("GET", "/signed/orders", token=token)
    assert r.code == 403 and [d["name"] for d in body(r)["documents"]] == ["privacy"]


@pytest.mark.gen_test(timeout=60)
async def test_forged_consent_headers_are_dropped_on_every_route(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path)
    alice = await rg.client.register("alice")
    for path, token in (("/api/x", alice["token"]), ("/public/x", None), ("/terms/x", None)):
        r = await rg.client.request("GET", path, token=token, headers=FORGED)
        assert r.code == 200, (path, r.body)
        assert not [k for k, _ in upstream.last.headers if canon(k) == "x-consent"], path
    # an anonymous caller of an optional route that requires consent passes, without X-Consent
    assert upstream.last.header("X-User-Id") is None


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.gen_test(timeout=90)
async def test_an_api_key_acts_for_its_owner_and_follows_the_same_rule(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, providers={"apikey": {}})
    alice = await rg.client.register("alice")
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f'[profiles]\nstore = "sqlite"\nsqlite_path = {json.dumps(str(tmp_path / "profiles.db"))}\n')
    code, out, err = await cli("apikey", "create", "--config", str(config_path), "--user", alice["user"]["id"],
                               "--name", "ci bot")
    assert code == 0, err
    key = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("key:"))

    r = await rg.client.request("GET", "/signed/orders", headers={"X-API-Key": key})
    assert r.code == 403, r.body
    assert body(r)["error"] == "consent_required"
    assert [d["name"] for d in body(r)["documents"]] == ["terms", "privacy"]
    # a key cannot accept for its owner: the consent endpoints need a session
    r = await rg.client.request("POST", "/auth/consent", json_body={"accept": BOTH}, headers={"X-API-Key": key})
    assert r.code == 401

    await consent(rg, "POST", alice["token"], {"accept": BOTH})
    r = await rg.client.request("GET", "/signed/orders", headers={"X-API-Key": key, **FORGED})
    assert r.code == 200, r.body
    seen = upstream.last
    assert seen.header("X-User-Id") == alice["user"]["id"]
    assert [(k, v) for k, v in seen.headers if canon(k) == "x-consent"] == [("X-Consent", "terms=2026-11, privacy=3")]


@pytest.mark.gen_test(timeout=60)
async def test_x_consent_percent_encodes_versions(make_gateway, upstream, tmp_path):
    documents = {"terms": {"version": "v 2, final=yes", "url": "/terms"}, "privacy": {"version": "3 é", "url": "/p"}}
    rg = await start(make_gateway, upstream, tmp_path, documents=documents)
    alice = await rg.client.register("alice")
    r = await consent(rg, "POST", alice["token"], {"accept": {"terms": "v 2, final=yes", "privacy": "3 é"}})
    assert r.code == 200, r.body
    r = await rg.client.request("GET", "/signed/x", token=alice["token"])
    assert r.code == 200, r.body
    assert upstream.last.header("X-Consent") == "terms=v%202%2C%20final%3Dyes, privacy=3%20%C3%A9"


def test_require_consent_names_configured_documents_on_authenticated_routes(tmp_path):
    def problems(routes: list[dict[str, Any]], documents: Any = DOCUMENTS) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                              "consent": {"documents": documents}, "routes": routes}, environ={})
        return caught.value.problems

    up = "http://127.0.0.1:9"
    assert problems([{"prefix": "/a/", "upstream": up, "require_consent": ["terms", "cookies"]}]) == [
        "routes[0].require_consent: 'cookies' is not a document of [consent.documents]"]
    assert problems([{"prefix": "/a/", "upstream": up, "auth": "public", "require_consent": ["terms"]}]) == [
        "routes[0].require_consent: a public route authenticates no one, so it cannot require consent"]
    assert problems([{"prefix": "/a/", "upstream": up, "require_consent": ["terms", "terms"]}])[0].startswith(
        "routes[0].require_consent: a name is listed twice")
    assert problems([], {"terms": {"url": "/t"}, "Privacy": {"version": "1", "url": "/p"},
                         "cookies": {"version": " ", "url": "ftp://x", "colour": "red"}}) == [
        "consent.documents.terms.version: required",
        "consent.documents.Privacy: not a document name (lowercase letters, digits, - or _)",
        "consent.documents.cookies.colour: unknown key",
        "consent.documents.cookies.version: expected a non-empty string (got ' ')",
        "consent.documents.cookies.url: expected an http:// or https:// URL, or a path starting with / (got 'ftp://x')",
    ]
    ok = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")}, "consent": {"documents": DOCUMENTS},
                           "routes": [{"prefix": "/a/", "upstream": up, "require_consent": ["privacy"]}]}, environ={})
    assert ok.routes[0].require_consent == ("privacy",)
    assert list(ok.consent.documents) == ["terms", "privacy"]
    assert ok.consent.documents["privacy"].title == ""
