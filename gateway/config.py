"""Configuration: every option declared once, with its type, default and help.

The file is TOML.  Durations take integer seconds or ``"90s"``, ``"30m"``,
``"12h"``, ``"7d"``; sizes take bytes or ``"10MiB"``.  A secret option
``key`` may instead be given as ``key_env = "VAR"`` to read it from the
environment.  Unknown keys and wrong types are errors naming the key; every
problem is collected so that ``gateway check-config`` can list them all.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit


class ConfigError(Exception):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30}


#: Ten years: longer durations are mistakes (and overflow date arithmetic).
MAX_DURATION = 10 * 365 * 86400.0


def parse_duration(value: Any) -> float:
    """Seconds from an int/float or a string like ``"30m"``."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is None:
        raise ValueError("expected a duration such as 30, \"90s\", \"30m\", \"12h\" or \"7d\"")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("a duration must be a finite number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot exceed ten years")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like ``"10MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError("expected a size such as 1048576 or \"10MiB\"")


def _typed(pytype: type, label: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) and pytype is not bool:
            raise ValueError(f"expected {label}")
        if pytype is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, pytype):
            raise ValueError(f"expected {label}")
        return value

    return check


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return list(value)


def _networks(value: Any) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for item in _str_list(value):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return out


def _origins(value: Any) -> list[str]:
    out = []
    for item in _str_list(value):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"{item!r} is not an origin such as \"https://app.example.com\"")
        out.append(f"{parts.scheme}://{parts.netloc}".lower())
    return out


def _http_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


_PATH_PREFIX = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/\-]*$")
_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an RFC 6265 token
_DOMAIN = re.compile(r"^\.?([A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$")
_MONGO_DB = re.compile(r"^[^/\\. \"$*<>:|?\x00]{1,63}$")


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or not _PATH_PREFIX.match(value):
        raise ValueError("expected a path starting with \"/\" made of URL path characters")
    return value


def _redis_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    from redis.connection import parse_url

    try:
        parse_url(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a usable Redis URL ({type(exc).__name__})") from None
    return value


def _mongodb_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("mongodb", "mongodb+srv"):
        raise ValueError("expected a mongodb:// or mongodb+srv:// connection string")
    if value.startswith("mongodb://"):  # (+srv would look up DNS records here)
        from pymongo.uri_parser import parse_uri

        try:
            parse_uri(value)
        except Exception as exc:
            raise ValueError(f"not a usable MongoDB connection string ({type(exc).__name__})") from None
    return value


def _encryption_key(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected base64 text of 32 random bytes")
    if value:
        from gateway.crypto import parse_key

        parse_key(value)
    return value


#: an RFC 6749 scope-token: what route ``scopes`` and API key scopes are made of
SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")


def _scopes(value: Any) -> list[str]:
    out = _str_list(value)
    for item in out:
        if not SCOPE.match(item):
            raise ValueError(f"{item!r} is not a scope (printable ASCII, no spaces, quotes or backslashes)")
    return out


def _optional_size(value: Any) -> int | None:
    return None if value is None else parse_size(value)


def _optional_domain(value: Any) -> str:
    if value == "":
        return value
    return _pattern(_DOMAIN, "a domain name such as example.com")(value)


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not regex.match(value):
            raise ValueError(f"expected {what}")
        return value

    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))
        return value

    return check


def at_least(check: Callable[[Any], Any], low: float) -> Callable[[Any], Any]:
    def bounded(value: Any) -> Any:
        value = check(value)
        if value < low:
            raise ValueError(f"must be at least {low:g}")
        return value

    return bounded


def _port(value: Any) -> int:
    value = _typed(int, "an integer port")(value)
    if not 0 <= value <= 65535:
        raise ValueError("expected a port between 0 and 65535")
    return value


STR = _typed(str, "a string")
INT = _typed(int, "an integer")
BOOL = _typed(bool, "true or false")
NONNEG_INT = at_least(INT, 0)
DURATION = parse_duration
POSITIVE_DURATION = at_least(parse_duration, 0.001)
SIZE = parse_size


@dataclass(frozen=True)
class Option:
    """One configuration key: its name, how to check it, its default, its help."""

    name: str
    check: Callable[[Any], Any]
    default: Any
    help: str
    secret: bool = False
    required: bool = False


@dataclass
class Section:
    """Validated values of one table, read as attributes."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


# ---------------------------------------------------------------------------
# The declared options
# ---------------------------------------------------------------------------

SERVER = [
    Option("host", STR, "127.0.0.1", "address to listen on"),
    Option("port", _port, 8080, "port to listen on"),
    Option("workers", at_least(INT, 1), 1, "processes to fork (needs a shared session store when above 1)"),
    Option("auth_prefix", _prefix, "/auth", "path prefix of the gateway's own endpoints"),
    Option("max_body_size", SIZE, "10MiB", "default largest request body of a proxied route (413 beyond; 0 = no limit); a route's own max_body_size overrides it"),
    Option("auth_max_body_size", at_least(SIZE, 1), "64KiB", "largest request body of the gateway's own JSON endpoints (413 beyond)"),
    Option("trusted_proxies", _networks, [], "peers (IPs or CIDRs) whose X-Forwarded-For/-Proto/-Host and other client-address headers are believed and passed on"),
    Option("upstream_max_connections", at_least(INT, 1), 100, "connections to each upstream (pooled, kept alive); a request waiting longer than its route's connect_timeout for one gets 503"),
    Option("idle_connection_timeout", POSITIVE_DURATION, "60s", "a client connection idle this long between requests is closed"),
    Option("body_timeout", POSITIVE_DURATION, "120s", "longest time a client may take to send a request body"),
    Option("shutdown_timeout", DURATION, "10s", "on SIGTERM, how long requests in flight may take to finish"),
    Option("event_loop", _choice("asyncio", "uvloop"), "asyncio", "the event loop: asyncio, or uvloop (needs the uvloop package)"),
]

SESSIONS = [
    Option("store", _choice("memory", "redis"), "memory", "memory (one process only) or redis"),
    Option("redis_url", _redis_url, "redis://127.0.0.1:6379/0", "Redis URL (redis://, rediss://, unix://)", secret=True),
    Option("redis_timeout", POSITIVE_DURATION, "0.5s", "socket connect/read timeout for Redis; one retry"),
    Option("redis_max_connections", at_least(INT, 1), 1000, "connections to Redis per process; a request beyond them waits for a free one"),
    Option("redis_pool_timeout", POSITIVE_DURATION, "1s", "longest wait for a free Redis connection (503 unavailable beyond)"),
    Option("idle_timeout", POSITIVE_DURATION, "30m", "a session unused this long ends"),
    Option("absolute_timeout", POSITIVE_DURATION, "7d", "a session ends this long after login, whatever its use"),
    Option("touch_interval", DURATION, "60s", "the idle deadline is pushed forward at most once per interval (shorter than idle_timeout)"),
    Option("rotation_grace", DURATION, "10s", "an old token still works this long after /refresh (for proxied requests, GET /session and /logout)"),
    Option("refresh_race_window", DURATION, "2s", "a replaced token presented to /refresh again within this long of its replacement is a concurrent refresh (401); later, a replay that ends the session"),
    Option("max_per_user", NONNEG_INT, 0, "sessions per user; 0 = unlimited; beyond it the oldest is revoked"),
    Option("cookie_name", _pattern(_COOKIE_NAME, "a cookie name (letters, digits, !#$%&'*+-.^_`|~)"),
           "gw_session", "name of the session cookie"),
    Option("cookie_secure", BOOL, True, "mark the cookie Secure (HTTPS only)"),
    Option("cookie_samesite", _choice("Lax", "Strict", "None"), "Lax", "SameSite attribute of the cookie"),
    Option("cookie_domain", _optional_domain, "", "Domain attribute of the cookie; empty = host-only"),
    Option("allowed_origins", _origins, [], "origins allowed to send cookie-authenticated unsafe requests; also the CORS allow-list"),
    Option("encryption_key", _encryption_key, "", "base64 of 32 random bytes: seals secrets kept in sessions (WeChat session_key); required with the redis store when a provider keeps one", secret=True),
]

PROFILES = [
    Option("store", _choice("sqlite", "mongodb"), "sqlite", "sqlite (embedded, durable file) or mongodb"),
    Option("sqlite_path", _pattern(re.compile(r"^\S.*$"), "a file path"), "var/profiles.db", "SQLite file, relative to the working directory"),
    Option("mongodb_url", _mongodb_url, "mongodb://127.0.0.1:27017", "MongoDB connection string", secret=True),
    Option("mongodb_database", _pattern(_MONGO_DB, "a MongoDB database name (no /\\. \"$*<>:|? or spaces)"), "gateway", "MongoDB database name"),
    Option("mongodb_timeout", POSITIVE_DURATION, "1s", "MongoDB server selection / operation timeout"),
]

PLUGINS = [
    Option("disabled", _str_list, [], "names of installed plugins not to load"),
]

ROUTE = [
    Option("prefix", _prefix, None, "path prefix this route serves (longest match wins)", required=True),
    Option("upstream", _http_url, None, "upstream base URL, e.g. http://127.0.0.1:9000", required=True),
    Option("auth", _choice("required", "optional", "public"), "required", "required | optional | public"),
    Option("strip_prefix", BOOL, False, "remove the prefix from the path sent upstream"),
    Option("connect_timeout", POSITIVE_DURATION, "5s", "upstream connect timeout (504 beyond)"),
    Option("request_timeout", POSITIVE_DURATION, "30s", "longest wait for the upstream's response head (504 beyond)"),
    Option("read_timeout", POSITIVE_DURATION, "60s", "longest silence between body chunks, either way, once a transfer has started (the transfer is cut beyond)"),
    Option("max_body_size", _optional_size, None, "largest request body (0 = no limit); default server.max_body_size"),
    Option("websocket", BOOL, False, "proxy Upgrade: websocket requests on this route"),
    Option("websocket_max_message_size", at_least(SIZE, 1), "1MiB", "largest WebSocket message either way (close 1009 beyond)"),
    Option("websocket_ping_interval", DURATION, "30s", "ping idle WebSocket clients this often (0 = never)"),
    Option("preserve_host", BOOL, False, "send the client's Host header upstream instead of the upstream's"),
    Option("scopes", _scopes, [], "scopes a caller authenticated by a plugin (an API key) must all hold (403 otherwise)"),
    Option("allow_sessions", BOOL, True, "whether session users (who hold no scopes) may use this route"),
]

SECTIONS: dict[str, list[Option]] = {
    "server": SERVER,
    "sessions": SESSIONS,
    "profiles": PROFILES,
    "plugins": PLUGINS,
}


def validate_table(
    where: str, options: Iterable[Option], table: Any, problems: list[str], environ: dict[str, str]
) -> Section:
    """Check ``table`` against ``options``; append problems naming ``where.key``."""
    options = list(options)
    values: dict[str, Any] = {}
    if not isinstance(table, dict):
        problems.append(f"{where}: expected a table")
        table = {}
    known = {o.name for o in options} | {o.name + "_env" for o in options if o.secret}
    for key in table:
        if key not in known:
            problems.append(f"{where}.{key}: unknown key")
    for opt in options:
        key = f"{where}.{opt.name}"
        raw = table.get(opt.name)
        if opt.secret and opt.name + "_env" in table:
            var = table[opt.name + "_env"]
            if opt.name in table:
                problems.append(f"{key}: give either {opt.name} or {opt.name}_env, not both")
                continue
            if not isinstance(var, str):
                problems.append(f"{key}_env: expected the name of an environment variable")
                continue
            if var not in environ:
                problems.append(f"{key}_env: environment variable {var} is not set")
                continue
            raw = environ[var]
        elif opt.name not in table:
            if opt.required:
                problems.append(f"{key}: required")
                continue
            raw = opt.default
            if raw is None:
                values[opt.name] = None
                continue
        try:
            values[opt.name] = opt.check(raw)
        except ValueError as exc:
            shown = "" if opt.secret or repr(raw) in str(exc) else f" (got {raw!r})"
            problems.append(f"{key}: {exc}{shown}")
            values[opt.name] = None if opt.default is None else opt.check(opt.default)
    for opt in options:
        values.setdefault(opt.name, None if opt.default is None else opt.check(opt.default))
    return Section(values)


@dataclass
class Config:
    """The whole validated configuration."""

    server: Section
    sessions: Section
    profiles: Section
    plugins: Section
    routes: list[Section]
    providers: dict[str, Any]  # raw tables; validated against each provider's options
    path: str | None = None
    environ: dict[str, str] = field(default_factory=dict)


def load_config(path: str | None = None, *, data: dict | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read and validate a configuration file (or an already-parsed dict);
    raise :class:`ConfigError` listing every problem."""
    config, problems = read_config(path, data=data, environ=environ)
    if problems:
        raise ConfigError(problems)
    return config


def read_config(
    path: str | None = None, *, data: dict | None = None, environ: dict[str, str] | None = None
) -> tuple[Config, list[str]]:
    """Like :func:`load_config`, but return the problems beside a usable
    configuration (defaults standing in for bad values), so that checks
    which need a configuration (the providers' own tables) can still run and
    report theirs too.  Raises :class:`ConfigError` only when there is no
    file to read."""
    environ = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    if data is None:
        if path is None:
            data = {}
        else:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except FileNotFoundError:
                raise ConfigError([f"{path}: no such file"]) from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
            except UnicodeDecodeError:
                raise ConfigError([f"{path}: not valid TOML: the file is not UTF-8"]) from None
            except OSError as exc:
                raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    allowed = set(SECTIONS) | {"routes", "providers"}
    for key in data:
        if key not in allowed:
            problems.append(f"{key}: unknown section")
    sections = {name: validate_table(name, opts, data.get(name, {}), problems, environ) for name, opts in SECTIONS.items()}
    routes = []
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.append("routes: expected an array of tables ([[routes]])")
        raw_routes = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_routes):
        route = validate_table(f"routes[{i}]", ROUTE, raw, problems, environ)
        prefix = route.get("prefix")
        if prefix:
            if prefix in seen:
                problems.append(f"routes[{i}].prefix: {prefix!r} is used by another route")
            seen.add(prefix)
            auth_prefix = sections["server"].get("auth_prefix") or "/auth"
            if prefix.rstrip("/") == auth_prefix.rstrip("/") or prefix.startswith(auth_prefix.rstrip("/") + "/"):
                problems.append(f"routes[{i}].prefix: {prefix!r} lies under server.auth_prefix {auth_prefix!r}")
        if route.get("auth") == "public" and route.get("scopes"):
            problems.append(f"routes[{i}].scopes: a public route authenticates no one, so it cannot require scopes")
        if route.get("auth") == "public" and route.get("allow_sessions") is False:
            problems.append(f"routes[{i}].allow_sessions: a public route authenticates no one, so it cannot refuse sessions")
        if route.get("max_body_size") is None:
            route.values["max_body_size"] = sections["server"].get("max_body_size")
        if all(route.get(o.name) is not None for o in ROUTE):
            routes.append(route)
    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        problems.append("providers: expected a table of [providers.<name>] tables")
        providers = {}
    sess = sections["sessions"]
    if sess.get("store") == "memory" and (sections["server"].get("workers") or 1) > 1:
        problems.append("sessions.store: \"memory\" holds sessions in one process; use \"redis\" with server.workers > 1")
    if sess.get("touch_interval") is not None and sess.get("idle_timeout") is not None \
            and sess["touch_interval"] >= sess["idle_timeout"]:
        problems.append("sessions.touch_interval: must be shorter than sessions.idle_timeout, "
                        "or sessions in use would still go idle")
    if sess.get("cookie_samesite") == "None" and sess.get("cookie_secure") is False:
        problems.append("sessions.cookie_samesite: \"None\" requires sessions.cookie_secure = true (browsers reject it otherwise)")
    cookie_name = (sess.get("cookie_name") or "").lower()  # browsers match the prefixes in any case
    for prefix in ("__Host-", "__Secure-"):
        if cookie_name.startswith(prefix.lower()) and sess.get("cookie_secure") is False:
            problems.append(f"sessions.cookie_name: a {prefix} cookie requires sessions.cookie_secure = true "
                            "(browsers refuse it otherwise)")
    if cookie_name.startswith("__host-") and sess.get("cookie_domain"):
        problems.append("sessions.cookie_name: a __Host- cookie cannot have a Domain; leave sessions.cookie_domain empty "
                        "(browsers refuse it otherwise)")
    return Config(routes=routes, providers=providers, path=path, environ=environ, **sections), problems


def _toml_value(value: Any) -> str:
    if value is None:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def reference_table(options: Iterable[Option]) -> str:
    """A Markdown table of options: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for o in options:
        meaning = o.help + (f" (or `{o.name}_env`)" if o.secret else "")
        default = "(required)" if o.required else "(unset)" if o.default is None else _toml_value(o.default)
        rows.append(f"| `{o.name}` | `{default}` | {meaning} |")
    return "\n".join(rows)


def describe_options() -> dict[str, str]:
    """Markdown reference tables of the core options, by table name."""
    tables = {f"[{name}]": reference_table(opts) for name, opts in SECTIONS.items()}
    tables["[[routes]]"] = reference_table(ROUTE)
    return tables
