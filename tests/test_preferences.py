"""Preferences end to end: ``PATCH {auth_prefix}/profile`` with the declared
types and limits (BCP 47 language tags among them), ``GET
{auth_prefix}/session`` showing what was set, and ``[profiles]
upstream_headers`` sent upstream (forged ones dropped), against a real
gateway in front of the recording upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config
from gateway.proxy.policy import DROPPED, GATEWAY_OWNED, HOP_BY_HOP
from gateway.testing import RunningGateway, Upstream, base_config, body

FIELDS = {
    "age": {"type": "integer", "minimum": 13, "maximum": 130},
    "newsletter": {"type": "boolean"},
    "height": {"type": "number", "minimum": 0.5, "maximum": 3},
    "handle": {"type": "string", "min_length": 3, "max_length": 16, "pattern": "[a-z0-9_]+"},
}
PROFILES = {
    "editable": ["nickname", "language", *FIELDS],
    "fields": FIELDS,
    "upstream_headers": {"X-User-Language": "language", "X-User-Nickname": "nickname"},
}


def config(upstream: Upstream, tmp_path: Path, **profiles: Any) -> dict[str, Any]:
    return base_config(upstream.url, tmp_path, profiles={**PROFILES, **profiles})


async def patch(rg: RunningGateway, token: str | None, payload: Any, **kw: Any) -> Any:
    return await rg.client.request("PATCH", "/auth/profile", token=token, json_body=payload, **kw)


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


def sent(upstream: Upstream, name: str) -> list[tuple[str, str]]:
    """The headers of that name (in any spelling) the upstream got last."""
    return [(k, v) for k, v in upstream.last.headers if canon(k) == canon(name)]


@pytest.fixture
def running(make_gateway, upstream, tmp_path, io_loop) -> tuple[RunningGateway, str, str]:
    """A gateway, and alice's token and user id."""
    async def go() -> tuple[RunningGateway, str, str]:
        rg = await make_gateway(config(upstream, tmp_path))
        alice = await rg.client.register("alice")
        return rg, alice["token"], alice["user"]["id"]

    result: tuple[RunningGateway, str, str] = io_loop.run_sync(go)
    return result


# ---------------------------------------------------------------------------
# PATCH /profile
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_patch_sets_fields_and_the_session_shows_them(running):
    rg, token, user_id = running
    r = await patch(rg, token, {"nickname": "Zoë", "language": "en-gb", "age": 30, "newsletter": True,
                                "height": 1.8, "handle": "zoe_1"})
    assert r.code == 200, r.body
    profile = {"nickname": "Zoë", "language": "en-GB", "age": 30, "newsletter": True, "height": 1.8,
               "handle": "zoe_1"}
    assert set(body(r)) == {"user"} and body(r)["user"]["id"] == user_id
    assert body(r)["user"]["profile"].items() >= profile.items()
    r = await rg.client.request("GET", "/auth/session", token=token)
    assert r.code == 200
    assert body(r)["user"]["profile"].items() >= profile.items()

    # null removes a field; the others stay
    r = await patch(rg, token, {"nickname": None, "age": None})
    assert r.code == 200
    shown = body(await rg.client.request("GET", "/auth/session", token=token))["user"]["profile"]
    assert "nickname" not in shown and "age" not in shown and shown["language"] == "en-GB"

    # GET /profile: the user, and what may be edited
    r = await rg.client.request("GET", "/auth/profile", token=token)
    assert r.code == 200
    answer = body(r)
    assert answer["user"]["id"] == user_id and answer["user"]["profile"] == shown
    assert answer["editable"] == {
        "nickname": {"type": "string", "max_length": 64, "min_length": 1},
        "language": {"type": "language", "max_length": 64},
        "age": {"type": "integer", "minimum": 13, "maximum": 130},
        "newsletter": {"type": "boolean"},
        "height": {"type": "number", "minimum": 0.5, "maximum": 3},
        "handle": {"type": "string", "max_length": 16, "min_length": 3, "pattern": "[a-z0-9_]+"},
    }


@pytest.mark.parametrize("payload, words", [
    ({"nickname": "x" * 65}, ["nickname", "64"]),
    ({"nickname": ""}, ["nickname", "shorter"]),
    ({"nickname": "a\nb"}, ["nickname", "control"]),
    ({"nickname": "a\u0000"}, ["nickname", "control"]),
    ({"nickname": 5}, ["nickname", "string"]),
    ({"nickname": ["x"]}, ["nickname", "string"]),
    ({"age": 12}, ["age", "at least 13"]),
    ({"age": 131}, ["age", "at most 130"]),
    ({"age": "20"}, ["age", "integer"]),
    ({"age": 20.5}, ["age", "integer"]),
    ({"age": True}, ["age", "integer"]),
    ({"age": 2**70}, ["age", "range"]),
    ({"newsletter": "yes"}, ["newsletter", "true or false"]),
    ({"newsletter": 1}, ["newsletter", "true or false"]),
    ({"height": "tall"}, ["height", "number"]),
    ({"height": 0.1}, ["height", "at least 0.5"]),
    ({"handle": "ab"}, ["handle", "shorter than 3"]),
    ({"handle": "x" * 17}, ["handle", "16"]),
    ({"handle": "Not_OK"}, ["handle", "form"]),
    ({"language": 7}, ["language", "string"]),
    ({"language": "en_GB"}, ["language", "BCP 47"]),
    ({"role": "admin"}, ["'role'", "cannot be set"]),
    ({"username": "mallory"}, ["'username'", "cannot be set"]),
])
@pytest.mark.gen_test(timeout=60)
async def test_patch_refuses_what_the_declarations_refuse(running, payload, words):
    rg, token, _ = running
    before = body(await rg.client.request("GET", "/auth/session", token=token))["user"]["profile"]
    # with a valid field beside it: nothing of a refused request is applied
    r = await patch(rg, token, {"nickname": "kept", **payload} if "nickname" not in payload else payload)
    assert r.code == 400, r.body
    answer = body(r)
    assert answer["error"] == "invalid_request"
    for word in words:
        assert word in answer["message"], answer["message"]
    after = body(await rg.client.request("GET", "/auth/session", token=token))["user"]["profile"]
    assert after == before


@pytest.mark.gen_test(timeout=60)
async def test_patch_refuses_non_finite_numbers_and_bodies_that_are_not_objects(running):
    rg, token, _ = running
    r = await rg.client.request("PATCH", "/auth/profile", token=token, body='{"height": Infinity}',
                                headers={"Content-Type": "application/json"})
    assert r.code == 400 and "height" in body(r)["message"]
    for raw in ("[]", '"x"', "", "{"):
        r = await rg.client.request("PATCH", "/auth/profile", token=token, body=raw,
                                    headers={"Content-Type": "application/json"})
        assert r.code == 400 and body(r)["error"] == "invalid_request", raw
    r = await rg.client.request("PATCH", "/auth/profile", token=token, body='{"nickname": "x"}',
                                headers={"Content-Type": "text/plain"})
    assert r.code == 400 and "Content-Type" in body(r)["message"]
    r = await patch(rg, token, {})
    assert r.code == 200  # nothing to change


GOOD_TAGS = [
    ("en", "en"), ("en-GB", "en-GB"), ("EN-gb", "en-GB"), ("zh-Hans-CN", "zh-Hans-CN"), ("zh-hans-cn", "zh-Hans-CN"),
    ("sr-Latn-RS", "sr-Latn-RS"), ("es-419", "es-419"), ("de-CH-1901", "de-CH-1901"),
    ("sl-rozaj-biske", "sl-rozaj-biske"), ("hy-Latn-IT-arevela", "hy-Latn-IT-arevela"),
    ("zh-yue-HK", "zh-yue-HK"), ("de-DE-u-co-phonebk", "de-DE-u-co-phonebk"),
    ("en-US-x-twain", "en-US-x-twain"), ("x-whatever", "x-whatever"), ("qaa-Qaaa-QM-x-southern", "qaa-Qaaa-QM-x-southern"),
    ("i-klingon", "i-klingon"), ("en-GB-oed", "en-GB-oed"), ("sgn-BE-FR", "sgn-BE-FR"), ("zh-min-nan", "zh-min-nan"),
    ("en-a-bbb-x-a-ccc", "en-a-bbb-x-a-ccc"), ("abcde", "abcde"), ("fil-PH", "fil-PH"),
]
BAD_TAGS = [
    "", "e", "englishman", "en_US", "en-", "-en", "en--US", "de-419-DE", "a-DE", "en-a", "en-x",
    "x", "abcdefghi", "en-US-", "123", "en-abc-def-ghi-jkl", "en-Latn-Latn", "en GB", "en-GB\n",
    "en-\u0130", "\u212aa", "zh-Hans-CN-", "i-notregistered", "en-GB-x-", "en-toolongvariant",
]


@pytest.mark.gen_test(timeout=60)
async def test_language_is_a_well_formed_bcp47_tag_in_its_conventional_case(running):
    rg, token, _ = running
    for given, stored in GOOD_TAGS:
        r = await patch(rg, token, {"language": given})
        assert r.code == 200, (given, r.body)
        assert body(r)["user"]["profile"]["language"] == stored, given
    for bad in BAD_TAGS:
        r = await patch(rg, token, {"language": bad})
        assert r.code == 400, (bad, r.body)
        assert "language" in body(r)["message"] and body(r)["error"] == "invalid_request"


@pytest.mark.gen_test(timeout=60)
async def test_patch_needs_a_session_and_follows_the_csrf_rules(running):
    rg, token, _ = running
    r = await patch(rg, None, {"nickname": "x"})
    assert r.code == 401 and body(r)["error"] == "unauthenticated"
    cookie = {"Cookie": f"gw_session={token}"}
    r = await patch(rg, None, {"nickname": "x"}, headers=cookie)
    assert r.code == 403 and body(r)["error"] == "csrf"
    r = await patch(rg, None, {"nickname": "x"}, headers={**cookie, "X-Requested-With": "fetch"})
    assert r.code == 200 and body(r)["user"]["profile"]["nickname"] == "x"
    r = await rg.client.request("DELETE", "/auth/profile", token=token)
    assert r.code == 405 and body(r)["error"] == "method_not_allowed"


# ---------------------------------------------------------------------------
# upstream_headers
# ---------------------------------------------------------------------------

FORGED = {"X-User-Language": "fr", "X_User_Language": "de", "x-user-nickname": "root"}


@pytest.mark.gen_test(timeout=60)
async def test_profile_fields_go_upstream_and_forged_ones_are_dropped(running, upstream):
    rg, token, _ = running
    r = await rg.client.request("GET", "/api/x", token=token, headers=FORGED)
    assert r.code == 200
    assert sent(upstream, "X-User-Language") == [] and sent(upstream, "X-User-Nickname") == []

    assert (await patch(rg, token, {"language": "pt-br", "nickname": "Zoë 100%"})).code == 200
    r = await rg.client.request("GET", "/api/x", token=token, headers=FORGED)
    assert r.code == 200
    assert sent(upstream, "X-User-Language") == [("X-User-Language", "pt-BR")]  # at once: the PATCH refreshed the cache
    assert sent(upstream, "X-User-Nickname") == [("X-User-Nickname", "Zo%C3%AB%20100%25")]

    # forged ones are dropped on public routes and for anonymous callers too
    for path, who in (("/public/x", None), ("/opt/x", None), ("/public/x", token)):
        r = await rg.client.request("GET", path, token=who, headers=FORGED)
        assert r.code == 200
        assert sent(upstream, "X-User-Language") == [] and sent(upstream, "X-User-Nickname") == [], path

    assert (await patch(rg, token, {"language": None})).code == 200
    await rg.client.request("GET", "/api/x", token=token, headers=FORGED)
    assert sent(upstream, "X-User-Language") == []
    assert sent(upstream, "X-User-Nickname") == [("X-User-Nickname", "Zo%C3%AB%20100%25")]


@pytest.mark.gen_test(timeout=60)
async def test_each_process_caches_the_values_for_the_ttl(make_gateway, upstream, tmp_path):
    """Two gateways on one profile store stand for two processes: a PATCH
    through one reaches the other within its upstream_headers_ttl (here:
    never within the test, or at once with a TTL of 0)."""
    first = await make_gateway(config(upstream, tmp_path))
    caching = await make_gateway(config(upstream, tmp_path, upstream_headers_ttl="1h"))
    reading = await make_gateway(config(upstream, tmp_path, upstream_headers_ttl=0))
    alice = await first.client.register("alice")
    assert (await patch(first, alice["token"], {"language": "en"})).code == 200
    cached, read = (await caching.client.login("alice"))["token"], (await reading.client.login("alice"))["token"]
    for rg, token in ((caching, cached), (reading, read)):
        await rg.client.request("GET", "/api/x", token=token)
        assert upstream.last.header("X-User-Language") == "en"

    assert (await patch(first, alice["token"], {"language": "fr"})).code == 200
    await caching.client.request("GET", "/api/x", token=cached)
    assert upstream.last.header("X-User-Language") == "en"  # no store read: the cached value
    await reading.client.request("GET", "/api/x", token=read)
    assert upstream.last.header("X-User-Language") == "fr"
    # a PATCH through the caching process itself shows there at once
    assert (await patch(caching, cached, {"language": "de"})).code == 200
    await caching.client.request("GET", "/api/x", token=cached)
    assert upstream.last.header("X-User-Language") == "de"


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def problems(tmp_path: Path, profiles: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db"), **profiles}}, environ={})
    return caught.value.problems


def test_the_declarations_are_checked(tmp_path):
    assert problems(tmp_path, {"editable": ["nickname", "age"]}) == [
        "profiles.editable: 'age' has no [profiles.fields.age] table (built in: nickname, language)"]
    found = problems(tmp_path, {"fields": {"age": {"type": "integer", "max_length": 3, "pattern": "x"},
                                          "bio": {"min_length": 10, "max_length": 5},
                                          "score": {"type": "number", "minimum": 5, "maximum": 1},
                                          "flag": {"type": "boolean", "minimum": 0},
                                          "odd": {"type": "colour", "pattern": "("},
                                          "bad.name": {}}})
    assert found[1].startswith("profiles.fields.odd.pattern: not a regular expression: ")
    found[1] = "profiles.fields.odd.pattern: not a regular expression: ..."
    assert found == [
        "profiles.fields.odd.type: expected one of 'string', 'integer', 'number', 'boolean', 'language' (got 'colour')",
        "profiles.fields.odd.pattern: not a regular expression: ...",
        "profiles.fields.bad.name: not a profile field name (a letter, then letters, digits or _)",
        "profiles.fields.age.max_length: only string and language fields have a length",
        "profiles.fields.age.pattern: applies to string fields only",
        "profiles.fields.bio.min_length: is above max_length",
        "profiles.fields.score.minimum: is above maximum",
        "profiles.fields.flag.minimum: applies to integer and number fields only",
    ]
    assert problems(tmp_path, {"editable": ["nickname", "nickname"]}) == [
        "profiles.editable: a name is listed twice (got ['nickname', 'nickname'])"]
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db"),
                                            "fields": {"nickname": {"max_length": 20}}}}, environ={})
    assert config.profiles.editable == ("nickname", "language")
    assert config.profiles.declared("nickname").max_length == 20
    assert config.profiles.declared("language").type == "language"


@pytest.mark.parametrize("header", sorted(GATEWAY_OWNED | HOP_BY_HOP | DROPPED | {
    "X_User_Id", "x-forwarded-port", "Sec-WebSocket-Key", "Cookie", "Authorization", "Content-Length"}))
def test_upstream_headers_cannot_name_the_gateways_own(tmp_path, header):
    found = problems(tmp_path, {"upstream_headers": {header: "language"}})
    assert len(found) == 1 and found[0].startswith(f"profiles.upstream_headers: {header} is a header the gateway")


@pytest.mark.parametrize("value, says", [
    ({"X User": "language"}, "is not a header name"),
    ({"X-Lang": "a.b"}, "is not a profile field name"),
    ({"X-Lang": "language", "x_lang": "nickname"}, "named twice"),
    (["X-Lang"], "expected a table"),
    ({"X-Lang": 1}, "expected a table"),
])
def test_upstream_headers_are_checked(tmp_path, value, says):
    found = problems(tmp_path, {"upstream_headers": value})
    assert len(found) == 1 and found[0].startswith("profiles.upstream_headers: ") and says in found[0]
