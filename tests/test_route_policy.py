"""Core policy features: route scopes and allow_sessions, credential headers
stripped everywhere, sealed session secrets, providers that are switched off.

A plugin principal comes from the recording test plugin's
``gateway_authenticate`` (``X-Test-Key: let-me-in`` -> scopes read, write).
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from gateway import hookimpl
from gateway.app import Gateway
from gateway.config import ConfigError, load_config
from gateway.crypto import Sealer, parse_key
from gateway.plugins import get_plugin_manager
from gateway.api import Provider
from gateway.testing import assert_error, base_config, body


def load_recording_plugin() -> ModuleType:
    """tests/plugins/recording_plugin.py, loaded afresh."""
    path = Path(__file__).parent / "plugins" / "recording_plugin.py"
    spec = importlib.util.spec_from_file_location("recording_plugin", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KEY = {"X-Test-Key": "let-me-in"}  # scopes: read, write


@pytest.fixture
def policy_gw(make_gateway, upstream, tmp_path, io_loop):
    routes = [
        {"prefix": "/read/", "upstream": upstream.url, "scopes": ["read"]},
        {"prefix": "/admin/", "upstream": upstream.url, "scopes": ["read", "admin", "audit"]},
        {"prefix": "/keys-only/", "upstream": upstream.url, "allow_sessions": False},
        {"prefix": "/any/", "upstream": upstream.url},
        {"prefix": "/public/", "upstream": upstream.url, "auth": "public"},
        {"prefix": "/optional/", "upstream": upstream.url, "auth": "optional", "scopes": ["read"]},
    ]
    pm = get_plugin_manager(extra_plugins=[("recording", load_recording_plugin())])
    return io_loop.run_sync(lambda: make_gateway(base_config(upstream.url, tmp_path, routes=routes), pm=pm))


@pytest.mark.gen_test
async def test_a_plugin_principal_needs_every_scope_of_the_route(policy_gw, upstream):
    r = await policy_gw.client.request("GET", "/read/x", headers=KEY)
    assert r.code == 200
    assert upstream.last.header("X-Auth-Scopes") == "read write"
    assert upstream.last.header("X-User-Id") == "u_key"
    r = await policy_gw.client.request("GET", "/admin/x", headers=KEY)
    assert r.code == 403 and body(r)["error"] == "forbidden"
    assert "admin audit" in body(r)["message"]  # names exactly what is missing
    assert upstream.last.path == "/read/x"  # the refused request never reached the upstream


@pytest.mark.gen_test
async def test_sessions_pass_scope_checks_where_the_route_allows_sessions(policy_gw, upstream):
    token = (await policy_gw.client.register())["token"]
    assert (await policy_gw.client.request("GET", "/admin/x", token=token)).code == 200
    assert upstream.last.header("X-Auth-Scopes") is None
    r = await policy_gw.client.request("GET", "/keys-only/x", token=token)
    assert r.code == 403 and body(r)["error"] == "forbidden"
    assert (await policy_gw.client.request("GET", "/keys-only/x", headers=KEY)).code == 200
    assert (await policy_gw.client.request("GET", "/keys-only/x")).code == 401


@pytest.mark.gen_test
async def test_optional_route_with_scopes(policy_gw, upstream):
    assert (await policy_gw.client.request("GET", "/optional/x")).code == 200  # anonymous passes
    assert upstream.last.header("X-User-Id") is None
    assert (await policy_gw.client.request("GET", "/optional/x", headers=KEY)).code == 200
    assert upstream.last.header("X-User-Id") == "u_key"


@pytest.mark.gen_test
async def test_credential_headers_never_reach_an_upstream_even_on_public_routes(policy_gw, upstream):
    r = await policy_gw.client.request("GET", "/public/x", headers={**KEY, "X-Other": "kept"})
    assert r.code == 200
    seen = upstream.last
    assert seen.header("X-Test-Key") is None and seen.header("X-Other") == "kept"
    assert seen.header("X-User-Id") is None  # a public route authenticates no one
    assert (await policy_gw.client.request("GET", "/any/x", headers=KEY)).code == 200
    assert upstream.last.header("X-Test-Key") is None


def test_sealer_round_trip_and_refusals():
    sealer = Sealer(parse_key(base64.b64encode(b"k" * 32).decode()))
    sealed = sealer.seal(b"session-key-bytes", "ctx-1")
    assert b"session-key-bytes" not in base64.urlsafe_b64decode(sealed[3:])
    assert sealer.open(sealed, "ctx-1") == b"session-key-bytes"
    assert sealer.seal(b"same", "c") != sealer.seal(b"same", "c")  # fresh nonce each time
    with pytest.raises(ValueError):
        sealer.open(sealed, "ctx-2")  # bound to its context
    with pytest.raises(ValueError):
        Sealer(b"o" * 32).open(sealed, "ctx-1")  # another key
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    for bad in (tampered, sealed[:20], "v1.!!!", "plain", ""):
        with pytest.raises(ValueError):
            sealer.open(bad, "ctx-1")
    with pytest.raises(ValueError, match="32 bytes"):
        parse_key(base64.b64encode(b"short").decode())


def test_encryption_key_from_the_environment(tmp_path):
    key = base64.b64encode(bytes(range(32))).decode()
    config = load_config(data={"sessions": {"encryption_key_env": "GW_KEY"},
                               "profiles": {"sqlite_path": str(tmp_path / "p.db")}}, environ={"GW_KEY": key})
    gateway = Gateway(config)
    assert not gateway.sealer.ephemeral
    assert Sealer(bytes(range(32))).open(gateway.sealer.seal(b"x")) == b"x"


def test_no_encryption_key_means_a_per_process_key(tmp_path):
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")}}, environ={})
    assert Gateway(config).sealer.ephemeral


@pytest.mark.gen_test
async def test_a_provider_that_is_off_has_no_endpoints(gw):
    # The built-in WeChat provider is installed, but no mini-program is configured.
    assert "wechat" not in gw.gateway.providers
    r = await gw.client.request("POST", "/auth/wechat/login", json_body={"code": "x"})
    assert r.code == 404 and body(r)["error"] == "not_found"


def test_a_switched_off_provider_still_has_its_table_checked(tmp_path):
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                               "providers": {"wechat": {"timeout": "soon"}}}, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config)
    assert any(p.startswith("providers.wechat.timeout:") for p in info.value.problems)


def test_a_provider_that_refuses_its_table_is_not_reported_as_missing(tmp_path):
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                               "providers": {"wechat": {"apps": {"main": {"appid": "nope", "secret": "s"}}}}},
                         environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config)
    assert any(p.startswith("providers.wechat.apps.main.appid:") for p in info.value.problems)
    assert not any("no installed plugin" in p for p in info.value.problems), info.value.problems


class LeakyProvider(Provider):
    name = "leaky"

    def credential_headers(self, request):
        raise RuntimeError("bug")


class _Leaky:
    """A provider plugin whose credential_headers has a bug."""

    @hookimpl
    def gateway_providers(self):
        return [LeakyProvider]


@pytest.mark.gen_test
async def test_a_failing_credential_headers_fails_closed(make_gateway, upstream, tmp_path, caplog):
    pm = get_plugin_manager(extra_plugins=[("leaky", _Leaky())])
    rg = await make_gateway(base_config(upstream.url, tmp_path), pm=pm)
    r = await rg.client.request("GET", "/public/x", headers={"X-Secret-Credential": "abc"})
    assert r.code == 500 and body(r)["error"] == "internal"
    assert upstream.seen == []  # nothing reached the upstream
    assert any("leaky" in rec.getMessage() and "credential_headers" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("line, secret", [
    ("GET /x?client_secret=s1&a=1", "s1"),
    ("GET /x?refresh_token=s2", "s2"),
    ("GET /x?id_token=s3&api_token=s4", "s3"),
    ("POST /x new_password=s5", "s5"),
    ("GET /sns/jscode2session?appid=wx1&secret=s6&js_code=s7", "s7"),
    ("GET /cb?code=s8&state=1", "s8"),
    ("access_token=s9", "s9"),
    ("Authorization: Bearer gws_abcDEF-123_x", "abcDEF"),
    ("X-API-Key: gwk_0123456789abcdef_sec-ret_value", "sec-ret"),
    ("redis://user:pa55word@host:6379/0", "pa55word"),
])
def test_log_lines_lose_their_secrets(line, secret):
    from gateway.logs import install_redaction, redact

    install_redaction(prefixes=("gwk_",))  # as a gateway does with the API-key provider loaded
    assert secret not in redact(line)


def test_redaction_leaves_error_codes_alone():
    from gateway.logs import redact

    assert redact("WeChat code2Session: errcode=40029 errmsg=invalid") == "WeChat code2Session: errcode=40029 errmsg=invalid"


@pytest.mark.gen_test
async def test_a_disabled_providers_credential_rules_go_with_it(make_gateway, upstream, tmp_path):
    """With the API-key plugin loaded, its keys never reach an upstream;
    disabled, it leaves no rule behind: such values are the upstream's own."""
    key = "gwk_0123456789abcdef_" + "s" * 24
    on = await make_gateway(base_config(upstream.url, tmp_path))
    off = await make_gateway(base_config(upstream.url, tmp_path, plugins={"disabled": ["apikey"]}))
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer\t{key}"}):
        r = await on.client.request("GET", "/public/x", headers=headers)
        assert r.code == 200
        assert upstream.last.header("X-API-Key") is None and upstream.last.header("Authorization") is None
        r = await off.client.request("GET", "/public/x", headers=headers)
        assert r.code == 200
        assert key in (upstream.last.header("X-API-Key") or upstream.last.header("Authorization") or "")
    assert_error(await on.client.request("GET", f"/public/x?k={key}"), 400, "invalid_request")
    assert (await off.client.request("GET", f"/public/x?k={key}")).code == 200


@pytest.mark.gen_test
async def test_a_switched_off_providers_reserved_headers_are_still_dropped(gw, upstream):
    # WeChat is installed but off here; an upstream may still trust its headers.
    assert "wechat" not in gw.gateway.providers
    r = await gw.client.request("GET", "/public/x", headers={"X-WeChat-OpenId": "o-forged", "X_WeChat_AppId": "wx"})
    assert r.code == 200
    assert not {n for n in upstream.last.names() if "wechat" in n.lower().replace("_", "-")}
