"""Configuration: every option declared once, with its type, default and help.

The file is TOML.  Durations take integer seconds or ``"90s"``, ``"30m"``,
``"12h"``, ``"7d"``; sizes take bytes or ``"10MiB"``.  A secret option
``key`` may instead be given as ``key_env = "VAR"`` to read it from the
environment.  Unknown keys and wrong types are errors naming the key; every
problem is collected so that ``gateway check-config`` can list them all.

Each core table is a frozen dataclass (:class:`ServerConfig`,
:class:`SessionsConfig`, :class:`ProfilesConfig`, :class:`PluginsConfig`,
:class:`ConsentConfig`, :class:`AdminConfig`, :class:`RouteConfig`, and the named tables within
a table, :class:`ProfileFieldConfig` and :class:`ConsentDocumentConfig`)
whose fields are declared with :func:`option`: the
field's checker, default and help text live beside its type, and the option
lists (:data:`SERVER` ... :data:`ROUTE`) and the reference tables are derived
from them.  A value is read by attribute only; a changed value is a new
object (:meth:`Config.with_server`).  The generic checkers, :class:`Option`,
:class:`Section` and :func:`validate_table` are in :mod:`gateway.options`;
the checkers here need the core's own dependencies (Redis, MongoDB, the
sealing key).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, TypeVar, cast
from urllib.parse import urlsplit

from gateway.options import (
    BOOL,
    DURATION,
    INT,
    MAX_DURATION,
    NONNEG_INT,
    POSITIVE_DURATION,
    SCOPE,
    SIZE,
    STR,
    ConfigError,
    Network,
    Option,
    Section,
    at_least,
    choice,
    http_url,
    networks,
    optional_size,
    origins,
    parse_duration,
    parse_size,
    pattern,
    port,
    reference_table,
    scopes,
    str_list,
    validate_table,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    # declared here
    "Config", "PluginsConfig", "ProfilesConfig", "RouteConfig", "ServerConfig", "SessionsConfig",
    "PLUGINS", "PROFILES", "ROUTE", "SECTIONS", "SERVER", "SESSIONS", "ADMIN", "AdminConfig", "LOGGING", "LoggingConfig",
    "BUILTIN_PROFILE_FIELDS", "CONSENT", "CONSENT_DOCUMENT", "ConsentConfig", "ConsentDocumentConfig",
    "NAMED_TABLES", "PROFILE_FIELD", "ProfileFieldConfig", "RATE_LIMIT", "RateLimitConfig",
    "ASSERTION", "ASSERTION_KEY", "AssertionConfig", "AssertionKeyConfig", "TRACING", "TracingConfig",
    "describe_options", "load_config", "option", "options_of", "read_config",
    # from gateway.options, for modules that import them from here
    "BOOL", "DURATION", "INT", "MAX_DURATION", "NONNEG_INT", "POSITIVE_DURATION", "SCOPE", "SIZE", "STR",
    "ConfigError", "Option", "Section", "at_least", "parse_duration", "parse_size", "reference_table",
    "validate_table",
]

T = TypeVar("T")
C = TypeVar("C")

# Former private names of the generic checkers (now public in gateway.options);
# the class bodies below use these where a field has the checker's name.
_http_url = http_url
_pattern = pattern
_choice = choice
_str_list = str_list
_networks = networks
_origins = origins
_scopes = scopes
_port = port
_optional_size = optional_size


# ---------------------------------------------------------------------------
# Checkers of the core's own values
# ---------------------------------------------------------------------------

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
        parse_url(value)  # type: ignore[no-untyped-call]  # (redis has no annotation here)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a usable Redis URL ({type(exc).__name__})") from None
    return value


def _redis_urls(value: Any) -> str | tuple[str, ...]:
    """One Redis URL, or (for a cluster's seed nodes) a non-empty array of them."""
    if isinstance(value, list):
        if not value:
            raise ValueError("expected a Redis URL or a non-empty array of them")
        for i, item in enumerate(value):
            try:
                _redis_url(item)
            except ValueError as exc:
                raise ValueError(f"item {i + 1}: {exc}") from None
        return tuple(value)
    return _redis_url(value)


def _sentinels(value: Any) -> tuple[str, ...]:
    """Sentinel addresses, each ``host:port``."""
    from gateway.sessions.connection import parse_address

    out = str_list(value)
    for item in out:
        try:
            parse_address(item)
        except ValueError:
            raise ValueError(f"{item!r} is not host:port (such as \"10.0.0.7:26379\")") from None
    return out


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


def _listen_host(value: Any) -> str:
    """An address to listen on; never empty, which would mean every
    interface without saying so."""
    host = STR(value).strip()
    if not host:
        raise ValueError('expected an address such as "127.0.0.1" ("0.0.0.0" or "::" listens on every interface)')
    return host


def _optional_domain(value: Any) -> str:
    if value == "":
        return ""
    return pattern(_DOMAIN, "a domain name such as example.com")(value)


# ---------------------------------------------------------------------------
# Declaring a table
# ---------------------------------------------------------------------------

_OPTION = "gateway.option"


def option(check: Callable[[Any], T], default: Any, help: str, *, secret: bool = False,
           required: bool = False) -> T:
    """A dataclass field that is a configuration option: ``check`` turns the
    raw (TOML) value into the field's value, ``default`` is the raw default
    (as the reference shows it; ``None``: unset), ``help`` its meaning.  A
    secret field is left out of the dataclass's repr."""
    meta = {_OPTION: Option("", check, default, help, secret=secret, required=required)}
    if required:
        return cast(T, field(metadata=meta, repr=not secret))
    if default is None:
        return cast(T, field(default=None, metadata=meta, repr=not secret))
    return field(default_factory=partial(check, default), metadata=meta, repr=not secret)


def options_of(cls: type[DataclassInstance]) -> list[Option]:
    """The :class:`Option` of each field declared with :func:`option`, in order."""
    return [replace(f.metadata[_OPTION], name=f.name) for f in fields(cls) if _OPTION in f.metadata]


def _validated(cls: Callable[..., C], where: str, options: list[Option], table: Any, problems: list[str],
               environ: Mapping[str, str]) -> C:
    return cls(**validate_table(where, options, table, problems, environ).as_dict())


# ---------------------------------------------------------------------------
# The core tables
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """``[server]``: the listening side."""

    host: str = option(_listen_host, "127.0.0.1", "address to listen on (\"0.0.0.0\" or \"::\": every interface)")
    port: int = option(_port, 8080, "port to listen on")
    workers: int = option(at_least(INT, 1), 1, "processes to fork (needs a shared session store when above 1)")
    auth_prefix: str = option(_prefix, "/auth", "path prefix of the gateway's own endpoints")
    max_body_size: int = option(SIZE, "10MiB", "default largest request body of a proxied route (413 beyond; 0 = no limit); a route's own max_body_size overrides it")
    auth_max_body_size: int = option(at_least(SIZE, 1), "64KiB", "largest request body of the gateway's own JSON endpoints (413 beyond)")
    trusted_proxies: tuple[Network, ...] = option(_networks, [], "peers (IPs or CIDRs) whose X-Forwarded-For/-Proto/-Host and other client-address headers are believed and passed on")
    forward_auth: bool = option(BOOL, False, "answer forward auth (`GET {auth_prefix}/verify`, for nginx `auth_request` or Traefik `ForwardAuth`) to the peers in trusted_proxies; off, that endpoint answers 404. Turn it on only when every trusted proxy is one that asks it (a load balancer passing client headers on unchanged would let a client ask too)")
    upstream_max_connections: int = option(at_least(INT, 1), 100, "connections to each upstream (pooled, kept alive); a request waiting longer than its route's connect_timeout for one gets 503")
    idle_connection_timeout: float = option(POSITIVE_DURATION, "60s", "a client connection idle this long between requests is closed")
    body_timeout: float = option(POSITIVE_DURATION, "120s", "longest time a client may take to send a request body")
    shutdown_timeout: float = option(DURATION, "10s", "on SIGTERM, or for a worker a reload (SIGHUP) replaces, how long requests in flight and open WebSockets may take to finish")
    event_loop: str = option(_choice("asyncio", "uvloop"), "asyncio", "the event loop: asyncio, or uvloop (needs the uvloop package)")


def _admin_token(value: Any) -> str:
    if not isinstance(value, str) or (value and (len(value) < 16 or any(c.isspace() for c in value))):
        raise ValueError("expected a token of at least 16 characters without spaces")
    return value


_ANY_ADDRESS = ("", "0.0.0.0", "::")


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """``[admin]``: the operators' listener (health, readiness, metrics)."""

    host: str = option(_listen_host, "127.0.0.1", "address of the admin listener (/healthz, /readyz, /metrics, which need no token): keep it private")
    port: int = option(_port, 9091, "port of the admin listener; 0 = no admin listener (one for all workers: the supervisor's)")
    token: str = option(_admin_token, "", "bearer token of the operator API under /admin/ (at least 16 characters), best given as token_env; without one that API answers 404", secret=True)
    presence_window: float = option(POSITIVE_DURATION, "2m", "the operator API's presence: a user is online while a live session of theirs was used within this window (never less than sessions.touch_interval + 3s, the precision of last_seen_at) or holds an open WebSocket")
    drain_delay: float = option(DURATION, "0s", "on SIGTERM, how long /readyz answers 503 while the gateway still accepts requests, before the drain begins (give a load balancer time to notice)")

    def check(self, server: ServerConfig) -> list[str]:
        """The problems of combinations that cannot work (each naming its key)."""
        if self.port and self.port == server.port and (
                self.host == server.host or self.host in _ANY_ADDRESS or server.host in _ANY_ADDRESS):
            return [f"admin.port: {self.port} is server.port too; the admin listener needs a port of its own"]
        return []


@dataclass(frozen=True, kw_only=True)
class SessionsConfig:
    """``[sessions]``: the session store, lifetimes and the cookie."""

    store: str = option(_choice("memory", "redis"), "memory", "memory (one process only) or redis")
    redis_url: str | tuple[str, ...] = option(_redis_urls, "redis://127.0.0.1:6379/0", "Redis URL (redis://, rediss://, unix://)", secret=True)
    redis_cluster: bool = option(BOOL, False, "Redis Cluster: redis_url is one seed node's URL or an array of them (the rest is discovered; their username, password and TLS reach every node; database 0 only); the client follows failovers and topology changes on its own")
    redis_sentinels: tuple[str, ...] = option(_sentinels, [], "Redis Sentinel: the sentinels, each \"host:port\"; the gateway asks them for the primary of redis_sentinel_master and follows failovers. redis_url's scheme (rediss:// for TLS, to the sentinels too), username, password and database then apply to the primary; its host and port are not used")
    redis_sentinel_master: str = option(_pattern(re.compile(r"^\S+$"), "a master name without spaces"), "mymaster", "the name the sentinels monitor the primary under (`sentinel monitor <name> ...`)")
    redis_sentinel_password: str = option(STR, "", "password of the sentinels themselves (`requirepass` in sentinel.conf); empty: none", secret=True)
    redis_timeout: float = option(POSITIVE_DURATION, "0.5s", "socket connect/read timeout for Redis, with one retry; whatever happens, a store call answers 503 unavailable after the longer of redis_pool_timeout and twice this (1 s by default)")
    redis_max_connections: int = option(at_least(INT, 1), 1000, "connections to Redis per process (with redis_cluster: per node); a request beyond them waits for a free one (with redis_cluster: 503 unavailable at once)")
    redis_pool_timeout: float = option(POSITIVE_DURATION, "1s", "longest wait for a free Redis connection (503 unavailable beyond; not with redis_cluster)")
    idle_timeout: float = option(POSITIVE_DURATION, "30m", "a session unused this long ends")
    absolute_timeout: float = option(POSITIVE_DURATION, "7d", "a session ends this long after login, whatever its use")
    touch_interval: float = option(DURATION, "60s", "the idle deadline is pushed forward at most once per interval (shorter than idle_timeout)")
    rotation_grace: float = option(DURATION, "10s", "an old token still works this long after /refresh (for proxied requests, GET /session and /logout)")
    refresh_race_window: float = option(DURATION, "2s", "a replaced token presented to /refresh again within this long of its replacement is a concurrent refresh (401); later, a replay that ends the session")
    max_per_user: int = option(NONNEG_INT, 0, "sessions per user; 0 = unlimited; beyond it the oldest is revoked")
    remember: str = option(_choice("optional", "always", "never"), "optional", "remembered sessions (a persistent cookie and the remember timeouts): optional (the login body's \"remember\" decides), always or never")
    remember_idle_timeout: float = option(POSITIVE_DURATION, "14d", "idle_timeout of a remembered session")
    remember_absolute_timeout: float = option(POSITIVE_DURATION, "30d", "absolute_timeout of a remembered session")
    ended_retention: float = option(DURATION, "1d", "how long an ended session's token is still recognised, so that a 401 can say why (expired, revoked, superseded); 0 = not at all")
    cookie_name: str = option(_pattern(_COOKIE_NAME, "a cookie name (letters, digits, !#$%&'*+-.^_`|~)"),
                              "gw_session", "name of the session cookie")
    cookie_secure: bool = option(BOOL, True, "mark the cookie Secure (HTTPS only)")
    cookie_samesite: str = option(_choice("Lax", "Strict", "None"), "Lax", "SameSite attribute of the cookie")
    cookie_domain: str = option(_optional_domain, "", "Domain attribute of the cookie; empty = host-only")
    allowed_origins: tuple[str, ...] = option(_origins, [], "origins allowed to send cookie-authenticated unsafe requests; also the CORS allow-list")
    encryption_key: str = option(_encryption_key, "", "base64 of 32 random bytes: seals secrets providers keep in sessions; required with the redis store when a provider keeps one", secret=True)

    def check(self, server: ServerConfig) -> list[str]:
        """The problems of combinations that cannot work (each naming its key)."""
        problems: list[str] = []
        if self.store == "memory" and server.workers > 1:
            problems.append("sessions.store: \"memory\" holds sessions in one process; use \"redis\" with server.workers > 1")
        problems.extend(self._redis_problems())
        if self.touch_interval >= self.idle_timeout:
            problems.append("sessions.touch_interval: must be shorter than sessions.idle_timeout, "
                            "or sessions in use would still go idle")
        if self.remember != "never" and self.touch_interval >= self.remember_idle_timeout:
            problems.append("sessions.touch_interval: must be shorter than sessions.remember_idle_timeout "
                            "(unless sessions.remember = \"never\"), or remembered sessions in use would still go idle")
        if self.cookie_samesite == "None" and not self.cookie_secure:
            problems.append("sessions.cookie_samesite: \"None\" requires sessions.cookie_secure = true (browsers reject it otherwise)")
        cookie_name = self.cookie_name.lower()  # browsers match the prefixes in any case
        for prefix in ("__Host-", "__Secure-"):
            if cookie_name.startswith(prefix.lower()) and not self.cookie_secure:
                problems.append(f"sessions.cookie_name: a {prefix} cookie requires sessions.cookie_secure = true "
                                "(browsers refuse it otherwise)")
        if cookie_name.startswith("__host-") and self.cookie_domain:
            problems.append("sessions.cookie_name: a __Host- cookie cannot have a Domain; leave sessions.cookie_domain empty "
                            "(browsers refuse it otherwise)")
        return problems

    @property
    def redis_urls(self) -> tuple[str, ...]:
        """``redis_url`` as a tuple (one URL, or a cluster's seed nodes)."""
        return (self.redis_url,) if isinstance(self.redis_url, str) else self.redis_url

    def _redis_problems(self) -> list[str]:
        """The Redis mode settings that cannot work together (never quoting a URL)."""
        from redis.connection import parse_url

        problems: list[str] = []
        urls = self.redis_urls
        if self.redis_cluster and self.redis_sentinels:
            problems.append("sessions.redis_cluster: cannot be combined with sessions.redis_sentinels; "
                            "choose Redis Cluster or Redis Sentinel")
        if len(urls) > 1 and not self.redis_cluster:
            problems.append("sessions.redis_url: an array of URLs (seed nodes) needs sessions.redis_cluster = true; "
                            "give one URL otherwise")
        if self.redis_cluster or self.redis_sentinels:
            mode = "sessions.redis_cluster" if self.redis_cluster else "sessions.redis_sentinels"
            if any(url.startswith("unix:") for url in urls):
                problems.append(f"sessions.redis_url: {mode} reaches Redis over TCP; use redis:// or rediss://")
                return problems
        if self.redis_cluster:
            parsed = [parse_url(url) for url in urls]  # type: ignore[no-untyped-call]  # (checked already)
            if any(int(p.get("db", 0)) != 0 for p in parsed):
                problems.append("sessions.redis_url: Redis Cluster has database 0 only; "
                                "remove the database from the URL (or make it /0)")

            def common(p: dict[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in p.items() if k not in ("host", "port", "db")}

            if any(common(p) != common(parsed[0]) for p in parsed[1:]):
                problems.append("sessions.redis_url: the seed URLs differ in more than host and port; "
                                "give them the same scheme, username, password, database and options")
        return problems


# -- tables of named tables: [profiles.fields.<name>], [consent.documents.<name>]

#: a profile field's name
_PROFILE_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: a consent document's name (like a provider's)
_DOCUMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")
#: an RFC 9110 token, as header names are
_HEADER_NAME = _COOKIE_NAME
#: request headers the proxy sets or handles itself (those of
#: gateway.proxy.policy, and every X-Forwarded-* and Sec-WebSocket-* name):
#: [profiles] upstream_headers cannot name them
_PROXY_HEADERS = frozenset({
    "x-user-id", "x-auth-provider", "x-session-id", "x-auth-scopes", "x-consent", "x-request-id", "host",
    "expect", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection", "cookie", "authorization",
    "content-length", "content-type", "forwarded", "x-gateway-assertion",
})


def _read_named(where: str, build: Callable[..., Any], options: list[Option], raw: Any,
                name: re.Pattern[str], what: str, problems: list[str]) -> Mapping[str, Any]:
    """Each ``[<where>.<name>]`` table of ``raw`` checked against
    ``options`` and built with ``build``, in the file's order; problems
    name ``<where>.<name>.<key>``."""
    out: dict[str, Any] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table of [{where}.<name>] tables")
        return MappingProxyType(out)
    for key, table in raw.items():
        if not name.match(key):
            problems.append(f"{where}.{key}: {what}")
            continue
        out[key] = build(**validate_table(f"{where}.{key}", options, table, problems, {}).as_dict())
    return MappingProxyType(out)


def _named_tables(where: str, build: Callable[..., Any], options: list[Option], name: re.Pattern[str],
                  what: str) -> Callable[[Any], Mapping[str, Any]]:
    """The checker of an option holding ``[<where>.<name>]`` tables.  It
    builds what it can and keeps the tables' own problems to itself:
    :func:`read_config` reads them again (:data:`NAMED_TABLES`) to report
    each under its own key, where a checker could only raise one sentence."""

    def check(value: Any) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table of [{where}.<name>] tables")
        return _read_named(where, build, options, value, name, what, [])

    return check


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("expected a number")
    return value


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a regular expression (a string)")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return value


def _names(regex: re.Pattern[str], what: str) -> Callable[[Any], tuple[str, ...]]:
    """A list of distinct names that ``regex`` matches."""

    def check(value: Any) -> tuple[str, ...]:
        names = str_list(value)
        for item in names:
            if not regex.match(item):
                raise ValueError(f"{item!r} is not {what}")
        if len(set(names)) != len(names):
            raise ValueError("a name is listed twice")
        return names

    return check


def _header_fields(value: Any) -> Mapping[str, str]:
    """``{"<request header>" = "<profile field>"}``."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError('expected a table of header names and profile fields, such as {"X-User-Language" = "language"}')
    seen: set[str] = set()
    for header, name in value.items():
        key = header.lower().replace("_", "-")
        if not _HEADER_NAME.match(header):
            raise ValueError(f"{header!r} is not a header name")
        if key in _PROXY_HEADERS or key.startswith(("x-forwarded-", "sec-websocket-")):
            raise ValueError(f"{header} is a header the gateway sets or handles itself")
        if key in seen:
            raise ValueError(f"{header} is named twice (header names ignore case, and _ counts as -)")
        seen.add(key)
        if not _PROFILE_FIELD_NAME.match(name):
            raise ValueError(f"{name!r} (for {header}) is not a profile field name")
    return MappingProxyType(dict(value))


def _version(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _document_url(value: Any) -> str:
    if isinstance(value, str) and not any(c.isspace() or not c.isprintable() for c in value):
        if value.startswith("/") and not value.startswith("//"):
            return value
        try:
            parts = urlsplit(value)
            if parts.scheme in ("http", "https") and parts.hostname:
                return value
        except ValueError:
            pass
    raise ValueError("expected an http:// or https:// URL, or a path starting with /")


@dataclass(frozen=True, kw_only=True)
class ProfileFieldConfig:
    """One ``[profiles.fields.<name>]`` table: the type and limits of a
    profile field that ``PATCH {auth_prefix}/profile`` may set."""

    type: str = option(_choice("string", "integer", "number", "boolean", "language"), "string",
                       "string, integer, number, boolean, or language (a well-formed BCP 47 tag, RFC 5646)")
    max_length: int | None = option(at_least(INT, 1), None, "string and language fields: the most characters (unset: 256)")
    min_length: int | None = option(NONNEG_INT, None, "string fields: the fewest characters (unset: 1; null removes a field)")
    pattern: str | None = option(_regex, None, "string fields: a regular expression (Python syntax) the whole value must match")
    minimum: float | None = option(_number, None, "integer and number fields: the smallest value allowed")
    maximum: float | None = option(_number, None, "integer and number fields: the largest value allowed")

    @property
    def longest(self) -> int:
        return 256 if self.max_length is None else self.max_length

    @property
    def shortest(self) -> int:
        return 1 if self.min_length is None else self.min_length

    def check(self, where: str) -> list[str]:
        """Limits that do not fit the type, or each other (naming ``where.key``)."""
        problems: list[str] = []
        if self.max_length is not None and self.type not in ("string", "language"):
            problems.append(f"{where}.max_length: only string and language fields have a length")
        for name in ("min_length", "pattern"):
            if getattr(self, name) is not None and self.type != "string":
                problems.append(f"{where}.{name}: applies to string fields only")
        for name in ("minimum", "maximum"):
            if getattr(self, name) is not None and self.type not in ("integer", "number"):
                problems.append(f"{where}.{name}: applies to integer and number fields only")
        if self.type == "string" and self.shortest > self.longest:
            problems.append(f"{where}.min_length: is above max_length")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            problems.append(f"{where}.minimum: is above maximum")
        return problems


PROFILE_FIELD = options_of(ProfileFieldConfig)

#: the fields editable by default, declared unless a [profiles.fields.<name>] table says otherwise
BUILTIN_PROFILE_FIELDS: Mapping[str, ProfileFieldConfig] = MappingProxyType({
    "nickname": ProfileFieldConfig(type="string", max_length=64),
    "language": ProfileFieldConfig(type="language", max_length=64),
})


@dataclass(frozen=True, kw_only=True)
class ConsentDocumentConfig:
    """One ``[consent.documents.<name>]`` table: a document users accept
    (terms of service, a privacy policy)."""

    version: str = option(_version, None, "its current version (any non-empty string); a new one makes every user accept again", required=True)
    url: str = option(_document_url, None, "where people read it: an http(s) URL, or a path on the front end's site", required=True)
    title: str = option(STR, "", "its title for people (empty: the document's name)")


CONSENT_DOCUMENT = options_of(ConsentDocumentConfig)


@dataclass(frozen=True, kw_only=True)
class ProfilesConfig:
    """``[profiles]``: the profile store."""

    store: str = option(_choice("sqlite", "mongodb"), "sqlite", "sqlite (embedded, durable file) or mongodb")
    sqlite_path: str = option(_pattern(re.compile(r"^\S.*$"), "a file path"), "var/profiles.db", "SQLite file, relative to the working directory")
    mongodb_url: str = option(_mongodb_url, "mongodb://127.0.0.1:27017", "MongoDB connection string", secret=True)
    mongodb_database: str = option(_pattern(_MONGO_DB, "a MongoDB database name (no /\\. \"$*<>:|? or spaces)"), "gateway", "MongoDB database name")
    mongodb_timeout: float = option(POSITIVE_DURATION, "1s", "MongoDB server selection / operation timeout")
    editable: tuple[str, ...] = option(_names(_PROFILE_FIELD_NAME, "a profile field name (a letter, then letters, digits or _)"),
                                       ["nickname", "language"], "profile fields a user may set with `PATCH {auth_prefix}/profile`, each declared in a `[profiles.fields.<name>]` table (nickname and language are built in)")
    fields: Mapping[str, ProfileFieldConfig] = option(
        _named_tables("profiles.fields", ProfileFieldConfig, PROFILE_FIELD, _PROFILE_FIELD_NAME,
                      "not a profile field name (a letter, then letters, digits or _)"),
        {}, "declarations of editable fields: `[profiles.fields.<name>]` tables (below)")
    upstream_headers: Mapping[str, str] = option(_header_fields, {}, "request header -> profile field (`{\"X-User-Language\" = \"language\"}`), sent upstream with every request of a signed-in caller; clients' own headers of these names are dropped")
    upstream_headers_ttl: float = option(DURATION, "5s", "how long a process reuses a user's upstream_headers values before reading the profile store again (0 = on every request); a PATCH shows at once in its own process")

    def declared(self, name: str) -> ProfileFieldConfig | None:
        """How profile field ``name`` is declared: its ``[profiles.fields.<name>]``
        table, else the built-in declaration, else ``None``."""
        return self.fields[name] if name in self.fields else BUILTIN_PROFILE_FIELDS.get(name)

    def check(self) -> list[str]:
        """The problems of combinations that cannot work (each naming its key)."""
        problems: list[str] = []
        for name, declared in self.fields.items():
            problems.extend(declared.check(f"profiles.fields.{name}"))
        for name in self.editable:
            if self.declared(name) is None:
                problems.append(f"profiles.editable: {name!r} has no [profiles.fields.{name}] table "
                                f"(built in: {', '.join(BUILTIN_PROFILE_FIELDS)})")
        return problems


@dataclass(frozen=True, kw_only=True)
class PluginsConfig:
    """``[plugins]``: which installed plugins are loaded."""

    disabled: tuple[str, ...] = option(_str_list, [], "names of installed plugins not to load")


def _audit_target(value: Any) -> str:
    if not isinstance(value, str) or (value.strip() != value) or "\x00" in value:
        raise ValueError('expected "" (off), "stdout" or a file path')
    return value


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """``[logging]``: the format of the log lines, the access log, the audit log."""

    format: str = option(_choice("text", "json"), "text", "text (one readable line per record) or json (one JSON object per line)")
    access_log: bool = option(BOOL, True, "log one line per request (gateway.access)")
    audit: str = option(_audit_target, "", "the audit log (JSON lines: logins, logouts, sessions revoked, credentials changed): \"\" (off), \"stdout\" or a file path (appended to by every worker; reopened on SIGUSR1)")

    def check(self) -> list[str]:
        """An audit file whose directory does not exist (read only, nothing made)."""
        if self.audit and self.audit != "stdout":
            where = os.path.dirname(os.path.abspath(self.audit))
            if not os.path.isdir(where):
                return [f"logging.audit: the directory {where} does not exist"]
            if os.path.isdir(self.audit):
                return [f"logging.audit: {self.audit} is a directory; give a file path"]
        return []


#: the modules tracing needs: the otel extra (pip install 'session-gateway[otel]')
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")


def _tracing_enabled(value: Any) -> bool:
    enabled = BOOL(value)
    if enabled:
        import importlib.util

        for module in TRACING_MODULES:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ValueError(f"needs the otel extra ({module} cannot be imported): "
                                 f"pip install 'session-gateway[otel]'")
    return enabled


@dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """``[tracing]``: OpenTelemetry traces, exported over OTLP/HTTP (the rest from the OTEL_* environment)."""

    enabled: bool = option(_tracing_enabled, False, "send a span of every request (and a child span of its upstream call) to an OpenTelemetry collector over OTLP/HTTP, continuing the client's traceparent; needs the otel extra (pip install 'session-gateway[otel]'); the standard OTEL_* environment variables configure the exporter (OTEL_EXPORTER_OTLP_ENDPOINT...), the sampler (OTEL_TRACES_SAMPLER) and the service name (OTEL_SERVICE_NAME, default session-gateway)")


@dataclass(frozen=True, kw_only=True)
class ConsentConfig:
    """``[consent]``: the documents users accept."""

    documents: Mapping[str, ConsentDocumentConfig] = option(
        _named_tables("consent.documents", ConsentDocumentConfig, CONSENT_DOCUMENT, _DOCUMENT_NAME,
                      "not a document name (lowercase letters, digits, - or _)"),
        {}, "the documents users accept: `[consent.documents.<name>]` tables (below), in the order front ends list them")


#: a key id (``kid``) of ``[[assertion.keys]]``
_KID = re.compile(r"^[A-Za-z0-9._~\-]{1,64}$")
#: the longest lifetime of an assertion: it only has to cross to the upstream
MAX_ASSERTION_LIFETIME = 60.0


def _lifetime(value: Any) -> float:
    seconds = parse_duration(value)
    if not 1 <= seconds <= MAX_ASSERTION_LIFETIME:
        raise ValueError(f"must be between 1s and {MAX_ASSERTION_LIFETIME:g}s (an assertion only crosses to the upstream)")
    return seconds


@dataclass(frozen=True, kw_only=True)
class AssertionKeyConfig:
    """One ``[[assertion.keys]]`` table: a key that signs assertions."""

    kid: str = option(_pattern(_KID, "a key id (letters, digits, . _ ~ -; at most 64)"), None,
                      "the key's id: the `kid` of the tokens it signs and of its entry in the JWKS", required=True)
    algorithm: str = option(_choice("ES256", "EdDSA", "RS256"), "ES256",
                            "ES256 (an EC P-256 key), EdDSA (Ed25519) or RS256 (RSA, at least 2048 bits)")
    private_key: str = option(STR, None, "the private key, PEM (`-----BEGIN PRIVATE KEY-----`, unencrypted), "
                              "best given as private_key_env; never logged", secret=True, required=True)

    def check(self, where: str) -> list[str]:
        """The key's problems (naming ``where`` and the key by its kid, never quoting it)."""
        from gateway.assertion import load_private_key

        try:
            load_private_key(self.private_key, self.algorithm)
        except ValueError as exc:
            return [f"{where}.private_key: key {self.kid!r}: {exc}"]
        return []


ASSERTION_KEY = options_of(AssertionKeyConfig)


def _read_keys(where: str, raw: Any, problems: list[str], environ: Mapping[str, str]) -> tuple[AssertionKeyConfig, ...]:
    """The ``[[assertion.keys]]`` tables of ``raw``, each checked (problems
    name ``where[i].key``); a table missing its kid or key is left out."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.append(f"{where}: expected an array of tables ([[assertion.keys]])")
        return ()
    keys: list[AssertionKeyConfig] = []
    for i, table in enumerate(raw):
        values = validate_table(f"{where}[{i}]", ASSERTION_KEY, table, problems, environ).as_dict()
        if values["kid"] is None or values["private_key"] is None:
            continue  # reported
        key = AssertionKeyConfig(**values)
        if any(k.kid == key.kid for k in keys):
            problems.append(f"{where}[{i}].kid: {key.kid!r} names another key too")
        problems.extend(key.check(f"{where}[{i}]"))
        keys.append(key)
    return tuple(keys)


def _assertion_keys(value: Any) -> tuple[AssertionKeyConfig, ...]:
    """The checker of ``[assertion] keys``: the keys given in the file
    itself.  It raises nothing, so that no problem quotes a value that may
    hold a key: :func:`read_config` reads the tables again with the
    environment (``private_key_env``), reporting each problem under its key."""
    return _read_keys("keys", value, [], {})


@dataclass(frozen=True, kw_only=True)
class AssertionConfig:
    """``[assertion]``: the signed identity (``X-Gateway-Assertion``) sent
    upstream on routes with ``assertion = true``."""

    issuer: str = option(STR, "", "the assertions' `iss`; empty: the gateway's own origin as the client addressed it (`https://gateway.example.com`); set it so that upstreams check one fixed value")
    lifetime: float = option(_lifetime, "30s", "how long an assertion is valid (`exp` - `iat`, whole seconds), at most 60s")
    keys: tuple[AssertionKeyConfig, ...] = option(_assertion_keys, [], "the signing keys, `[[assertion.keys]]` tables (below): the first signs, all are published at `{auth_prefix}/.well-known/jwks.json` (rotation: put the new key first, remove the old one once no token it signed is alive)")


ASSERTION = options_of(AssertionConfig)


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    """One ``[[routes]]`` table.  In a loaded :class:`Config`,
    ``max_body_size`` is never ``None`` (unset, it is ``server.max_body_size``)."""

    prefix: str = option(_prefix, None, "path prefix this route serves (longest match wins)", required=True)
    upstream: str = option(_http_url, None, "upstream base URL, e.g. http://127.0.0.1:9000", required=True)
    auth: str = option(_choice("required", "optional", "public"), "required", "required | optional | public")
    strip_prefix: bool = option(BOOL, False, "remove the prefix from the path sent upstream")
    connect_timeout: float = option(POSITIVE_DURATION, "5s", "upstream connect timeout (504 beyond)")
    request_timeout: float = option(POSITIVE_DURATION, "30s", "longest wait for the upstream's response head (504 beyond)")
    read_timeout: float = option(POSITIVE_DURATION, "60s", "longest silence between body chunks, either way, once a transfer has started (the transfer is cut beyond)")
    max_body_size: int | None = option(_optional_size, None, "largest request body (0 = no limit); default server.max_body_size")
    websocket: bool = option(BOOL, False, "proxy Upgrade: websocket requests on this route")
    websocket_max_message_size: int = option(at_least(SIZE, 1), "1MiB", "largest WebSocket message either way (close 1009 beyond)")
    websocket_ping_interval: float = option(DURATION, "30s", "ping idle WebSocket clients this often (0 = never)")
    preserve_host: bool = option(BOOL, False, "send the client's Host header upstream instead of the upstream's")
    scopes: tuple[str, ...] = option(_scopes, [], "scopes a caller authenticated by a plugin (an API key) must all hold (403 otherwise)")
    allow_sessions: bool = option(BOOL, True, "whether session users (who hold no scopes) may use this route")
    require_consent: tuple[str, ...] = option(_names(_DOCUMENT_NAME, "a consent document name"), [], "names of `[consent.documents.<name>]` a caller (a session user, an API key's owner) must have accepted in their current version (403 consent_required otherwise)")
    assertion: bool = option(BOOL, False, "send a signed X-Gateway-Assertion (a JWT of the caller's identity, `[assertion]`) with every authenticated request; needs `[[assertion.keys]]`")
    audience: str = option(STR, "", "the assertion's `aud`; empty: the route's prefix")

    def check(self, where: str, server: ServerConfig, consent: ConsentConfig | None = None,
              assertion: AssertionConfig | None = None) -> list[str]:
        """The problems of combinations that cannot work, naming ``where.key``
        (a prefix shared by two routes is the caller's to find; the
        documents of ``require_consent`` are checked when ``consent`` is given,
        a signing key for ``assertion`` when ``assertion`` is)."""
        problems: list[str] = []
        auth_prefix = server.auth_prefix.rstrip("/")
        if self.prefix and (self.prefix.rstrip("/") == auth_prefix or self.prefix.startswith(auth_prefix + "/")):
            problems.append(f"{where}.prefix: {self.prefix!r} lies under server.auth_prefix {server.auth_prefix!r}")
        if self.auth == "public" and self.scopes:
            problems.append(f"{where}.scopes: a public route authenticates no one, so it cannot require scopes")
        if self.auth == "public" and not self.allow_sessions:
            problems.append(f"{where}.allow_sessions: a public route authenticates no one, so it cannot refuse sessions")
        if self.auth == "public" and self.require_consent:
            problems.append(f"{where}.require_consent: a public route authenticates no one, so it cannot require consent")
        unknown = [n for n in self.require_consent if consent is not None and n not in consent.documents]
        if unknown:
            problems.append(f"{where}.require_consent: {', '.join(map(repr, unknown))} "
                            f"{'is not a document' if len(unknown) == 1 else 'are not documents'} of [consent.documents]")
        if self.auth == "public" and self.assertion:
            problems.append(f"{where}.assertion: a public route authenticates no one, so it has no identity to assert")
        if self.audience and not self.assertion:
            problems.append(f"{where}.audience: is the audience of an assertion; set assertion = true too")
        if self.assertion and assertion is not None and not assertion.keys:
            problems.append(f"{where}.assertion: no key to sign with; configure [[assertion.keys]]")
        return problems


_LIMIT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _whole_seconds(value: Any) -> float:
    seconds = at_least(POSITIVE_DURATION, 1)(value)
    if seconds != int(seconds):
        raise ValueError("expected a whole number of seconds")
    return seconds


@dataclass(frozen=True, kw_only=True)
class RateLimitConfig:
    """One ``[[rate_limits]]`` table: ``limit`` requests per ``window``,
    counted per ``key``, on the routes or the gateway endpoint ``match`` names.
    Given at all, the tables replace the default limit on logins;
    ``rate_limits = []`` turns every limit off."""

    name: str = option(_pattern(_LIMIT_NAME, "a limit name (a lowercase letter, then lowercase letters, digits or _; at most 40)"),
                       None, "the limit's name, in the RateLimit headers and the gateway_rate_limited_total metric", required=True)
    match: str = option(_prefix, None, "what it limits: a route prefix (every [[routes]] whose prefix begins with it, \"/api/\"), or the path of one of the gateway's own endpoints (\"/auth/password/login\")", required=True)
    key: str = option(_choice("ip", "user", "credential", "session"), "ip", "what is counted: ip (the client address; an IPv6 client by its /64), user, credential (a caller a provider authenticated without a session, such as an API key: by provider, user and credential) or session; a request without such a caller is not counted")
    limit: int = option(at_least(INT, 1), None, "requests allowed per window (a burst of that many at once, then one every window / limit)", required=True)
    window: float = option(_whole_seconds, None, "the window, in whole seconds (\"1m\")", required=True)
    on_store_error: str | None = option(_choice("deny", "allow"), None, "when the shared state cannot be reached: deny (503 unavailable) or allow (served uncounted); default deny on the gateway's own endpoints, allow on routes")

    def check(self, where: str, server: ServerConfig, routes: tuple[RouteConfig, ...]) -> list[str]:
        """The problems of combinations that cannot work, naming ``where.key``
        (whether an endpoint path exists is known once providers are built)."""
        problems: list[str] = []
        auth_prefix = server.auth_prefix.rstrip("/")
        if self.match and not (self.match.rstrip("/") == auth_prefix or self.match.startswith(auth_prefix + "/")):
            if not any(r.prefix.startswith(self.match) for r in routes):
                problems.append(f"{where}.match: {self.match!r} begins no [[routes]] prefix "
                                f"and is not under server.auth_prefix")
        return problems


SERVER = options_of(ServerConfig)
ADMIN = options_of(AdminConfig)
SESSIONS = options_of(SessionsConfig)
PROFILES = options_of(ProfilesConfig)
PLUGINS = options_of(PluginsConfig)
CONSENT = options_of(ConsentConfig)
LOGGING = options_of(LoggingConfig)
TRACING = options_of(TracingConfig)
ROUTE = options_of(RouteConfig)
RATE_LIMIT = options_of(RateLimitConfig)

SECTIONS: dict[str, list[Option]] = {
    "server": SERVER,
    "sessions": SESSIONS,
    "profiles": PROFILES,
    "plugins": PLUGINS,
    "consent": CONSENT,
    "admin": ADMIN,
    "assertion": ASSERTION,
    "logging": LOGGING,
    "tracing": TRACING,
}

#: the tables of named tables within a section: section -> key -> (their
#: options, what builds one, the pattern of names, what a bad name is not);
#: read by :func:`read_config`, rendered by :func:`describe_options`
NAMED_TABLES: dict[str, dict[str, tuple[list[Option], Callable[..., Any], re.Pattern[str], str]]] = {
    "profiles": {"fields": (PROFILE_FIELD, ProfileFieldConfig, _PROFILE_FIELD_NAME,
                            "not a profile field name (a letter, then letters, digits or _)")},
    "consent": {"documents": (CONSENT_DOCUMENT, ConsentDocumentConfig, _DOCUMENT_NAME,
                              "not a document name (lowercase letters, digits, - or _)")},
}


# ---------------------------------------------------------------------------
# The whole configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    consent: ConsentConfig = field(default_factory=ConsentConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    assertion: AssertionConfig = field(default_factory=AssertionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    routes: tuple[RouteConfig, ...] = ()
    #: the ``[[rate_limits]]`` tables; ``None`` when the file has none (the default limit on logins applies)
    rate_limits: tuple[RateLimitConfig, ...] | None = None
    #: the raw ``[providers.<name>]`` tables, validated against each provider's options when the gateway is built
    providers: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    def with_server(self, **changes: Any) -> Config:
        """A copy with these ``[server]`` values replaced (``host=``, ``port=``)."""
        return replace(self, server=replace(self.server, **changes))


def load_config(path: str | None = None, *, data: dict[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a configuration file (or an already-parsed dict);
    raise :class:`ConfigError` listing every problem."""
    config, problems = read_config(path, data=data, environ=environ)
    if problems:
        raise ConfigError(problems)
    return config


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid TOML: the file is not UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None


def _read_routes(raw_routes: Any, server: ServerConfig, problems: list[str],
                 environ: Mapping[str, str], consent: ConsentConfig | None = None,
                 assertion: AssertionConfig | None = None) -> tuple[RouteConfig, ...]:
    if not isinstance(raw_routes, list):
        problems.append("routes: expected an array of tables ([[routes]])")
        return ()
    routes: list[RouteConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_routes):
        where = f"routes[{i}]"
        values = validate_table(where, ROUTE, raw, problems, environ).as_dict()
        if values["max_body_size"] is None:
            values["max_body_size"] = server.max_body_size
        prefix, upstream = values["prefix"], values["upstream"]
        if prefix is not None:
            if prefix in seen:
                problems.append(f"{where}.prefix: {prefix!r} is used by another route")
            seen.add(prefix)
        # A route missing its prefix or upstream is still checked (with "" standing in), not kept.
        route = RouteConfig(**{**values, "prefix": prefix or "", "upstream": upstream or ""})
        problems.extend(route.check(where, server, consent, assertion))
        if prefix is not None and upstream is not None:
            routes.append(route)
    return tuple(routes)


def _read_rate_limits(raw_limits: Any, server: ServerConfig, routes: tuple[RouteConfig, ...],
                      problems: list[str], environ: Mapping[str, str]) -> tuple[RateLimitConfig, ...]:
    if not isinstance(raw_limits, list):
        problems.append("rate_limits: expected an array of tables ([[rate_limits]])")
        return ()
    limits: list[RateLimitConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_limits):
        where = f"rate_limits[{i}]"
        values = validate_table(where, RATE_LIMIT, raw, problems, environ).as_dict()
        if values["name"] is not None:
            if values["name"] in seen:
                problems.append(f"{where}.name: {values['name']!r} is used by another limit")
            seen.add(values["name"])
        if any(values[k] is None for k in ("name", "match", "limit", "window")):
            continue  # a missing key was reported
        limit = RateLimitConfig(**values)
        problems.extend(limit.check(where, server, routes))
        limits.append(limit)
    return tuple(limits)


def read_config(
    path: str | None = None, *, data: dict[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, list[str]]:
    """Like :func:`load_config`, but return the problems beside a usable
    configuration (defaults standing in for bad values), so that checks
    which need a configuration (the providers' own tables) can still run and
    report theirs too.  Raises :class:`ConfigError` only when there is no
    file to read."""
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    if data is None:
        data = {} if path is None else _read_file(path)
    allowed = set(SECTIONS) | {"routes", "rate_limits", "providers"}
    for key in data:
        if key not in allowed:
            problems.append(f"{key}: unknown section")
    server = _validated(ServerConfig, "server", SERVER, data.get("server", {}), problems, env)
    sessions = _validated(SessionsConfig, "sessions", SESSIONS, data.get("sessions", {}), problems, env)
    profiles = _validated(ProfilesConfig, "profiles", PROFILES, data.get("profiles", {}), problems, env)
    plugins = _validated(PluginsConfig, "plugins", PLUGINS, data.get("plugins", {}), problems, env)
    consent = _validated(ConsentConfig, "consent", CONSENT, data.get("consent", {}), problems, env)
    admin = _validated(AdminConfig, "admin", ADMIN, data.get("admin", {}), problems, env)
    assertion = _validated(AssertionConfig, "assertion", ASSERTION, data.get("assertion", {}), problems, env)
    raw_assertion = data.get("assertion")
    if isinstance(raw_assertion, dict) and "keys" in raw_assertion:  # again, with the environment
        assertion = replace(assertion, keys=_read_keys("assertion.keys", raw_assertion["keys"], problems, env))
    logs = _validated(LoggingConfig, "logging", LOGGING, data.get("logging", {}), problems, env)
    tracing = _validated(TracingConfig, "tracing", TRACING, data.get("tracing", {}), problems, env)
    for section, named in NAMED_TABLES.items():  # their own problems, each under its key
        raw_section = data.get(section)
        for key, (options, build, name, what) in named.items():
            if isinstance(raw_section, dict) and isinstance(raw_section.get(key), dict):
                _read_named(f"{section}.{key}", build, options, raw_section[key], name, what, problems)
    routes = _read_routes(data.get("routes", []), server, problems, env, consent, assertion)
    rate_limits = None if "rate_limits" not in data else \
        _read_rate_limits(data["rate_limits"], server, routes, problems, env)
    providers = data.get("providers", {})
    if not isinstance(providers, dict):
        problems.append("providers: expected a table of [providers.<name>] tables")
        providers = {}
    # Combinations, except those naming a key already refused (they would judge its default)
    refused = {problem.split(":", 1)[0] for problem in problems}
    combined = [*sessions.check(server), *profiles.check(), *admin.check(server), *logs.check()]
    problems.extend(problem for problem in combined
                    if not any(re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", problem) for key in refused))
    config = Config(server=server, sessions=sessions, profiles=profiles, plugins=plugins, consent=consent, admin=admin, assertion=assertion, logging=logs, tracing=tracing, routes=routes,
                    rate_limits=rate_limits, providers=providers, path=path, environ=env)
    return config, problems


def describe_options() -> dict[str, str]:
    """Markdown reference tables of the core options, by table name."""
    tables: dict[str, str] = {}
    for name, opts in SECTIONS.items():
        tables[f"[{name}]"] = reference_table(opts)
        for key, (named, *_) in NAMED_TABLES.get(name, {}).items():
            tables[f"[{name}.{key}.<name>]"] = reference_table(named)
        if name == "assertion":
            tables["[[assertion.keys]]"] = reference_table(ASSERTION_KEY)
    tables["[[routes]]"] = reference_table(ROUTE)
    tables["[[rate_limits]]"] = reference_table(RATE_LIMIT)
    return tables
