"""The plugin system: every hook, failure isolation, and its documentation."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from pathlib import Path

import pytest

from gateway import hookimpl, hookspecs
from gateway.plugins import PluginError, get_plugin_manager
from gateway.testing import base_config, body

ROOT = Path(__file__).resolve().parent.parent

HERE = Path(__file__).parent


def load_recording_plugin():
    spec = importlib.util.spec_from_file_location("recording_plugin", HERE / "plugins" / "recording_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugin():
    return load_recording_plugin()


@pytest.fixture
def pgw(make_gateway, upstream, tmp_path, io_loop, plugin):
    pm = get_plugin_manager(extra_plugins=[("recording", plugin)])
    return io_loop.run_sync(lambda: make_gateway(base_config(upstream.url, tmp_path), pm=pm))


HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("gateway_"))


def test_builtin_password_plugin_comes_from_the_entry_point_group():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="gateway.plugins")}
    assert eps["password"] == "gateway_plugins.password"
    pm = get_plugin_manager()
    assert pm.get_plugin("password").__name__ == "gateway_plugins.password"
    assert get_plugin_manager(disabled=["password"]).get_plugin("password") is None


def test_misspelt_hook_implementation_is_a_startup_error():
    class Typo:
        @hookimpl
        def gateway_sesion_created(self, session):  # noqa: D401 - misspelt on purpose
            pass

    with pytest.raises(PluginError, match="gateway_sesion_created"):
        get_plugin_manager(extra_plugins=[("typo", Typo())])


@pytest.mark.gen_test
async def test_hook_gateway_startup(pgw, plugin):
    started = [names for event, names in plugin.events if event == "startup"]
    assert started and {"broken", "guest", "password"} <= set(started[-1])
    assert "wechat" not in started[-1]  # installed but off: no mini-program is configured


@pytest.mark.gen_test
async def test_hook_gateway_providers(pgw):
    r = await pgw.client.request("POST", "/auth/guest/login", json_body={"nick": "Zoë 🎸"})
    assert r.code == 200, r.body
    data = body(r)
    assert data["user"]["profile"] == {"nick": "Zoë 🎸"}
    assert data["session"]["provider"] == "guest"
    # the same subject logs in as the same user
    again = body(await pgw.client.request("POST", "/auth/guest/login", json_body={"nick": "Zoë 🎸"}))
    assert again["user"]["id"] == data["user"]["id"]
    # session data stays inside the gateway
    stored = await pgw.gateway.session_store.get(data["session"]["id"])
    assert stored["data"] == {"nick": "Zoë 🎸"}
    assert "nick" not in r.body.decode().split('"session"')[1].split('"user"')[0]


@pytest.mark.gen_test
async def test_failing_provider_gives_500_internal_and_names_the_plugin_in_the_log(pgw, caplog):
    caplog.set_level(logging.DEBUG)
    r = await pgw.client.request("POST", "/auth/broken/login", json_body={})
    assert r.code == 500
    assert body(r) == {"error": "internal", "message": "an internal error occurred"}
    assert b"secret-detail" not in r.body and b"Traceback" not in r.body
    assert "broken" in caplog.text
    # the gateway keeps serving
    assert (await pgw.client.request("GET", "/public/x")).code == 200


@pytest.mark.gen_test
async def test_hook_gateway_authenticate(pgw, upstream):
    r = await pgw.client.request("GET", "/api/data", headers={"X-Test-Key": "let-me-in"})
    assert r.code == 200, r.body
    seen = upstream.last
    assert seen.header("X-User-Id") == "u_key"
    assert seen.header("X-Auth-Provider") == "testkey"
    assert seen.header("X-Auth-Scopes") == "read write"
    assert seen.header("X-Session-Id") is None
    assert seen.header("X-Test-Key") is None  # the credential is not passed on
    r = await pgw.client.request("GET", "/api/data", headers={"X-Test-Key": "refuse"})
    assert r.code == 403 and body(r)["error"] == "forbidden"
    assert (await pgw.client.request("GET", "/api/data", headers={"X-Test-Key": "nope"})).code == 401


@pytest.mark.gen_test
async def test_failing_authenticate_hook_is_500_internal_with_plugin_named(pgw, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    count = len(upstream.seen)
    r = await pgw.client.request("GET", "/api/data", headers={"X-Test-Key": "explode"})
    assert r.code == 500 and body(r)["error"] == "internal"
    assert b"boom" not in r.body
    assert "'recording'" in caplog.text and "gateway_authenticate" in caplog.text
    assert len(upstream.seen) == count


@pytest.mark.gen_test
async def test_hook_gateway_session_created(pgw, plugin):
    reg = await pgw.client.register()
    assert ("created", reg["session"]["id"], "password") in plugin.events


@pytest.mark.gen_test
async def test_hook_gateway_session_refreshed(pgw, plugin):
    reg = await pgw.client.register()
    r = await pgw.client.request("POST", "/auth/refresh", token=reg["token"])
    assert r.code == 200
    assert ("refreshed", reg["session"]["id"], True) in plugin.events


@pytest.mark.gen_test
async def test_hook_gateway_session_revoked(pgw, plugin):
    reg = await pgw.client.register()
    r = await pgw.client.request("POST", "/auth/logout", token=reg["token"])
    assert r.code == 204
    assert ("revoked", reg["session"]["id"], "logout") in plugin.events


@pytest.mark.gen_test
async def test_hook_gateway_upstream_headers(pgw, upstream):
    reg = await pgw.client.register()
    await pgw.client.request("GET", "/api/x", token=reg["token"])
    assert upstream.last.header("X-Route-Prefix") == "/api/"
    assert upstream.last.header("X-Session-Id") == reg["session"]["id"]  # cannot be overridden


@pytest.mark.gen_test
async def test_hook_gateway_handlers(pgw):
    r = await pgw.client.request("GET", "/auth/test/ping", headers={"X-Test-Key": "let-me-in"})
    assert r.code == 200 and body(r) == {"pong": True, "user": "u_key"}


@pytest.mark.gen_test
async def test_hook_gateway_openapi(make_gateway, upstream, tmp_path, caplog):
    import tornado.web
    from openapi_spec_validator import validate

    class Status(tornado.web.RequestHandler):
        def get(self):
            self.write({"ok": True})

    def ping(name):
        return {"get": {"operationId": name, "summary": "Is it up?", "responses": {"200": {
            "description": "up", "content": {"application/json": {"schema": {"type": "object"}}}}}}}

    class StatusPage:
        @hookimpl
        def gateway_handlers(self, gateway):
            return [(gateway.auth_path("status", "ping"), Status), (r"/healthz", Status)]

        @hookimpl
        async def gateway_openapi(self, gateway):
            # keys without a leading "/" lie under auth_prefix; the gateway's own paths win
            return {"status/ping": ping("status_ping"), "/healthz": ping("healthz"), "session": ping("mine")}

    pm = get_plugin_manager(extra_plugins=[("status-page", StatusPage())])
    running = await make_gateway(base_config(upstream.url, tmp_path), pm=pm)
    doc = body(await running.client.request("GET", "/auth/openapi.json"))
    validate(doc)
    assert doc["paths"]["/auth/status/ping"] == ping("status_ping") and doc["paths"]["/healthz"] == ping("healthz")
    assert doc["paths"]["/auth/session"]["get"]["operationId"] == "get_session"
    assert "'status-page' describes /auth/session" in caplog.text  # the clash is logged, naming the plugin

    class Broken:
        @hookimpl
        def gateway_openapi(self):
            return ["not", "path", "items"]

    pm = get_plugin_manager(extra_plugins=[("broken-doc", Broken())])
    running = await make_gateway(base_config(upstream.url, tmp_path), pm=pm)
    caplog.clear()
    r = await running.client.request("GET", "/auth/openapi.json")
    assert r.code == 500 and body(r)["error"] == "internal"
    assert "broken-doc" in caplog.text and "gateway_openapi" in caplog.text
    assert (await running.client.request("GET", "/auth/session")).code == 401  # the rest keeps working


# ---------------------------------------------------------------------------
# Every hook is documented with its real signature, and has a test here.
# ---------------------------------------------------------------------------


def documented_hooks() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    found = {}
    for m in re.finditer(r"^### `(gateway_\w+)\(([^)]*)\)`", text, re.M):
        found[m.group(1)] = [a.strip() for a in m.group(2).split(",") if a.strip()]
    return found


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_arguments(hook):
    docs = documented_hooks()
    assert hook in docs, f"docs/plugins.md has no section '### `{hook}(...)`'"
    spec_args = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert docs[hook] == spec_args


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    source = Path(__file__).read_text()
    assert re.search(rf"^async def test_hook_{hook}\(|^def test_hook_{hook}\(", source, re.M), \
        f"tests/test_plugins.py has no test_hook_{hook}"


@pytest.mark.gen_test
async def test_a_plugin_failing_at_startup_stops_startup_naming_it(tmp_path):
    from gateway.app import Gateway
    from gateway.config import load_config
    from gateway.errors import GatewayError

    class Failing:
        @hookimpl
        def gateway_startup(self):
            raise RuntimeError("cannot reach my directory")

    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")}}, environ={})
    gw = Gateway(config, pm=get_plugin_manager(extra_plugins=[("directory-sync", Failing())]))
    with pytest.raises(GatewayError) as info:
        await gw.start()
    await gw.stop()
    assert "directory-sync" in info.value.detail and "gateway_startup" in info.value.detail


def test_hook_wrappers_are_refused_with_the_plugins_name():
    class Wrapping:
        @hookimpl(wrapper=True)
        def gateway_authenticate(self):
            return (yield)

    with pytest.raises(PluginError, match="'wrapping'.*wrappers"):
        get_plugin_manager(extra_plugins=[("wrapping", Wrapping())])


@pytest.mark.gen_test
async def test_one_failing_session_listener_does_not_silence_the_others(make_gateway, upstream, tmp_path, caplog):
    heard = []

    class Failing:
        @hookimpl(tryfirst=True)
        def gateway_session_created(self, session):
            raise RuntimeError("listener down")

    class Listening:
        @hookimpl
        def gateway_session_created(self, session):
            heard.append(session.id)

    pm = get_plugin_manager(extra_plugins=[("failing", Failing()), ("listening", Listening())])
    gw = await make_gateway(base_config(upstream.url, tmp_path), pm=pm)
    reg = await gw.client.register()
    assert heard == [reg["session"]["id"]]
    assert "'failing'" in caplog.text


@pytest.mark.parametrize("answer, expected", [
    ("coroutine", "must answer synchronously"),
    ("bare class", "must return a list"),
    ("raises", "gateway_providers failed"),
    ("init fails", "failed to start"),
])
def test_provider_hook_problems_are_config_errors_naming_the_plugin(tmp_path, answer, expected):
    from gateway.app import Gateway
    from gateway.config import ConfigError, load_config
    from gateway.api import Provider

    class Shaky(Provider):
        name = "shaky"

        def __init__(self, gateway, settings):
            if answer == "init fails":
                raise RuntimeError("no directory")
            super().__init__(gateway, settings)

    class Plugin:
        @hookimpl
        def gateway_providers(self):
            if answer == "coroutine":
                async def later():
                    return [Shaky]
                return later()
            if answer == "bare class":
                return Shaky
            if answer == "raises":
                raise RuntimeError("boom")
            return [Shaky]

    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")}}, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config, pm=get_plugin_manager(extra_plugins=[("shaky-plugin", Plugin())]))
    text = "\n".join(info.value.problems)
    assert expected in text and ("shaky-plugin" in text or "providers.shaky" in text)


@pytest.mark.gen_test
async def test_an_authenticator_answering_something_else_is_a_500(make_gateway, upstream, tmp_path):
    class Odd:
        @hookimpl
        def gateway_authenticate(self):
            return "u_123"

    gw = await make_gateway(base_config(upstream.url, tmp_path), pm=get_plugin_manager(extra_plugins=[("odd", Odd())]))
    r = await gw.client.request("GET", "/api/x")
    assert r.code == 500 and body(r)["error"] == "internal"
    assert upstream.seen == []


def test_hook_gateway_commands(tmp_path, capsys):
    """A plugin's subcommand runs with the configured profile store open; a
    GatewayError from it exits 1 with its message, a bad [profiles] table
    exits 2 before it runs; a disabled plugin's command does not exist."""
    import argparse
    import subprocess
    import sys

    from gateway.api import Command, CommandContext, GatewayError, add_config_option
    from gateway.cli import run_command

    seen: list[object] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        add_config_option(parser)
        parser.add_argument("--user", required=True)

    async def run(args: argparse.Namespace, ctx: CommandContext) -> int:
        if args.user == "fail":
            raise GatewayError("conflict", "that went wrong")
        seen.append(await ctx.profiles.get_user(args.user))
        user, _, _ = await ctx.profiles.resolve_identity("cli", args.user)
        print(f"made {user.id}")
        return 3

    command = Command("people", "manage people", configure, run)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[profiles]\nsqlite_path = "{tmp_path / "p.db"}"\n')
    parser = argparse.ArgumentParser()
    command.configure(parser)
    assert run_command(command, parser.parse_args(["--config", str(config), "--user", "bob"])) == 3
    assert seen == [None] and "made u_" in capsys.readouterr().out
    assert run_command(command, parser.parse_args(["--config", str(config), "--user", "fail"])) == 1
    assert "error: that went wrong" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[profiles]\nstore = "floppy"\n')
    assert run_command(command, parser.parse_args(["--config", str(bad), "--user", "bob"])) == 2
    assert "profiles.store" in capsys.readouterr().err

    # the built-in API-key plugin contributes "apikey" through this hook, and only while it is enabled
    help_text = subprocess.run([sys.executable, "-m", "gateway.cli", "--help"], capture_output=True, text=True,
                               cwd=str(ROOT)).stdout
    assert "apikey" in help_text
    off = tmp_path / "off.toml"
    off.write_text(f'[profiles]\nsqlite_path = "{tmp_path / "p.db"}"\n[plugins]\ndisabled = ["apikey"]\n')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "apikey", "list", "--config", str(off),
                           "--user", "u_x"], capture_output=True, text=True, cwd=str(ROOT))
    assert done.returncode == 2 and "invalid choice: 'apikey'" in done.stderr
