"""API keys end to end: keys made, listed and revoked with the real
``gateway apikey`` command (a subprocess on the gateway's SQLite file), used
against a real gateway in front of the recording upstream.

What is checked is what a user sees: status codes, JSON bodies, the headers
the upstream got, the command's output and what the store holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from gateway_plugins.apikey import ApiKey

from gateway.testing import RunningGateway, Upstream, base_config, body

ROOT = Path(__file__).resolve().parent.parent

IDENTITY = {"x-user-id", "x-auth-provider", "x-session-id", "x-auth-scopes"}


def canon(name: str) -> str:
    return name.lower().replace("_", "-")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``gateway <args>`` as a subprocess: ``(exit code, stdout, stderr)``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def field(output: str, name: str) -> str:
    """A ``name: value`` line of ``apikey create``'s output."""
    for line in output.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in {output!r}")


@dataclass
class Setup:
    rg: RunningGateway
    config_path: str
    db_path: Path
    user_id: str
    token: str  # alice's session token

    async def create_key(self, *extra: str, name: str = "ci bot", user: str | None = None) -> tuple[str, str]:
        """``(key, key id)`` made by ``gateway apikey create``."""
        code, out, err = await cli("apikey", "create", "--config", self.config_path,
                                   "--user", user or self.user_id, "--name", name, *extra)
        assert code == 0, err
        return field(out, "key"), field(out, "id")

    async def get(self, path: str, key: str | None = None, *, bearer: bool = False,
                  headers: dict[str, str] | None = None) -> Any:
        hdrs = dict(headers or {})
        if key is not None:
            if bearer:
                hdrs["Authorization"] = f"Bearer {key}"
            else:
                hdrs["X-API-Key"] = key
        return await self.rg.client.request("GET", path, headers=hdrs)

    async def stored(self, key_id: str) -> ApiKey:
        record = await self.rg.gateway.providers["apikey"].keys.get(key_id)
        assert record is not None
        return record


async def start(make_gateway: Any, upstream: Upstream, tmp_path: Path, **sections: Any) -> Setup:
    """A gateway (with the apikey provider's ``options``), alice registered,
    and a configuration file the ``gateway apikey`` command can use."""
    providers = {"apikey": sections.pop("apikey", {})}
    config = base_config(upstream.url, tmp_path, providers=providers, **sections)
    rg = await make_gateway(config)
    registered = await rg.client.register("alice")
    db_path = tmp_path / "profiles.db"
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(f'[profiles]\nstore = "sqlite"\nsqlite_path = {json.dumps(str(db_path))}\n')
    return Setup(rg, str(config_path), db_path, registered["user"]["id"], registered["token"])


def assert_refused(response: Any, *words: str) -> None:
    assert response.code == 401, response.body
    answer = body(response)
    assert answer["error"] == "invalid_credentials"
    assert set(answer) == {"error", "message"}
    for word in words:
        assert word in answer["message"]
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")


# ---------------------------------------------------------------------------
# Using a key
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_key_in_x_api_key_reaches_upstream_as_identity_never_as_key(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    key, key_id = await s.create_key("--scopes", "orders:read,orders:write")
    assert key.startswith(f"gwk_{key_id}_")

    r = await s.get("/api/orders?x=1", key)
    assert r.code == 200, r.body
    seen = upstream.last
    assert (seen.path, seen.query) == ("/api/orders", "x=1")
    assert seen.header("X-User-Id") == s.user_id
    assert seen.header("X-Auth-Provider") == "apikey"
    assert seen.header("X-Auth-Scopes") == "orders:read orders:write"
    names = {canon(k) for k, _ in seen.headers}
    assert "x-session-id" not in names
    assert "x-api-key" not in names
    assert all(key not in v and key_id not in v for _, v in seen.headers)

    # identity headers a client sends along are replaced, not believed
    spoof = {"X-User-Id": "u_evil", "X_Auth_Scopes": "admin", "X-Auth-Provider": "password", "X-Session-Id": "s_x"}
    r = await s.get("/api/orders", key, headers=spoof)
    assert r.code == 200
    got = [(canon(k), v) for k, v in upstream.last.headers if canon(k) in IDENTITY]
    assert sorted(got) == sorted([("x-user-id", s.user_id), ("x-auth-provider", "apikey"),
                                  ("x-auth-scopes", "orders:read orders:write")])


@pytest.mark.gen_test(timeout=60)
async def test_key_as_bearer_token(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    key, _ = await s.create_key()
    r = await s.get("/api/x", key, bearer=True)
    assert r.code == 200, r.body
    seen = upstream.last
    assert seen.header("X-User-Id") == s.user_id
    assert seen.header("X-Auth-Provider") == "apikey"
    assert seen.header("X-Auth-Scopes") in (None, "")  # a key without scopes (libcurl drops empty headers)
    assert seen.header("Authorization") is None
    assert seen.header("X-Session-Id") is None
    # on an optional route too
    r = await s.get("/opt/x", key, bearer=True)
    assert r.code == 200
    assert upstream.last.header("X-User-Id") == s.user_id
    assert upstream.last.header("Authorization") is None


@pytest.mark.gen_test(timeout=60)
async def test_other_authorization_and_no_key_are_untouched(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    r = await s.get("/api/x")
    assert r.code == 401 and body(r)["error"] == "unauthenticated"
    r = await s.get("/opt/x", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert r.code == 200
    assert upstream.last.header("Authorization") == "Basic dXNlcjpwdw=="
    assert not {canon(k) for k, _ in upstream.last.headers} & IDENTITY
    # sessions work as before, with no scopes header
    r = await s.rg.client.request("GET", "/api/x", token=s.token)
    assert r.code == 200
    assert upstream.last.header("X-Auth-Provider") == "password"
    assert upstream.last.header("X-Session-Id")
    assert upstream.last.header("X-Auth-Scopes") is None


@pytest.mark.gen_test(timeout=60)
async def test_bad_keys_are_401_without_the_key_in_answer_or_logs(make_gateway, upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    s = await start(make_gateway, upstream, tmp_path)
    key, key_id = await s.create_key()
    secret = key.split("_", 2)[2]
    stored_hash = (await s.stored(key_id)).secret_hash
    wrong_secret = f"gwk_{key_id}_{'A' * len(secret)}"
    unknown_id = f"gwk_0123456789abcdef_{secret}"
    cases = {
        "nonsense": "malformed",
        "gwk_": "malformed",
        f"gwk_{key_id}": "malformed",
        f"gwk_{key_id.upper()}_{secret}": "malformed",
        f"gwk_{key_id}_{secret}\u00e9": "malformed",
        "gws_" + secret: "malformed",
        wrong_secret: "not valid",
        unknown_id: "not valid",
    }
    seen_before = len(upstream.seen)
    for presented, word in cases.items():
        for bearer in (False, True):
            if bearer and not presented.startswith("gwk_"):
                continue  # not an API key as a Bearer token: not ours
            r = await s.get("/opt/x", presented, bearer=bearer)
            assert_refused(r, word)
            assert secret not in r.body.decode() and stored_hash not in r.body.decode()
    # refused on public-ish optional routes too: nothing reached the upstream
    assert len(upstream.seen) == seen_before
    # two different keys at once
    r = await s.get("/api/x", key, headers={"Authorization": f"Bearer {wrong_secret}"})
    assert_refused(r)
    # the right key still works, and nothing logged carries a secret
    assert (await s.get("/api/x", key)).code == 200
    for text in (caplog.text, *(str(rec.args) for rec in caplog.records)):
        assert secret not in text
        assert stored_hash not in text
        assert wrong_secret.split("_", 2)[2] not in text


@pytest.mark.gen_test(timeout=60)
async def test_store_keeps_only_the_hash(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    key, key_id = await s.create_key("--scopes", "a,b", name="nightly export")
    secret = key[len(f"gwk_{key_id}_"):]
    record = await s.stored(key_id)
    assert record.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert (record.user_id, record.name, record.scopes, record.expires_at) == (s.user_id, "nightly export", ["a", "b"], None)
    with sqlite3.connect(s.db_path) as conn:
        dump = "\n".join(conn.iterdump())
    conn.close()
    assert secret not in dump and key not in dump
    assert record.secret_hash in dump


# ---------------------------------------------------------------------------
# Scopes and sessions on routes
# ---------------------------------------------------------------------------


def scoped_routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/api/", "upstream": upstream_url, "auth": "required"},
        {"prefix": "/orders/", "upstream": upstream_url, "auth": "required", "scopes": ["orders:read"]},
        {"prefix": "/admin/", "upstream": upstream_url, "auth": "required", "scopes": ["orders:read", "admin"]},
        {"prefix": "/machines/", "upstream": upstream_url, "auth": "required", "allow_sessions": False},
        {"prefix": "/public/", "upstream": upstream_url, "auth": "public"},
    ]


@pytest.mark.gen_test(timeout=60)
async def test_route_scopes(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path, routes=scoped_routes(upstream.url))
    reader, _ = await s.create_key("--scopes", "orders:read", name="reader")
    admin, _ = await s.create_key("--scopes", "orders:read,admin", name="admin")
    plain, _ = await s.create_key(name="no scopes")

    assert (await s.get("/orders/1", reader)).code == 200
    assert upstream.last.header("X-Auth-Scopes") == "orders:read"
    count = len(upstream.seen)
    r = await s.get("/admin/1", reader)
    assert r.code == 403 and body(r)["error"] == "forbidden"
    assert "admin" in body(r)["message"]
    r = await s.get("/orders/1", plain, bearer=True)
    assert r.code == 403 and "orders:read" in body(r)["message"]
    assert len(upstream.seen) == count  # refused before the upstream
    assert (await s.get("/admin/1", admin)).code == 200
    assert upstream.last.header("X-Auth-Scopes") == "orders:read admin"
    # sessions pass scope checks
    assert (await s.rg.client.request("GET", "/admin/1", token=s.token)).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_allow_sessions_false(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path, routes=scoped_routes(upstream.url))
    key, _ = await s.create_key()
    r = await s.rg.client.request("GET", "/machines/x", token=s.token)
    assert r.code == 403 and body(r)["error"] == "forbidden"
    r = await s.get("/machines/x", key)
    assert r.code == 200
    assert upstream.last.header("X-Auth-Provider") == "apikey"


@pytest.mark.gen_test(timeout=60)
async def test_public_route_never_sees_the_key(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    key, _ = await s.create_key()
    for bearer in (False, True):
        r = await s.get("/public/x", key, bearer=bearer)
        assert r.code == 200
        seen = upstream.last
        assert seen.path == "/public/x"
        assert seen.header("X-API-Key") is None and seen.header("Authorization") is None
        assert not {canon(k) for k, _ in seen.headers} & IDENTITY
        assert all(key not in v for _, v in seen.headers)
    # even a malformed or unknown one is stripped, and not judged there
    r = await s.get("/public/x", "garbage-key")
    assert r.code == 200 and upstream.last.header("X-API-Key") is None
    r = await s.get("/public/x", "gwk_0123456789abcdef_" + "x" * 43, bearer=True)
    assert r.code == 200 and upstream.last.header("Authorization") is None
    # and so is a spelling an upstream would fold into X-API-Key
    r = await s.get("/public/x", headers={"X_Api_Key": key})
    assert r.code == 200
    assert all(key not in v for _, v in upstream.last.headers)
    assert "x-api-key" not in {canon(k) for k, _ in upstream.last.headers}


# ---------------------------------------------------------------------------
# Expiry, revocation, last use
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_expired_key(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    key, key_id = await s.create_key("--expires", "1s")
    record = await s.stored(key_id)
    assert record.expires_at is not None
    assert timedelta(0) < record.expires_at - record.created_at <= timedelta(seconds=1)
    code, out, _ = await cli("apikey", "list", "--config", s.config_path, "--user", s.user_id)
    assert code == 0 and key_id in out
    await asyncio.sleep(max(0.0, (record.expires_at - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    r = await s.get("/api/x", key)
    assert_refused(r, "expired")
    assert key not in r.body.decode()


@pytest.mark.gen_test(timeout=60)
async def test_revocation_takes_effect_within_cache_ttl(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path, apikey={"cache_ttl": "1s"})
    key, key_id = await s.create_key()
    other, _ = await s.create_key(name="other")
    assert (await s.get("/api/x", key)).code == 200  # now cached
    code, out, err = await cli("apikey", "revoke", "--config", s.config_path, key_id)
    assert code == 0, err
    assert key_id in out
    assert (await s.stored(key_id)).revoked_at is not None
    await asyncio.sleep(1.2)
    r = await s.get("/api/x", key)
    assert_refused(r, "revoked")
    r = await s.get("/api/x", key, bearer=True)
    assert_refused(r, "revoked")
    assert (await s.get("/api/x", other)).code == 200  # other keys unaffected
    # revoking again is fine; the first time stands
    first = (await s.stored(key_id)).revoked_at
    code, _, _ = await cli("apikey", "revoke", "--config", s.config_path, key_id)
    assert code == 0 and (await s.stored(key_id)).revoked_at == first


@pytest.mark.gen_test(timeout=60)
async def test_last_used_written_once_per_interval(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path, apikey={"last_used_interval": "1s", "cache_ttl": 0})
    key, key_id = await s.create_key()
    assert (await s.stored(key_id)).last_used_at is None
    assert (await s.get("/api/x", key)).code == 200
    first = (await s.stored(key_id)).last_used_at
    assert first is not None and abs(datetime.now(timezone.utc) - first) < timedelta(seconds=5)
    for _ in range(3):
        assert (await s.get("/api/x", key)).code == 200
    assert (await s.stored(key_id)).last_used_at == first  # within the interval: not written
    await asyncio.sleep(1.1)
    assert (await s.get("/api/x", key)).code == 200
    later = (await s.stored(key_id)).last_used_at
    assert later is not None and later > first
    code, out, _ = await cli("apikey", "list", "--config", s.config_path, "--user", s.user_id)
    assert code == 0 and later.strftime("%Y-%m-%dT%H:%M:%SZ") in out


@pytest.mark.gen_test(timeout=60)
async def test_failing_last_used_write_does_not_fail_the_request(make_gateway, upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    s = await start(make_gateway, upstream, tmp_path, apikey={"last_used_interval": "1s", "cache_ttl": "1h"})
    key, key_id = await s.create_key()
    assert (await s.get("/api/x", key)).code == 200  # cached and touched
    await asyncio.sleep(1.1)
    await s.rg.gateway.profiles.close()  # the profile store goes away
    r = await s.get("/api/x", key)
    assert r.code == 200  # served from the cache; the last-use write failed
    assert "last use" in caplog.text
    assert key.split("_", 2)[2] not in caplog.text
    # an uncached key needs the store: 503, not 500
    r = await s.get("/api/x", "gwk_0123456789abcdef_" + "x" * 43)
    assert r.code == 503 and body(r)["error"] == "unavailable"


@pytest.mark.gen_test(timeout=60)
async def test_disabled_plugin_ignores_keys(make_gateway, upstream, tmp_path):
    config = base_config(upstream.url, tmp_path, plugins={"disabled": ["apikey"]})
    rg = await make_gateway(config)
    r = await rg.client.request("GET", "/api/x", headers={"X-API-Key": "gwk_0123456789abcdef_" + "x" * 43})
    assert r.code == 401 and body(r)["error"] == "unauthenticated"
    assert (await rg.client.request("POST", "/auth/apikey/login", json_body={})).code == 404


@pytest.mark.gen_test(timeout=60)
async def test_no_login_endpoint(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    r = await s.rg.client.request("POST", "/auth/apikey/login", json_body={"key": "x"})
    assert r.code == 404 and body(r)["error"] == "not_found"


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=90)
async def test_cli_create_list_revoke(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    code, out, err = await cli("apikey", "create", "--config", s.config_path, "--user", s.user_id,
                               "--name", "nightly export", "--scopes", "orders:read, orders:write", "--expires", "30d")
    assert code == 0, err
    key, key_id = field(out, "key"), field(out, "id")
    assert out.count(key) == 1  # printed once
    expires = datetime.strptime(field(out, "expires"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs(expires - (datetime.now(timezone.utc) + timedelta(days=30))) < timedelta(minutes=1)
    record = await s.stored(key_id)
    assert record.scopes == ["orders:read", "orders:write"]

    code, out, err = await cli("apikey", "list", "--config", s.config_path, "--user", s.user_id)
    assert code == 0, err
    header, row = out.splitlines()
    for column in ("ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "REVOKED", "LAST USED"):
        assert column in header
    assert key_id in row and "nightly export" in row and "orders:read,orders:write" in row
    secret = key.split("_", 2)[2]
    assert secret not in out and record.secret_hash not in out and key not in out

    code, out, err = await cli("apikey", "revoke", "--config", s.config_path, key_id)
    assert code == 0, err
    code, out, _ = await cli("apikey", "list", "--config", s.config_path, "--user", s.user_id)
    revoked = (await s.stored(key_id)).revoked_at
    assert revoked is not None and revoked.strftime("%Y-%m-%dT%H:%M:%SZ") in out


@pytest.mark.gen_test(timeout=90)
async def test_cli_refusals(make_gateway, upstream, tmp_path):
    s = await start(make_gateway, upstream, tmp_path)
    base = ("--config", s.config_path)

    code, out, err = await cli("apikey", "create", *base, "--user", "u_nobody", "--name", "x")
    assert code == 1 and "u_nobody" in err and "no user" in err and "gwk_" not in out

    for bad in ("soon", "0", "-5s", "20y", "11000d"):
        code, out, err = await cli("apikey", "create", *base, "--user", s.user_id, "--name", "x", "--expires", bad)
        assert code == 2 and "--expires" in err and "gwk_" not in out, (bad, err)

    code, out, err = await cli("apikey", "create", *base, "--user", s.user_id, "--name", "x", "--scopes", 'a b,"c"')
    assert code == 2 and "scope" in err and "gwk_" not in out
    code, _, err = await cli("apikey", "create", *base, "--user", s.user_id, "--name", "  ")
    assert code == 2 and "name" in err

    code, _, err = await cli("apikey", "revoke", *base, "0123456789abcdef")
    assert code == 1 and "0123456789abcdef" in err
    code, _, err = await cli("apikey", "list", *base, "--user", "u_nobody")
    assert code == 1 and "u_nobody" in err

    # a whole key pasted into revoke is never echoed
    key, key_id = await s.create_key()
    code, out, err = await cli("apikey", "revoke", *base, key)
    assert code == 0 and key not in out + err and key_id in out

    # nothing was created by the refused commands
    assert [k.id for k in await s.rg.gateway.providers["apikey"].keys.list(s.user_id)] == [key_id]

    # a broken configuration: exit 2 naming the problem
    bad = tmp_path / "bad.toml"
    bad.write_text('[profiles]\nstore = "nosuch"\n')
    code, _, err = await cli("apikey", "list", "--config", str(bad), "--user", s.user_id)
    assert code == 2 and "profiles.store" in err


@pytest.mark.gen_test(timeout=60)
async def test_cli_unavailable_store_is_exit_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = tmp_path / "g.toml"
    config.write_text(f'[profiles]\nstore = "sqlite"\nsqlite_path = {json.dumps(str(blocker / "p.db"))}\n')
    code, out, err = await cli("apikey", "list", "--config", str(config), "--user", "u_x")
    assert code == 1 and "unavailable" in err and "Traceback" not in err


# ---------------------------------------------------------------------------
# A key beside a session cookie
# ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_key_sent_beside_a_session_cookie_speaks_for_the_request(make_gateway, upstream, tmp_path):
    routes = [{"prefix": "/scripts/", "upstream": upstream.url, "allow_sessions": False, "scopes": ["jobs"]},
              {"prefix": "/api/", "upstream": upstream.url}]
    setup = await start(make_gateway, upstream, tmp_path, routes=routes)
    key, key_id = await setup.create_key("--scopes", "jobs")
    cookie = {"Cookie": f"gw_session={setup.token}"}
    # the cookie alone is a session, refused on a keys-only route
    assert (await setup.get("/scripts/run", headers=cookie)).code == 403
    # with the key too, the key is the caller: a POST needs no CSRF proof
    r = await setup.rg.client.request("POST", "/scripts/run", body=b"{}", headers={**cookie, "X-API-Key": key})
    assert r.code == 200, r.body
    assert upstream.last.header("X-Auth-Provider") == "apikey"
    assert upstream.last.header("X-Session-Id") is None
    # a bad key is refused, whatever the cookie says
    await cli("apikey", "revoke", "--config", setup.config_path, key_id)
    bad = f"gwk_{'0' * 16}_{'x' * 43}"
    assert_refused(await setup.get("/api/x", bad, headers=cookie))


@pytest.mark.gen_test(timeout=60)
async def test_the_apikey_command_needs_only_the_profile_store(tmp_path):
    db = tmp_path / "p.db"
    config = tmp_path / "gw.toml"
    config.write_text(
        '[sessions]\nstore = "redis"\nredis_url_env = "UNSET_REDIS_URL"\nencryption_key_env = "UNSET_KEY"\n'
        f'[profiles]\nsqlite_path = {json.dumps(str(db))}\n')
    code, out, err = await cli("apikey", "list", "--config", str(config), "--user", "u_nobody")
    assert "UNSET_REDIS_URL" not in err and "UNSET_KEY" not in err
    assert code == 1 and "u_nobody" in err  # the store was opened and asked
    config.write_text(config.read_text() + '[profiles.nope]\n')
    code, out, err = await cli("apikey", "list", "--config", str(config), "--user", "u_nobody")
    assert code == 2 and "profiles.nope" in err


@pytest.mark.gen_test(timeout=60)
async def test_the_apikey_commands_read_the_configuration_path_from_the_environment(make_gateway, upstream, tmp_path):
    setup = await start(make_gateway, upstream, tmp_path)
    key, key_id = await setup.create_key(name="env bot")
    env = {**os.environ, "GATEWAY_CONFIG": setup.config_path}
    for argv in (("list", "--user", setup.user_id), ("revoke", key_id)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "apikey", *argv, cwd=str(ROOT), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        if argv[0] == "list":
            assert key_id in out.decode() and key not in out.decode()
    assert (await setup.stored(key_id)).revoked_at is not None
    # without either, the command says what it needs
    env.pop("GATEWAY_CONFIG")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "apikey", "list", "--user", setup.user_id, cwd=str(ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"--config" in err


@pytest.mark.gen_test(timeout=90)
async def test_cli_user_may_be_an_identity_and_a_miss_says_which_lookups_failed(make_gateway, upstream, tmp_path):
    """``--user password:alice`` names alice's user through her identity
    link; a value that matches neither a user id nor an identity says so."""
    s = await start(make_gateway, upstream, tmp_path)
    key, key_id = await s.create_key("--scopes", "orders:read", user="password:alice")
    assert (await s.stored(key_id)).user_id == s.user_id
    r = await s.get("/api/orders", key)
    assert r.code == 200, r.body
    assert upstream.last.header("X-User-Id") == s.user_id
    code, out, err = await cli("apikey", "list", "--config", s.config_path, "--user", "password:alice")
    assert code == 0 and key_id in out, err

    code, out, err = await cli("apikey", "create", "--config", s.config_path, "--user", "password:bob", "--name", "x")
    assert code == 1 and "gwk_" not in out
    assert "no user with id 'password:bob'" in err and "no 'password' identity with subject 'bob'" in err, err
    code, out, err = await cli("apikey", "create", "--config", s.config_path, "--user", "u_nobody", "--name", "x")
    assert code == 1 and "no user with id 'u_nobody'" in err and "provider:subject" in err, err
    code, out, err = await cli("apikey", "list", "--config", s.config_path, "--user", "nosuch:alice")
    assert code == 1 and "no 'nosuch' identity with subject 'alice'" in err, err
