"""Signed identity for upstreams: ``X-Gateway-Assertion`` on routes with
``assertion = true``, the JWKS that verifies it, and the upstream check of
docs/http.md, run as written against live gateways (a key rotation and a
tampered token included).

Keys are made here with ``cryptography``; tokens are read with PyJWT, as an
upstream would read them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import tornado.httpserver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.admin import Readiness, local_metrics, make_admin_app
from gateway.config import load_config, read_config
from gateway.options import ConfigError
from gateway.testing import Client, RunningGateway, Upstream, base_config, free_port

ROOT = Path(__file__).resolve().parent.parent
HEADER = "X-Gateway-Assertion"
SPELLINGS = ("X-Gateway-Assertion", "x-gateway-assertion", "X_Gateway_Assertion", "X-GATEWAY_ASSERTION")


def pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def ec_pem() -> str:
    return pem(ec.generate_private_key(ec.SECP256R1()))


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


def assertions(seen: Any) -> list[str]:
    """Every value of the upstream request's headers that read as ``X-Gateway-Assertion``."""
    return [v for k, v in seen.headers if canon(k) == "x-gateway-assertion"]


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


def routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/api/", "upstream": upstream_url, "auth": "required", "assertion": True},
        {"prefix": "/orders/", "upstream": upstream_url, "auth": "required", "assertion": True,
         "audience": "orders-service"},
        {"prefix": "/opt/", "upstream": upstream_url, "auth": "optional", "assertion": True},
        {"prefix": "/plain/", "upstream": upstream_url, "auth": "required"},
        {"prefix": "/public/", "upstream": upstream_url, "auth": "public"},
    ]


async def start(make_gateway: Any, upstream: Upstream, where: Path, keys: list[tuple[str, str, str]],
                **assertion: Any) -> RunningGateway:
    """A gateway with ``keys`` (``(kid, algorithm, PEM)``, each PEM in an
    environment variable) in front of ``upstream``."""
    where.mkdir(parents=True, exist_ok=True)
    environ = {f"KEY_{i}": key for i, (_, _, key) in enumerate(keys)}
    table = [{"kid": kid, "algorithm": alg, "private_key_env": f"KEY_{i}"} for i, (kid, alg, _) in enumerate(keys)]
    config = base_config(upstream.url, where, routes=routes(upstream.url), providers={"apikey": {}},
                         assertion={"keys": table, **assertion})
    return await make_gateway(config, environ=environ)


async def received(rg: RunningGateway, upstream: Upstream, path: str, token: str | None = None,
                   **headers: str) -> str | None:
    """The assertion the upstream got for ``GET path`` (``None``: none)."""
    r = await rg.client.request("GET", path, token=token, headers=headers)
    assert r.code == 200, r.body
    got = assertions(upstream.last)
    assert len(got) <= 1, got
    return got[0] if got else None


async def cli(*args: str) -> str:
    """``gateway <args>`` as a subprocess; its output (asserting success)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, cwd=str(ROOT),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def doc_snippet() -> str:
    """The upstream check of docs/http.md, as written there."""
    text = (ROOT / "docs" / "http.md").read_text()
    section = text[text.index("### Signed identity for upstreams"):]
    match = re.search(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, "no Python block in the section"
    return match.group(1)


class DocCheck:
    """The snippet of docs/http.md, executed once, called off the event
    loop (PyJWKClient blocks while it fetches from the gateway on it)."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {}
        exec(compile(doc_snippet(), "docs/http.md", "exec"), self.namespace)

    async def verify(self, token: str, rg: RunningGateway, *, issuer: str, audience: str = "/api/") -> dict[str, Any]:
        claims: dict[str, Any] = await asyncio.to_thread(
            self.namespace["gateway_identity"], token, jwks_url=f"{rg.base_url}/auth/.well-known/jwks.json",
            issuer=issuer, audience=audience)
        return claims


# ---------------------------------------------------------------------------
# The claims
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_session_users_assertion_holds_who_they_are(make_gateway, upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    key = ec_pem()
    rg = await start(make_gateway, upstream, tmp_path, [("k1", "ES256", key)])
    login = await rg.client.register("alice")
    user_id, session_id = login["user"]["id"], login["session"]["id"]

    token = await received(rg, upstream, "/api/orders", login["token"])
    assert token is not None
    header, claims = unverified(token)
    assert header == {"alg": "ES256", "kid": "k1", "typ": "JWT"}
    assert set(claims) == {"iss", "sub", "sid", "provider", "aud", "iat", "exp", "jti"}
    assert claims["sub"] == user_id == upstream.last.header("X-User-Id")
    assert claims["sid"] == session_id == upstream.last.header("X-Session-Id")
    assert claims["provider"] == "password"
    assert claims["aud"] == "/api/"  # the route's prefix, by default
    assert claims["iss"] == rg.base_url  # the gateway's own origin, unless configured
    assert claims["exp"] - claims["iat"] == 30 and claims["exp"] - claims["iat"] <= 60
    # verified with the published key, as an upstream does
    keys = jwt.PyJWKSet.from_json((await rg.client.request("GET", "/auth/.well-known/jwks.json")).body.decode())
    assert jwt.decode(token, keys["k1"], algorithms=["ES256"], audience="/api/", issuer=rg.base_url) == claims

    again = await received(rg, upstream, "/api/orders", login["token"])
    assert again is not None and unverified(again)[1]["jti"] != claims["jti"]  # each request its own

    # a configured audience
    token = await received(rg, upstream, "/orders/1", login["token"])
    assert token is not None and unverified(token)[1]["aud"] == "orders-service"
    # a signed-in caller on an optional route gets one too
    assert await received(rg, upstream, "/opt/x", login["token"]) is not None

    body = "".join(line for line in key.splitlines() if "-----" not in line)
    assert not [r for r in caplog.records if body[:40] in r.getMessage()], "the private key was logged"


@pytest.mark.gen_test(timeout=60)
async def test_configured_issuer_and_lifetime_and_other_algorithms(make_gateway, upstream, tmp_path):
    ed = pem(ed25519.Ed25519PrivateKey.generate())
    rg = await start(make_gateway, upstream, tmp_path, [("ed", "EdDSA", ed)],
                     issuer="https://gateway.example.com", lifetime="60s")
    login = await rg.client.register("alice")
    token = await received(rg, upstream, "/api/x", login["token"])
    assert token is not None
    header, claims = unverified(token)
    assert (header["alg"], header["kid"]) == ("EdDSA", "ed")
    assert claims["iss"] == "https://gateway.example.com"
    assert claims["exp"] - claims["iat"] == 60

    rs = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    rg = await start(make_gateway, upstream, tmp_path / "rsa", [("rs", "RS256", rs)])
    login = await rg.client.register("bob")
    token = await received(rg, upstream, "/api/x", login["token"])
    assert token is not None and unverified(token)[0]["alg"] == "RS256"


@pytest.mark.gen_test(timeout=90)
async def test_an_api_keys_assertion_carries_its_scopes_and_no_session(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, [("k1", "ES256", ec_pem())])
    login = await rg.client.register("alice")
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f'[profiles]\nstore = "sqlite"\nsqlite_path = {json.dumps(str(tmp_path / "profiles.db"))}\n')
    out = await cli("apikey", "create", "--config", str(config_path), "--user", login["user"]["id"],
                    "--name", "ci bot", "--scopes", "orders:read,orders:write")
    api_key = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("key:"))

    token = await received(rg, upstream, "/api/orders", **{"X-API-Key": api_key})
    assert token is not None
    claims = unverified(token)[1]
    assert claims["sub"] == login["user"]["id"]
    assert claims["provider"] == "apikey"
    assert claims["scopes"] == ["orders:read", "orders:write"]
    assert "sid" not in claims
    assert api_key not in token


# ---------------------------------------------------------------------------
# Where there is none, and forged ones
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_no_assertion_without_the_option_or_without_a_caller(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, [("k1", "ES256", ec_pem())])
    login = await rg.client.register("alice")
    assert await received(rg, upstream, "/plain/x", login["token"]) is None  # no assertion = true
    assert await received(rg, upstream, "/public/x", login["token"]) is None
    assert await received(rg, upstream, "/opt/x") is None  # anonymous on an optional route: none


@pytest.mark.gen_test(timeout=60)
async def test_a_clients_own_assertion_is_dropped_in_every_spelling_on_every_route(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, [("k1", "ES256", ec_pem())])
    login = await rg.client.register("alice")
    check = DocCheck()
    forged = jwt.encode({"sub": "u_evil", "aud": "/api/", "iss": rg.base_url}, "a forger's secret of thirty-two bytes", algorithm="HS256")
    for spelling in SPELLINGS:
        for path, token in [("/plain/x", login["token"]), ("/public/x", None), ("/opt/x", None)]:
            assert await received(rg, upstream, path, token, **{spelling: forged}) is None, (spelling, path)
            assert all(forged not in v for _, v in upstream.last.headers)
        # on a route with assertion, only the gateway's own goes up, and it is the caller's
        token = await received(rg, upstream, "/api/x", login["token"], **{spelling: forged})
        assert token is not None and token != forged
        assert (await check.verify(token, rg, issuer=rg.base_url))["sub"] == login["user"]["id"]
    # both spellings at once
    r = await rg.client.request("GET", "/api/x", token=login["token"],
                                headers={"X-Gateway-Assertion": forged, "X_Gateway_Assertion": forged})
    assert r.code == 200
    got = assertions(upstream.last)
    assert len(got) == 1 and got[0] != forged


# ---------------------------------------------------------------------------
# The JWKS
# ---------------------------------------------------------------------------


PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}


@pytest.mark.gen_test(timeout=60)
async def test_the_jwks_publishes_every_key_public_parts_only(make_gateway, upstream, tmp_path):
    keys = [("new", "ES256", ec_pem()), ("ed", "EdDSA", pem(ed25519.Ed25519PrivateKey.generate())),
            ("old", "RS256", pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))]
    rg = await start(make_gateway, upstream, tmp_path, keys)
    r = await rg.client.request("GET", "/auth/.well-known/jwks.json")
    assert r.code == 200, r.body
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Cache-Control"] == "public, max-age=300"
    etag = r.headers["ETag"]
    assert etag
    document = json.loads(r.body)
    assert [k["kid"] for k in document["keys"]] == ["new", "ed", "old"]
    for entry, (kid, alg, _) in zip(document["keys"], keys):
        assert (entry["kid"], entry["alg"], entry["use"]) == (kid, alg, "sig")
        assert not PRIVATE_MEMBERS & set(entry), entry
    assert (document["keys"][0]["kty"], document["keys"][0]["crv"]) == ("EC", "P-256")
    assert set(document["keys"][0]) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (document["keys"][1]["kty"], document["keys"][1]["crv"]) == ("OKP", "Ed25519")
    assert set(document["keys"][2]) == {"kty", "n", "e", "kid", "alg", "use"}

    cached = await rg.client.request("GET", "/auth/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert cached.code == 304 and not cached.body
    assert cached.headers["ETag"] == etag

    # the admin listener's application serves the same document
    server = tornado.httpserver.HTTPServer(make_admin_app(Readiness({}), local_metrics,
                                                          jwks=rg.gateway.assertions.published))
    port = free_port()
    server.listen(port, "127.0.0.1")
    try:
        async with Client(f"http://127.0.0.1:{port}") as admin:
            a = await admin.request("GET", "/.well-known/jwks.json")
            assert a.code == 200 and a.body == r.body
            assert a.headers["ETag"] == etag and a.headers["Cache-Control"] == "public, max-age=300"
            assert (await admin.request("GET", "/.well-known/jwks.json", headers={"If-None-Match": etag})).code == 304
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=60)
async def test_without_keys_the_jwks_is_empty(make_gateway, upstream, tmp_path):
    rg = await make_gateway(base_config(upstream.url, tmp_path))
    r = await rg.client.request("GET", "/auth/.well-known/jwks.json")
    assert r.code == 200 and json.loads(r.body) == {"keys": []}
    login = await rg.client.register("alice")
    assert await received(rg, upstream, "/api/x", login["token"]) is None


# ---------------------------------------------------------------------------
# The documented upstream check, against live gateways
# ---------------------------------------------------------------------------


def tampered(token: str) -> str:
    """The token with its claims changed (``sub``) and its signature kept."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "u_someone_else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{signature}"


@pytest.mark.gen_test(timeout=90)
async def test_the_documented_check_verifies_through_a_rotation_and_refuses_a_tampered_token(
        make_gateway, upstream, tmp_path):
    issuer = "https://gateway.example.com"
    old, new = ec_pem(), ec_pem()
    check = DocCheck()

    before = await start(make_gateway, upstream, tmp_path / "before", [("old", "ES256", old)], issuer=issuer)
    login = await before.client.register("alice")
    old_token = await received(before, upstream, "/api/x", login["token"])
    assert old_token is not None
    claims = await check.verify(old_token, before, issuer=issuer)
    assert claims["sub"] == login["user"]["id"]

    # the new key signs, the old one is still published
    rotated = await start(make_gateway, upstream, tmp_path / "rotated", [("new", "ES256", new), ("old", "ES256", old)],
                          issuer=issuer)
    login = await rotated.client.register("alice")
    new_token = await received(rotated, upstream, "/api/x", login["token"])
    assert new_token is not None and jwt.get_unverified_header(new_token)["kid"] == "new"
    assert (await check.verify(new_token, rotated, issuer=issuer))["sub"] == login["user"]["id"]
    assert (await check.verify(old_token, rotated, issuer=issuer))["sub"] == claims["sub"]

    # refused: a tampered token, another audience or issuer, a key no longer published
    with pytest.raises(jwt.InvalidSignatureError):
        await check.verify(tampered(new_token), rotated, issuer=issuer)
    with pytest.raises(jwt.InvalidSignatureError):
        await check.verify(new_token[:-4] + ("AAAA" if not new_token.endswith("AAAA") else "BBBB"), rotated,
                           issuer=issuer)
    with pytest.raises(jwt.InvalidAudienceError):
        await check.verify(new_token, rotated, issuer=issuer, audience="/other/")
    with pytest.raises(jwt.InvalidIssuerError):
        await check.verify(new_token, rotated, issuer="https://elsewhere.example.com")
    after = await start(make_gateway, upstream, tmp_path / "after", [("new", "ES256", new)], issuer=issuer)
    with pytest.raises(jwt.PyJWTError):
        await check.verify(old_token, after, issuer=issuer)
    assert (await check.verify(new_token, after, issuer=issuer))["sub"] == login["user"]["id"]


@pytest.mark.gen_test(timeout=60)
async def test_the_documented_check_refuses_an_expired_token(make_gateway, upstream, tmp_path):
    rg = await start(make_gateway, upstream, tmp_path, [("k1", "ES256", ec_pem())], lifetime="1s")
    login = await rg.client.register("alice")
    token = await received(rg, upstream, "/api/x", login["token"])
    assert token is not None
    check = DocCheck()
    claims = await check.verify(token, rg, issuer=rg.base_url)
    assert claims["exp"] - claims["iat"] == 1
    await asyncio.sleep(claims["exp"] + 5 + 1.2 - time.time())  # past exp and the check's leeway
    with pytest.raises(jwt.ExpiredSignatureError):
        await check.verify(token, rg, issuer=rg.base_url)


# ---------------------------------------------------------------------------
# Configuration problems
# ---------------------------------------------------------------------------


def problems_of(section: dict[str, Any] | None, environ: dict[str, str] | None = None,
                **route: Any) -> list[str]:
    """The problems of a configuration with this ``[assertion]`` table and one route."""
    data: dict[str, Any] = {"routes": [{"prefix": "/api/", "upstream": "http://127.0.0.1:9", **route}]}
    if section is not None:
        data["assertion"] = section
    return read_config(data=data, environ=environ or {})[1]


def test_a_route_with_assertion_needs_a_key():
    assert problems_of(None, assertion=True) == [
        "routes[0].assertion: no key to sign with; configure [[assertion.keys]]"]
    assert problems_of({"keys": []}, assertion=True) == [
        "routes[0].assertion: no key to sign with; configure [[assertion.keys]]"]
    assert problems_of(None) == []  # no assertion, no key needed
    assert problems_of(None, audience="svc") == [
        "routes[0].audience: is the audience of an assertion; set assertion = true too"]
    assert problems_of({"keys": [{"kid": "k", "private_key_env": "K"}]}, {"K": ec_pem()},
                       auth="public", assertion=True) == [
        "routes[0].assertion: a public route authenticates no one, so it has no identity to assert"]


def test_a_bad_key_is_named_by_its_kid_and_never_quoted():
    secret = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSECRETSECRETSECRET"
    bad = f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n"
    rsa_key = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    problems = problems_of({"keys": [{"kid": "signing-1", "private_key_env": "BAD"},
                                     {"kid": "signing-2", "private_key_env": "RSA"},
                                     {"kid": "signing-3", "private_key": bad}]},
                           {"BAD": bad, "RSA": rsa_key}, assertion=True)
    assert len(problems) == 3, problems
    assert problems[0].startswith("assertion.keys[0].private_key: key 'signing-1': not a PEM private key")
    assert problems[1] == ("assertion.keys[1].private_key: key 'signing-2': "
                           "ES256 needs an EC P-256 key; this is another kind of key")
    assert problems[2].startswith("assertion.keys[2].private_key: key 'signing-3': not a PEM private key")
    text = "\n".join(problems)
    assert "SECRET" not in text and "MIG" not in text
    assert not [line for line in rsa_key.splitlines()[1:-1] if line[:20] in text]
    with pytest.raises(ConfigError) as caught:
        load_config(data={"assertion": {"keys": [{"kid": "k", "private_key": bad}]}}, environ={})
    assert secret not in str(caught.value) and "SECRET" not in repr(caught.value.problems)


def test_lifetime_is_at_most_60s_and_keys_are_well_formed():
    key = {"kid": "k", "private_key_env": "K"}
    environ = {"K": ec_pem()}
    assert problems_of({"keys": [key], "lifetime": "61s"}, environ) == [
        "assertion.lifetime: must be between 1s and 60s (an assertion only crosses to the upstream) (got '61s')"]
    assert problems_of({"keys": [key], "lifetime": 60}, environ) == []
    assert problems_of({"keys": [key, dict(key)]}, environ) == ["assertion.keys[1].kid: 'k' names another key too"]
    assert problems_of({"keys": [{"kid": "k", "private_key_env": "MISSING"}]}, environ) == [
        "assertion.keys[0].private_key_env: environment variable MISSING is not set"]
    assert problems_of({"keys": [{"kid": "k", "private_key_env": "K", "algorithm": "HS256"}]}, environ) == [
        "assertion.keys[0].algorithm: expected one of 'ES256', 'EdDSA', 'RS256' (got 'HS256')"]
    assert problems_of({"keys": [{"private_key_env": "K"}]}, environ) == ["assertion.keys[0].kid: required"]
    inline = {"kid": "k", "private_key": environ["K"]}
    assert problems_of({"keys": inline}, environ) == [  # the value is not quoted: it may hold a key
        "assertion.keys: expected an array of tables ([[assertion.keys]])"]
    config = read_config(data={"assertion": {"keys": [key]}}, environ=environ)[0]
    assert environ["K"] not in repr(config)  # the key is no part of the configuration's repr


@pytest.mark.gen_test(timeout=90)
async def test_the_admin_listener_publishes_the_same_keys_with_several_workers(tmp_path, redis_url):
    """With two workers the admin listener lives in the supervisor, which
    serves the very JWKS the workers sign with."""
    import os

    from gateway.testing import Client, free_port
    from password_support import GatewayProcess

    admin_port = free_port()
    env = {**os.environ, "KEY_A": ec_pem(), "KEY_B": ec_pem()}
    keys = [{"kid": "new", "private_key_env": "KEY_A"}, {"kid": "old", "private_key_env": "KEY_B"}]
    async with GatewayProcess(tmp_path, [{"prefix": "/public/", "upstream": "http://127.0.0.1:9", "auth": "public"}],
                              server={"workers": 2}, env=env, sessions={"store": "redis", "redis_url": redis_url},
                              admin={"port": admin_port}, assertion={"keys": keys}) as gp:
        client = Client(gp.url)
        admin = Client(f"http://127.0.0.1:{admin_port}")
        try:
            served = await client.request("GET", "/auth/.well-known/jwks.json")
            published = await admin.request("GET", "/.well-known/jwks.json")
            assert served.code == published.code == 200, (served.body, published.body)
            assert json.loads(published.body) == json.loads(served.body)
            assert [k["kid"] for k in json.loads(published.body)["keys"]] == ["new", "old"]
            assert all("d" not in k for k in json.loads(published.body)["keys"])
        finally:
            client.close()
            admin.close()
