"""Configuration loading and ``gateway check-config``.

``load_config`` is exercised with dicts (what tomllib would hand it) and with
real TOML files; the CLI is run as a subprocess, exactly as an operator would.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import (
    ROUTE as ROUTE_OPTIONS,
    SECTIONS,
    Config,
    ConfigError,
    PluginsConfig,
    ProfilesConfig,
    RouteConfig,
    ServerConfig,
    SessionsConfig,
    describe_options,
    load_config,
    options_of,
    read_config,
)
from gateway.options import Option, Section, parse_duration, parse_size, validate_table
from gateway.routing import Route

from password_support import FAST_ARGON2

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_BIN = ROOT / ".venv" / "bin" / "gateway"
LAUNCHER = ROOT / "bin" / "gateway"
ROUTE = {"prefix": "/api/", "upstream": "http://127.0.0.1:9000"}


def problems_of(data: dict, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(data=data, environ=environ or {})
    assert info.value.problems, "a ConfigError must list its problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def assert_named(problems: list[str], key: str) -> None:
    assert any(p.startswith(key + ":") for p in problems), (key, problems)


# ---------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw, seconds", [
    ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0), (45, 45.0), (0, 0.0),
    ("250ms", 0.25), ("1.5h", 5400.0), ("15", 15.0), (2.5, 2.5),
])
def test_durations(raw, seconds):
    assert parse_duration(raw) == pytest.approx(seconds)
    cfg = load_config(data={"sessions": {"rotation_grace": raw}}, environ={})
    assert cfg.sessions.rotation_grace == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["soon", "10 minutes", "-5s", "5w", "", True, [30], {"s": 1}, -1,
                                 float("nan"), float("inf")])
def test_bad_durations(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)
    assert_named(problems_of({"sessions": {"idle_timeout": raw}}), "sessions.idle_timeout")


def test_positive_duration_rejects_zero():
    assert_named(problems_of({"sessions": {"idle_timeout": 0}}), "sessions.idle_timeout")
    assert_named(problems_of({"routes": [{**ROUTE, "request_timeout": "0s"}]}), "routes[0].request_timeout")


@pytest.mark.parametrize("raw, size", [
    ("10MiB", 10 * 2**20), ("1KiB", 1024), ("2GiB", 2 * 2**30), ("5MB", 5_000_000), ("512B", 512),
    (1048576, 1048576), ("4096", 4096),
])
def test_sizes(raw, size):
    assert parse_size(raw) == size
    assert load_config(data={"server": {"max_body_size": raw}}, environ={}).server.max_body_size == size


@pytest.mark.parametrize("raw", ["10 megabytes", "1.5MiB", "-1", -1, "10mib", True, 1.5, "", [1]])
def test_bad_sizes(raw):
    with pytest.raises(ValueError):
        parse_size(raw)
    assert_named(problems_of({"server": {"max_body_size": raw}}), "server.max_body_size")


def test_defaults():
    cfg = load_config(data={}, environ={})
    assert cfg.server.port == 8080
    assert cfg.server.max_body_size == 10 * 2**20
    assert cfg.sessions.idle_timeout == 1800.0
    assert cfg.sessions.absolute_timeout == 7 * 86400.0
    assert cfg.sessions.store == "memory"
    assert cfg.routes == ()


def test_route_defaults_and_values():
    cfg = load_config(data={"routes": [ROUTE, {"prefix": "/p/", "upstream": "https://x.example/base/",
                                               "auth": "public", "strip_prefix": True, "request_timeout": "2m"}]},
                      environ={})
    first, second = cfg.routes
    assert (first.auth, first.strip_prefix, first.request_timeout, first.connect_timeout) == ("required", False,
                                                                                            30.0, 5.0)
    assert (second.auth, second.strip_prefix, second.request_timeout) == ("public", True, 120.0)
    assert second.upstream == "https://x.example/base"


# ---------------------------------------------------------------------------
# The typed, frozen configuration
# ---------------------------------------------------------------------------

SECTION_CLASSES = {"server": ServerConfig, "sessions": SessionsConfig, "profiles": ProfilesConfig,
                   "plugins": PluginsConfig}


def test_the_option_lists_are_the_dataclass_fields():
    for name, cls in SECTION_CLASSES.items():
        assert [o.name for o in SECTIONS[name]] == [f.name for f in dataclasses.fields(cls)]
        assert options_of(cls) == SECTIONS[name]
    assert [o.name for o in ROUTE_OPTIONS] == [f.name for f in dataclasses.fields(RouteConfig)]
    # A route option the proxy never hears of would be a silent no-op.
    assert set(Route.__dataclass_fields__) == {o.name for o in ROUTE_OPTIONS}


def test_dataclass_defaults_are_the_checked_option_defaults():
    cfg = load_config(data={}, environ={})
    assert cfg.server == ServerConfig()
    assert cfg.sessions == SessionsConfig()
    assert cfg.profiles == ProfilesConfig()
    assert cfg.plugins == PluginsConfig()
    assert ServerConfig().max_body_size == 10 * 2**20 and ServerConfig().trusted_proxies == ()


@pytest.mark.parametrize("section, name", [("server", "port"), ("sessions", "idle_timeout"),
                                           ("profiles", "store"), ("plugins", "disabled")])
def test_core_sections_are_frozen(section, name):
    cfg = load_config(data={}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(getattr(cfg, section), name, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, section, None)
    assert not hasattr(getattr(cfg, section), "values")
    with pytest.raises(TypeError):
        getattr(cfg, section)[name]


def test_routes_and_list_values_are_frozen():
    cfg = load_config(data={"routes": [{**ROUTE, "scopes": ["a"]}],
                            "server": {"trusted_proxies": ["10.0.0.0/8"]}}, environ={})
    assert isinstance(cfg.routes, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.routes[0].prefix = "/other/"  # type: ignore[misc]
    assert cfg.routes[0].scopes == ("a",)
    assert isinstance(cfg.server.trusted_proxies, tuple)


def test_with_server_makes_a_new_config():
    cfg = load_config(data={"routes": [ROUTE]}, environ={})
    moved = cfg.with_server(host="0.0.0.0", port=9999)
    assert (moved.server.host, moved.server.port) == ("0.0.0.0", 9999)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert moved.server.workers == cfg.server.workers and moved.routes == cfg.routes
    assert isinstance(moved, Config)
    with pytest.raises(TypeError):
        cfg.with_server(hots="0.0.0.0")


def test_cross_field_checks_have_no_side_effects():
    server = ServerConfig(workers=2)
    sessions = SessionsConfig(touch_interval=60.0, idle_timeout=30.0)
    first = sessions.check(server)
    assert first == sessions.check(server) and sessions == SessionsConfig(touch_interval=60.0, idle_timeout=30.0)
    assert [p.split(":", 1)[0] for p in first] == ["sessions.store", "sessions.touch_interval"]
    route = RouteConfig(prefix="/auth/x/", upstream="http://x", auth="public", scopes=("a",), allow_sessions=False)
    assert [p.split(":", 1)[0] for p in route.check("routes[3]", ServerConfig())] == [
        "routes[3].prefix", "routes[3].scopes", "routes[3].allow_sessions"]
    assert route.check("routes[0]", ServerConfig(auth_prefix="/gw")) == [
        "routes[0].scopes: a public route authenticates no one, so it cannot require scopes",
        "routes[0].allow_sessions: a public route authenticates no one, so it cannot refuse sessions"]


def test_read_config_keeps_defaults_for_bad_values():
    cfg, problems = read_config(data={"server": {"port": "x"}, "routes": [{"prefix": "/a/"}, ROUTE]}, environ={})
    assert_named(problems, "server.port")
    assert_named(problems, "routes[0].upstream")
    assert cfg.server.port == 8080
    assert [r.prefix for r in cfg.routes] == ["/api/"]  # an incomplete route is reported, not kept


def test_a_route_without_max_body_size_takes_the_servers():
    cfg = load_config(data={"server": {"max_body_size": "1KiB"}, "routes": [ROUTE, {**ROUTE, "prefix": "/b/",
                                                                                   "max_body_size": 0}]},
                      environ={})
    assert [r.max_body_size for r in cfg.routes] == [1024, 0]
    assert [Route.from_config(r).max_body_size for r in cfg.routes] == [1024, 0]


def test_secrets_stay_out_of_reprs():
    cfg = load_config(data={"sessions": {"redis_url": "redis://:repr-secret@h/0"}}, environ={})
    assert "repr-secret" not in repr(cfg.sessions) and "repr-secret" not in repr(cfg)
    section = validate_table("providers.x", [Option("token", str, None, "a secret", secret=True)],
                             {"token": "repr-secret"}, [], {})
    assert section.token == "repr-secret"
    assert "repr-secret" not in repr(section)


def test_a_provider_section_is_read_by_attribute_only():
    problems: list[str] = []
    section = validate_table("providers.x", [Option("cache_ttl", parse_duration, "5s", "how long")],
                             {}, problems, {})
    assert problems == []
    assert section.cache_ttl == 5.0
    with pytest.raises(AttributeError):
        section.nope
    with pytest.raises(TypeError):
        section["cache_ttl"]  # type: ignore[index]
    for name in ("get", "values", "__getitem__"):
        assert not hasattr(section, name), name
    with pytest.raises(AttributeError):
        section.cache_ttl = 1.0
    with pytest.raises(AttributeError):
        del section.cache_ttl
    copy = section.as_dict()
    copy["cache_ttl"] = 1.0
    assert section.cache_ttl == 5.0
    assert section == Section({"cache_ttl": 5.0})


def test_a_providers_settings_are_a_frozen_section(tmp_path):
    cfg = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                            "providers": {"password": {"min_length": 12, **FAST_ARGON2}}}, environ={})
    settings = Gateway(cfg).providers["password"].settings
    assert isinstance(settings, Section) and settings.min_length == 12
    with pytest.raises(AttributeError):
        settings.min_length = 1


#: every generic checker a plugin may use, by its public name
PUBLIC_CHECKERS = ["parse_duration", "parse_size", "STR", "INT", "BOOL", "NONNEG_INT", "DURATION",
                   "POSITIVE_DURATION", "SIZE", "at_least", "choice", "pattern", "http_url", "str_list", "SCOPE",
                   "scopes", "networks", "origins", "port", "optional_size", "MAX_DURATION"]


@pytest.mark.parametrize("name", PUBLIC_CHECKERS + ["ConfigError", "Option", "Section", "validate_table"])
def test_every_public_checker_is_importable_from_gateway_options(name):
    import gateway.options

    assert name in gateway.options.__all__
    assert getattr(gateway.options, name) is not None


def test_public_checkers_behave():
    import re

    from gateway import options

    assert options.http_url("https://api.example.com/") == "https://api.example.com"
    assert options.pattern(re.compile(r"^wx\w+$"), "an AppID")("wx1") == "wx1"
    assert options.choice("a", "b")("b") == "b"
    assert options.at_least(options.INT, 2)(3) == 3
    assert options.str_list(["a"]) == ("a",)
    assert options.scopes(["orders:read"]) == ("orders:read",)
    assert [str(n) for n in options.networks(["10.0.0.1"])] == ["10.0.0.1/32"]
    assert options.origins(["HTTPS://App.Example.com/"]) == ("https://app.example.com",)
    assert options.port(0) == 0 and options.optional_size(None) is None and options.optional_size("1KiB") == 1024
    assert options.SCOPE.match("a:b") and options.MAX_DURATION == 10 * 365 * 86400.0
    for check, bad in [(options.http_url, "ftp://x"), (options.choice("a"), "b"), (options.at_least(options.INT, 2), 1),
                       (options.str_list, "a"), (options.scopes, ["a b"]), (options.networks, ["x"]),
                       (options.origins, ["https://x/path"]), (options.port, 65536), (options.BOOL, 1),
                       (options.STR, 1), (options.INT, True), (options.NONNEG_INT, -1),
                       (options.POSITIVE_DURATION, 0), (options.SIZE, -1)]:
        with pytest.raises(ValueError):
            check(bad)


def test_the_options_module_imports_only_the_standard_library():
    import gateway.options

    tree = ast.parse(Path(gateway.options.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import"
            imported.add(node.module or "")
    assert imported, "the walk found no imports at all"
    assert not [m for m in imported if m.split(".")[0] not in sys.stdlib_module_names], imported


def test_the_reference_tables_come_from_the_dataclasses():
    tables = describe_options()
    assert list(tables) == ["[server]", "[sessions]", "[profiles]", "[profiles.fields.<name>]", "[plugins]",
                            "[consent]", "[consent.documents.<name>]", "[admin]", "[assertion]",
                            "[[assertion.keys]]", "[logging]", "[tracing]", "[[routes]]", "[[rate_limits]]"]
    assert "| `port` | `8080` | port to listen on |" in tables["[server]"]
    assert "| `redis_url` | `\"redis://127.0.0.1:6379/0\"` | Redis URL (redis://, rediss://, unix://) (or `redis_url_env`) |" \
        in tables["[sessions]"]
    assert "| `prefix` | `(required)` |" in tables["[[routes]]"]
    assert "| `max_body_size` | `(unset)` |" in tables["[[routes]]"]


# ---------------------------------------------------------------------------
# Problems name their keys
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("data, key", [
    ({"server": {"port": "8080"}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"workers": 0}}, "server.workers"),
    ({"server": {"host": 127}}, "server.host"),
    ({"server": {"trusted_proxies": ["not-an-ip"]}}, "server.trusted_proxies"),
    ({"server": {"trusted_proxies": "127.0.0.1"}}, "server.trusted_proxies"),
    ({"server": {"auth_prefix": "auth"}}, "server.auth_prefix"),
    ({"sessions": {"cookie_secure": "yes"}}, "sessions.cookie_secure"),
    ({"sessions": {"store": "postgres"}}, "sessions.store"),
    ({"sessions": {"max_per_user": -1}}, "sessions.max_per_user"),
    ({"sessions": {"allowed_origins": ["https://ok.example/path"]}}, "sessions.allowed_origins"),
    ({"sessions": {"cookie_samesite": "None", "cookie_secure": False}}, "sessions.cookie_samesite"),
    ({"profiles": {"store": "mysql"}}, "profiles.store"),
    ({"plugins": {"disabled": "password"}}, "plugins.disabled"),
    ({"server": {"nope": 1}}, "server.nope"),
    ({"sessions": {"idle_timout": "30m"}}, "sessions.idle_timout"),
    ({"nope": {"x": 1}}, "nope"),
    ({"server": 5}, "server"),
    ({"routes": [{"prefix": "api", "upstream": "http://x"}]}, "routes[0].prefix"),
    ({"routes": [{"prefix": "/a/", "upstream": "ftp://x"}]}, "routes[0].upstream"),
    ({"routes": [{"prefix": "/a/"}]}, "routes[0].upstream"),
    ({"routes": [{"upstream": "http://x"}]}, "routes[0].prefix"),
    ({"routes": [{"prefix": "/a/", "upstream": "http://x", "auth": "maybe"}]}, "routes[0].auth"),
    ({"routes": [{"prefix": "/a/", "upstream": "http://x", "extra": 1}]}, "routes[0].extra"),
    ({"routes": [ROUTE, {**ROUTE}]}, "routes[1].prefix"),
    ({"routes": {"prefix": "/a/"}}, "routes"),
    ({"routes": [{**ROUTE, "scopes": "orders:read"}]}, "routes[0].scopes"),
    ({"routes": [{**ROUTE, "scopes": ["has space"]}]}, "routes[0].scopes"),
    ({"routes": [{**ROUTE, "scopes": ['quote"d']}]}, "routes[0].scopes"),
    ({"routes": [{**ROUTE, "auth": "public", "scopes": ["a"]}]}, "routes[0].scopes"),
    ({"routes": [{**ROUTE, "allow_sessions": "no"}]}, "routes[0].allow_sessions"),
    ({"routes": [{**ROUTE, "auth": "public", "allow_sessions": False}]}, "routes[0].allow_sessions"),
    ({"sessions": {"encryption_key": "not base64!"}}, "sessions.encryption_key"),
    ({"sessions": {"encryption_key": "c2hvcnQ="}}, "sessions.encryption_key"),
])
def test_problem_names_its_key(data, key):
    assert_named(problems_of(data), key)


def test_every_problem_is_listed_at_once():
    problems = problems_of({
        "server": {"port": "x", "nope": True},
        "sessions": {"idle_timeout": "soon", "cookie_secure": "yes"},
        "profiles": {"store": "mysql"},
        "routes": [{"prefix": "/a/", "upstream": "gopher://x"}],
        "extra": {},
    })
    for key in ("server.port", "server.nope", "sessions.idle_timeout", "sessions.cookie_secure",
                "profiles.store", "routes[0].upstream", "extra"):
        assert_named(problems, key)
    assert len(problems) == 7, problems


def test_memory_store_needs_one_worker():
    assert_named(problems_of({"server": {"workers": 2}, "sessions": {"store": "memory"}}), "sessions.store")
    # The default store is memory too.
    assert_named(problems_of({"server": {"workers": 2}}), "sessions.store")
    cfg = load_config(data={"server": {"workers": 2}, "sessions": {"store": "redis"}}, environ={})
    assert cfg.server.workers == 2


@pytest.mark.parametrize("prefix", ["/auth/", "/auth", "/auth/x/"])
def test_route_under_auth_prefix_is_an_error(prefix):
    problems = problems_of({"routes": [ROUTE, {"prefix": prefix, "upstream": "http://127.0.0.1:9000"}]})
    assert_named(problems, "routes[1].prefix")
    assert "auth_prefix" in " ".join(problems)


def test_route_under_custom_auth_prefix():
    assert_named(problems_of({"server": {"auth_prefix": "/gw"}, "routes": [{**ROUTE, "prefix": "/gw/x/"}]}),
                 "routes[0].prefix")
    # /auth/ is an ordinary prefix once auth_prefix moved, and /authz/ never was under /auth.
    cfg = load_config(data={"server": {"auth_prefix": "/gw"}, "routes": [{**ROUTE, "prefix": "/auth/"}]},
                      environ={})
    assert cfg.routes[0].prefix == "/auth/"
    assert load_config(data={"routes": [{**ROUTE, "prefix": "/authz/"}]}, environ={}).routes[0].prefix == "/authz/"


# ---------------------------------------------------------------------------
# Secrets and the environment
# ---------------------------------------------------------------------------


def test_secret_from_environment():
    cfg = load_config(data={"sessions": {"store": "redis", "redis_url_env": "GW_REDIS"}},
                      environ={"GW_REDIS": "redis://:s3cret@10.0.0.5:6380/2"})
    assert cfg.sessions.redis_url == "redis://:s3cret@10.0.0.5:6380/2"


def test_environ_defaults_to_process_environment(monkeypatch):
    monkeypatch.setenv("GW_TEST_REDIS_URL", "redis://127.0.0.1:6390/1")
    cfg = load_config(data={"sessions": {"redis_url_env": "GW_TEST_REDIS_URL"}})
    assert cfg.sessions.redis_url == "redis://127.0.0.1:6390/1"


def test_missing_environment_variable_is_an_error():
    problems = problems_of({"sessions": {"redis_url_env": "GW_NOT_SET"}}, environ={"OTHER": "x"})
    assert_named(problems, "sessions.redis_url_env")
    assert "GW_NOT_SET" in problems[0]


def test_env_name_must_be_a_string_and_not_both():
    assert_named(problems_of({"sessions": {"redis_url_env": 5}}), "sessions.redis_url_env")
    assert_named(problems_of({"sessions": {"redis_url": "redis://x", "redis_url_env": "V"}}, {"V": "redis://y"}),
                 "sessions.redis_url")


def test_env_suffix_only_for_secrets():
    assert_named(problems_of({"sessions": {"cookie_name_env": "V"}}, {"V": "sid"}), "sessions.cookie_name_env")


@pytest.mark.parametrize("data, environ, secret", [
    ({"sessions": {"redis_url": "http://user:hunter2-inline@redis.example"}}, {}, "hunter2-inline"),
    ({"sessions": {"redis_url_env": "R"}}, {"R": "mysql://root:hunter2-env@db"}, "hunter2-env"),
    ({"sessions": {"redis_url": 12345678}}, {}, "12345678"),
    ({"profiles": {"mongodb_url": ["mongodb://u:hunter2-mongo@h"]}}, {}, "hunter2-mongo"),
    ({"profiles": {"mongodb_url_env": "M"}, "server": {"port": "x"}}, {"M": "mongodb://u:hunter2-ok@h"},
     "hunter2-ok"),
])
def test_secret_values_never_appear_in_problems(data, environ, secret):
    problems = problems_of(data, environ)
    assert secret not in "\n".join(problems)
    with pytest.raises(ConfigError) as info:
        load_config(data=data, environ=environ)
    assert secret not in str(info.value)


# ---------------------------------------------------------------------------
# Providers (validated when the gateway is built)
# ---------------------------------------------------------------------------


def gateway_problems(data: dict, tmp_path: Path) -> list[str]:
    data = {"profiles": {"sqlite_path": str(tmp_path / "p.db")}, **data}
    cfg = load_config(data=data, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(cfg)
    return info.value.problems


def test_unknown_provider_is_an_error(tmp_path):
    problems = gateway_problems({"providers": {"nosuch": {"x": 1}, "password": dict(FAST_ARGON2)}}, tmp_path)
    assert_named(problems, "providers.nosuch")
    assert len(problems) == 1, problems


def test_bad_provider_option_is_an_error(tmp_path):
    problems = gateway_problems({"providers": {"password": {"min_length": "x", "colour": "blue",
                                                            "lockout_window": "soon"}}}, tmp_path)
    assert_named(problems, "providers.password.min_length")
    assert_named(problems, "providers.password.colour")
    assert_named(problems, "providers.password.lockout_window")


def test_good_provider_options(tmp_path):
    cfg = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                            "providers": {"password": {"min_length": 12, "lockout_window": "1h", **FAST_ARGON2}}},
                      environ={})
    gw = Gateway(cfg)
    assert "password" in gw.providers
    assert gw.providers["password"].settings.min_length == 12
    assert gw.providers["password"].settings.lockout_window == 3600.0


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def test_load_file(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[server]\nport = 9090\nmax_body_size = "1MiB"\n\n[[routes]]\nprefix = "/api/"\n'
                    'upstream = "http://127.0.0.1:9000"\n')
    cfg = load_config(str(path), environ={})
    assert cfg.server.port == 9090
    assert cfg.server.max_body_size == 2**20
    assert cfg.routes[0].prefix == "/api/"
    assert cfg.path == str(path)


@pytest.mark.parametrize("content", [b"[server\nport = 1\n", b"\xff\xfe[server]\n"])
def test_unparsable_file(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.problems[0].startswith(str(path) + ":")


def test_missing_or_unreadable_file(tmp_path):
    for path in (tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError) as info:
            load_config(str(path), environ={})
        assert info.value.problems[0].startswith(str(path) + ":")


def test_shipped_config_is_valid():
    cfg = load_config(str(ROOT / "conf" / "gateway.toml"), environ={})
    assert [r.prefix for r in cfg.routes] == ["/api/", "/public/"]


# ---------------------------------------------------------------------------
# gateway check-config, as a subprocess
# ---------------------------------------------------------------------------


def run(argv: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GW_")}
    environ.update(env)
    return subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=60)


def test_cli_check_config_ok():
    p = run([str(GATEWAY_BIN), "check-config", "--config", "conf/gateway.toml"])
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout
    assert "password" in p.stdout


BAD_TOML = """
[server]
port = "eighty"

[sessions]
idle_timeout = "soon"
redis_url = "http://user:cli-secret-value@host"
"""


def test_cli_check_config_lists_every_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML)
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(path)])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "server.port" in p.stderr
    assert "sessions.idle_timeout" in p.stderr
    assert "sessions.redis_url" in p.stderr
    assert "cli-secret-value" not in p.stderr + p.stdout
    assert "Traceback" not in p.stderr


def test_cli_check_config_provider_problems(tmp_path):
    path = tmp_path / "prov.toml"
    path.write_text(f'[profiles]\nsqlite_path = "{tmp_path / "p.db"}"\n\n[providers.nosuch]\nx = 1\n\n'
                    '[providers.password]\nmin_length = "x"\n')
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(path)])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "providers.nosuch" in p.stderr
    assert "providers.password.min_length" in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_check_config_lists_core_and_provider_problems_together(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text('[sessions]\nidle_timeout = "soon"\n\n[providers.password]\nmin_length = "x"\n\n'
                    '[[routes]]\nupstream = "ftp://x"\n')
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(path)])
    assert p.returncode == 2, (p.stdout, p.stderr)
    for key in ("sessions.idle_timeout", "providers.password.min_length", "routes[0].prefix", "routes[0].upstream"):
        assert key in p.stderr
    assert "4 problem(s)" in p.stderr


@pytest.mark.parametrize("name, content", [("missing.toml", None), ("broken.toml", "[server\n"),
                                           ("latin1.toml", b"# caf\xe9\n"), ("dir", "dir")])
def test_cli_check_config_unreadable(tmp_path, name, content):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(path)])
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert str(path) in p.stderr
    assert "Traceback" not in p.stderr


def test_launcher_script(tmp_path):
    # From the checkout, through whatever python3 is on PATH (it re-executes into .venv).
    p = run([str(LAUNCHER), "check-config", "--config", "conf/gateway.toml"])
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout
    # From elsewhere, by absolute paths.
    p = run([sys.executable, str(LAUNCHER), "check-config", "--config", str(ROOT / "conf" / "gateway.toml")],
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_TOML)
    p = run([str(LAUNCHER), "check-config", "--config", str(bad)], cwd=tmp_path)
    assert p.returncode == 2
    assert "server.port" in p.stderr and "sessions.idle_timeout" in p.stderr


def test_touch_interval_must_be_shorter_than_the_idle_timeout():
    problems = problems_of({"sessions": {"idle_timeout": "2s", "touch_interval": "5s"}})
    assert_named(problems, "sessions.touch_interval")
    load_config(data={"sessions": {"idle_timeout": "2s", "touch_interval": "1s"}}, environ={})


def test_a_provider_cannot_take_the_name_of_a_gateway_endpoint(tmp_path):
    from gateway import hookimpl
    from gateway.plugins import get_plugin_manager
    from gateway.api import Provider

    class Sessions(Provider):
        name = "sessions"

    class Plugin:
        @hookimpl
        def gateway_providers(self):
            return [Sessions]

    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")}}, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config, pm=get_plugin_manager(extra_plugins=[("clash", Plugin())]))
    assert any("'sessions'" in p and "own endpoints" in p for p in info.value.problems)


#: What the shipped example configurations read from the environment.
EXAMPLE_ENVIRONMENT = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_SENTINEL_PASSWORD": "sentinel-password-value",
    "MONGODB_URL": "mongodb://127.0.0.1:27017",
    "GATEWAY_ENCRYPTION_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    "WECHAT_SHOP_SECRET": "shop-secret-value",
    "WECHAT_STAFF_SECRET": "staff-secret-value",
}


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*.toml")))
def test_every_shipped_configuration_passes_check_config(path):
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(path)], **EXAMPLE_ENVIRONMENT)
    assert p.returncode == 0, p.stderr


def test_production_example_serves_every_provider_and_names_what_it_misses():
    path = str(ROOT / "conf" / "production.example.toml")
    p = run([str(GATEWAY_BIN), "check-config", "--config", path], **EXAMPLE_ENVIRONMENT)
    assert p.returncode == 0, p.stderr
    listed = p.stdout.split("providers: ", 1)[1].split(";", 1)[0]
    assert sorted(listed.split(", ")) == ["apikey", "password", "wechat"]
    assert "shop-secret-value" not in p.stdout + p.stderr
    # Without the sealing key, Redis and WeChat together are refused.
    env = {k: v for k, v in EXAMPLE_ENVIRONMENT.items() if k != "GATEWAY_ENCRYPTION_KEY"}
    p = run([str(GATEWAY_BIN), "check-config", "--config", path], **env)
    assert p.returncode == 2
    assert "sessions.encryption_key_env: environment variable GATEWAY_ENCRYPTION_KEY is not set" in p.stderr
    assert "WECHAT_STAFF_SECRET" not in p.stderr


def test_redis_store_with_wechat_and_no_encryption_key_is_refused(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text(
        '[sessions]\nstore = "redis"\n[profiles]\nsqlite_path = "%s"\n'
        '[providers.wechat.apps.main]\nappid = "wx4f4bc4dec97d474b"\nsecret = "app-secret"\n'
        % (tmp_path / "p.db"))
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(config)])
    assert p.returncode == 2
    assert "sessions.encryption_key: required" in p.stderr
    assert "app-secret" not in p.stderr
    # With the memory store a per-process key stands in.
    config.write_text(config.read_text().replace('store = "redis"', 'store = "memory"'))
    assert run([str(GATEWAY_BIN), "check-config", "--config", str(config)]).returncode == 0


@pytest.mark.parametrize("apps, key", [
    ({"main": {"appid": "not-an-appid", "secret": "s"}}, "providers.wechat.apps.main.appid"),
    ({"main": {"appid": "wx4f4bc4dec97d474b"}}, "providers.wechat.apps.main.secret"),
    ({"main": {"appid": "wx4f4bc4dec97d474b", "secret_env": "NOPE"}}, "providers.wechat.apps.main.secret_env"),
    ({"main": {"appid": "wx4f4bc4dec97d474b", "secret": "s", "extra": 1}}, "providers.wechat.apps.main.extra"),
    ({"a": {"appid": "wx4f4bc4dec97d474b", "secret": "s"}, "b": {"appid": "wx4f4bc4dec97d474b", "secret": "t"}},
     "providers.wechat.apps."),
    ({"bad name": {"appid": "wx4f4bc4dec97d474b", "secret": "s"}}, "providers.wechat.apps"),
    ("main", "providers.wechat.apps"),
])
def test_wechat_app_tables_are_checked(tmp_path, apps, key):
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                               "providers": {"wechat": {"apps": apps}}}, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config)
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_redis_example_without_its_environment_names_the_missing_variables():
    p = run([str(GATEWAY_BIN), "check-config", "--config", str(ROOT / "conf" / "redis.example.toml")])
    assert p.returncode == 2
    assert "sessions.redis_url_env" in p.stderr and "profiles.mongodb_url_env" in p.stderr


@pytest.mark.parametrize("section, values, key", [
    ("server", {"auth_prefix": "/a uth#"}, "server.auth_prefix"),
    ("sessions", {"cookie_name": "a;b"}, "sessions.cookie_name"),
    ("sessions", {"cookie_name": ""}, "sessions.cookie_name"),
    ("sessions", {"cookie_domain": "ex;ample.com"}, "sessions.cookie_domain"),
    ("sessions", {"absolute_timeout": "99999999d"}, "sessions.absolute_timeout"),
    ("sessions", {"idle_timeout": "9" * 400}, "sessions.idle_timeout"),
    ("sessions", {"redis_url": "redis://host:notaport/0"}, "sessions.redis_url"),
    ("profiles", {"sqlite_path": ""}, "profiles.sqlite_path"),
    ("profiles", {"mongodb_database": "a.b"}, "profiles.mongodb_database"),
    ("profiles", {"mongodb_url": "mongodb://h:notaport"}, "profiles.mongodb_url"),
])
def test_values_that_would_fail_later_are_refused_up_front(section, values, key):
    assert_named(problems_of({section: values}), key)


@pytest.mark.parametrize("values, key", [
    ({"memory_cost": 8, "parallelism": 4}, "providers.password.memory_cost"),
    ({"min_length": 2000}, "providers.password.min_length"),
])
def test_password_settings_that_cannot_work_are_refused(tmp_path, values, key):
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                               "providers": {"password": values}}, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config)
    assert_named(info.value.problems, key)


def test_disabling_a_plugin_that_is_not_installed_is_a_typo_to_report(tmp_path):
    config = load_config(data={"profiles": {"sqlite_path": str(tmp_path / "p.db")},
                               "plugins": {"disabled": ["pasword"]}}, environ={})
    with pytest.raises(ConfigError) as info:
        Gateway(config)
    assert any("plugins.disabled" in p and "'pasword'" in p for p in info.value.problems)


# ---------------------------------------------------------------------------
# Redis Sentinel and Redis Cluster (more in test_redis_modes.py)
# ---------------------------------------------------------------------------


def test_the_redis_mode_options_are_declared_with_defaults():
    cfg = load_config(data={}, environ={})
    assert (cfg.sessions.redis_cluster, cfg.sessions.redis_sentinels, cfg.sessions.redis_sentinel_master,
            cfg.sessions.redis_sentinel_password) == (False, (), "mymaster", "")
    table = describe_options()["[sessions]"]
    for key in ("redis_cluster", "redis_sentinels", "redis_sentinel_master"):
        assert f"| `{key}` |" in table
    assert "(or `redis_sentinel_password_env`)" in table


@pytest.mark.parametrize("sessions, key", [
    ({"redis_cluster": True, "redis_sentinels": ["10.0.0.7:26379"]}, "sessions.redis_cluster"),
    ({"redis_url": ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]}, "sessions.redis_url"),
    ({"redis_cluster": True, "redis_url": "redis://10.0.0.1:7000/1"}, "sessions.redis_url"),
    ({"redis_sentinels": ["10.0.0.7"]}, "sessions.redis_sentinels"),
    ({"redis_sentinel_password_env": "GW_UNSET_SENTINEL_PASSWORD"}, "sessions.redis_sentinel_password_env"),
])
def test_redis_mode_problems_name_their_key(sessions, key):
    assert_named(problems_of({"sessions": sessions}, environ={}), key)


def test_a_refused_option_is_not_judged_again_by_its_default_in_a_combination():
    _, problems = read_config(data={"sessions": {"idle_timeout": "30 minutes", "touch_interval": "10m"}}, environ={})
    assert len(problems) == 1 and problems[0].startswith("sessions.idle_timeout: expected a duration"), problems
    _, problems = read_config(data={"sessions": {"idle_timeout": "5m", "touch_interval": "10m"}}, environ={})
    assert [p.split(":")[0] for p in problems] == ["sessions.touch_interval"], problems


def test_an_empty_listen_address_is_refused():
    _, problems = read_config(data={"server": {"host": ""}, "admin": {"host": " "}}, environ={})
    assert [p.split(":")[0] for p in problems] == ["server.host", "admin.host"], problems
    assert '"0.0.0.0" or "::" listens on every interface' in problems[0]
